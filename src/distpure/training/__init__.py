"""Training loops that survive interruption: diffusion backbones and (adversarially) robust victims."""
