"""Certified L2 robustness by (diffusion) denoised smoothing.

Randomized smoothing (Cohen, Rosenfeld & Kolter 2019) around a base classifier that is the
victim behind a diffusion denoiser (Carlini et al. 2023; DensePure for the voted kind). The
Python entry point::

    from distpure import load_classifier, load_diffusion
    from distpure.certification import SmoothedClassifier, build_base_classifier

    victim = load_classifier("cifar10-resnet18")
    diffusion = load_diffusion("cifar10-ddpm-small")
    base = build_base_classifier(victim, diffusion, "one-shot", sigma=0.25)
    smoothed = SmoothedClassifier(base, num_classes=10, sigma=0.25, batch_size=256)
    result = smoothed.certify(image, n0=100, n=1000, alpha=0.001, seed=0)  # image: C x H x W in [0, 1]
    result.predicted, result.radius        # the class, and its certified L2 radius (None: abstain)
    smoothed.predict(image, n=1000, alpha=0.001, seed=1).predicted   # None: abstain

Whole experiments: ``distpure certify CONFIG --out DIR`` (``runner.run_certification``).
"""
from .config import CertifyConfig, SettingConfig, load_certify_config
from .denoisers import DENOISER_KINDS, DenoisedClassifier, build_base_classifier, noise_level
from .smoothing import CertifyResult, PredictResult, SmoothedClassifier
from .statistics import certify_counts, lower_confidence_bound, max_certifiable_radius, predict_p_value

__all__ = ["CertifyConfig", "SettingConfig", "load_certify_config", "DENOISER_KINDS", "DenoisedClassifier",
           "build_base_classifier", "noise_level", "CertifyResult", "PredictResult", "SmoothedClassifier",
           "certify_counts", "lower_confidence_bound", "max_certifiable_radius", "predict_p_value"]
