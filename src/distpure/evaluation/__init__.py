"""Evaluation: experiment configs, the resumable runner, statistics and run metadata."""
