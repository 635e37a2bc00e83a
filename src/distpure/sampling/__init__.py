"""Noise schedules and reverse-diffusion steps: pure tensor maths, differentiable, explicit noise."""
