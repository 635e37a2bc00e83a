"""Benchmarks that print their figures: purification speed, attack cost, model cost."""
