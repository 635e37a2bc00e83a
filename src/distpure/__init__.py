"""distpure: diffusion-based adversarial purification guided by the protected classifier.

The defence of "Adversarial defense based on distribution transfer" (arXiv 2311.13841): diffuse
the input to t*, reverse the diffusion guided by the protected (victim) classifier, classify.
"""
__version__ = "0.2.0"  # before the imports: modules of the package read it while it loads

from .data import LabelledImages, load_cifar10, load_dataset, load_image_folder, load_imagenet30
from .defenses.defended import DefendedClassifier
from .defenses.guidance import CombinedGuidance, Guidance, MSEGuidance, VictimGuidance, build_guidance
from .defenses.purifier import Purifier, PurifierConfig
from .defenses.recommended import load_defense
from .models.classifiers import load_classifier
from .models.diffusion import DiffusionModel
from .models.diffusion_loader import load_diffusion
from .models.noise_predictor import NoisePredictor
from .models.ncsnpp import ScoreSDEModel, load_score_sde

__all__ = [
    "CombinedGuidance", "DefendedClassifier", "DiffusionModel", "Guidance", "LabelledImages",
    "MSEGuidance", "NoisePredictor", "Purifier", "PurifierConfig", "ScoreSDEModel", "VictimGuidance",
    "build_guidance", "load_classifier", "load_cifar10", "load_dataset", "load_defense",
    "load_diffusion", "load_image_folder", "load_imagenet30", "load_score_sde",
]
