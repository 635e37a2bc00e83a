"""Defences: diffusion purification, its guidance, and baselines, all [0, 1] images in and out."""
