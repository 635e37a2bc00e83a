"""``load_diffusion``: a diffusion backbone by registry name, local diffusers directory,
guided-diffusion (ADM) checkpoint file (``.pt`` or ``.safetensors``), score-SDE checkpoint
(``checkpoint_8.pth``, or a file or directory with an NCSN++ config), ``module:callable``, or
hub id for online users; it picks the format and dispatches to its loader."""
from __future__ import annotations

from pathlib import Path

from ..registry import Registry, build_from_spec, is_callable_spec
from .adm import load_adm_checkpoint
from .diffusion import DiffusionModel
from .ncsnpp import is_score_sde, load_score_sde
from .noise_predictor import NoisePredictor

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
# Single-file guided-diffusion (ADM) checkpoints; flags come from a config JSON beside the file.
ADM_SUFFIXES = (".pt", ".safetensors")
DIFFUSION_MODELS: Registry[NoisePredictor] = Registry("diffusion model")


@DIFFUSION_MODELS.register("cifar10-ddpm-small")
def cifar10_ddpm_small() -> DiffusionModel:
    """The embedded default: a 10 M-parameter DDPM trained by ``distpure train-diffusion``."""
    directory = WEIGHTS_DIR / "cifar10-ddpm-small"
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"the embedded diffusion model is missing from {directory}; "
                                "reinstall distpure or train one with `distpure train-diffusion`")
    return DiffusionModel.from_pretrained(directory)


def load_diffusion(name_or_path: str | Path) -> NoisePredictor:
    """A diffusion model by registry name, local directory / checkpoint file, hub id, or
    ``package.module:callable`` (your function returning a ``NoisePredictor``)."""
    name = str(name_or_path)
    if name in DIFFUSION_MODELS:
        return DIFFUSION_MODELS.build(name)
    if is_callable_spec(name):
        return build_from_spec(name, NoisePredictor, "diffusion model")
    path = Path(name).expanduser()
    if is_score_sde(path):
        return load_score_sde(path)
    if path.is_dir():
        return DiffusionModel.from_pretrained(path)
    if path.is_file() and path.suffix in ADM_SUFFIXES:
        return load_adm_checkpoint(path)
    if path.exists():
        raise ValueError(f"{path}: expected a diffusers directory or a guided-diffusion "
                         ".pt / .safetensors file, or a score-SDE .pth checkpoint")
    return _from_hub(name)


def check_diffusion_name(name: str) -> None:
    """Refuse a ``name`` that ``load_diffusion`` could never take, checked without loading
    anything: it takes a registered model, a ``module:callable``, an existing path or a hub id."""
    if not (name in DIFFUSION_MODELS or is_callable_spec(name) or Path(name).expanduser().exists()
            or _is_hub_id(name)):
        raise ValueError(f"unknown diffusion model: {_unknown(name)}")


def _is_hub_id(name: str) -> bool:
    """Whether ``name`` has the form of a model hub id, ``owner/name``."""
    return name.count("/") == 1 and not name.startswith((".", "/", "~"))


def _unknown(name: str) -> str:
    """Why ``load_diffusion`` cannot take ``name``: what it takes instead."""
    return (f"{name!r} is neither a registered model ({', '.join(DIFFUSION_MODELS.names())}), "
            "an existing local path, a package.module:callable, nor a hub id of the form 'owner/name'")


def _from_hub(repo_id: str) -> DiffusionModel:
    """Download a diffusers repository (e.g. ``google/ddpm-cifar10-32``) and load it."""
    if not _is_hub_id(repo_id):
        raise FileNotFoundError(_unknown(repo_id))
    from huggingface_hub import snapshot_download

    try:
        directory = snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors"])
    except Exception as error:  # network and hub errors come in many types
        raise FileNotFoundError(
            f"could not download {repo_id!r} from the model hub ({type(error).__name__}). "
            f"If you are offline, download it elsewhere and pass the local directory instead, "
            f"e.g. load_diffusion('/path/to/{repo_id.split('/')[-1]}')") from error
    return DiffusionModel.from_pretrained(directory)
