"""distpure: diffusion-based adversarial purification guided by the protected classifier."""
__version__ = "0.1.0"
