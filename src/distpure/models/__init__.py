"""Models: victim classifiers and diffusion backbones, each addressed by name or path."""
