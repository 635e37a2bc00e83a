"""OpenAI guided-diffusion ("ADM") UNet checkpoints as diffusers ``UNet2DModel``s.

guided-diffusion's ``UNetModel`` maps onto ``UNet2DModel`` with scale-shift ResNet blocks,
``ResnetDownsampleBlock2D``/``ResnetUpsampleBlock2D`` (or ``AttnDown/UpBlock2D`` at attention
levels) when ``resblock_updown`` is set, and one attention head width everywhere. Checkpoints
are read with ``torch.load(weights_only=True)`` (``.pt``) or safetensors, never unrestricted pickle.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DModel

from .diffusion import DiffusionModel
from .weights import load_state_dict

# Flags of the public 256x256 unconditional ImageNet model (``256x256_diffusion_uncond.pt``).
ADM_256_UNCOND_FLAGS: dict[str, Any] = {
    "image_size": 256, "num_channels": 256, "num_res_blocks": 2, "channel_mult": "",
    "learn_sigma": True, "class_cond": False, "attention_resolutions": "32,16,8",
    "num_heads": 4, "num_head_channels": 64, "num_heads_upsample": -1,
    "use_scale_shift_norm": True, "dropout": 0.0, "resblock_updown": True, "use_fp16": False,
    "use_new_attention_order": False,
}

# guided-diffusion's ``model_and_diffusion_defaults()``: what an omitted flag means there.
_GUIDED_DIFFUSION_DEFAULTS: dict[str, Any] = {
    "image_size": 64, "num_channels": 128, "num_res_blocks": 2, "num_heads": 4,
    "num_heads_upsample": -1, "num_head_channels": -1, "attention_resolutions": "16,8",
    "channel_mult": "", "dropout": 0.0, "class_cond": False, "use_checkpoint": False,
    "use_scale_shift_norm": True, "resblock_updown": False, "use_fp16": False,
    "use_new_attention_order": False, "learn_sigma": False, "diffusion_steps": 1000,
    "noise_schedule": "linear", "timestep_respacing": "", "use_kl": False, "predict_xstart": False,
    "rescale_timesteps": False, "rescale_learned_sigmas": False,
}
_REQUIRED_VALUES: dict[str, Any] = {
    "class_cond": False, "diffusion_steps": 1000, "noise_schedule": "linear", "predict_xstart": False,
}
_DEFAULT_CHANNEL_MULT: dict[int, tuple[float, ...]] = {
    512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4),
}
DEFAULT_FLAGS_SOURCE = ("the 256x256 unconditional model's flags (the default when no "
                        "<stem>_config.json or config.json is beside the checkpoint)")
_RESNET_PARTS = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                 "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


class FlagsMismatch(ValueError):
    """A checkpoint's tensors do not fit the guided-diffusion flags it is converted with."""


def resolve_flags(flags: dict[str, Any]) -> dict[str, Any]:
    """Complete flags with guided-diffusion's defaults; reject unknown or unrepresentable ones."""
    unknown = sorted(set(flags) - set(_GUIDED_DIFFUSION_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown guided-diffusion flags: {', '.join(unknown)}")
    resolved = {**_GUIDED_DIFFUSION_DEFAULTS, **flags}
    for name, required in _REQUIRED_VALUES.items():
        if resolved[name] != required:
            raise ValueError(f"cannot convert a model with {name}={resolved[name]!r}: only "
                             f"{name}={required!r} is supported (unconditional ε-prediction, "
                             "linear 1000-step schedule)")
    return resolved


def _channel_mult(flags: dict[str, Any]) -> tuple[int, ...]:
    """Per-level channel multipliers, guided-diffusion's default for the image size when empty."""
    mult = flags["channel_mult"]
    if mult == "":
        if flags["image_size"] not in _DEFAULT_CHANNEL_MULT:
            raise ValueError(f"no default channel_mult for image_size={flags['image_size']}")
        mult = _DEFAULT_CHANNEL_MULT[flags["image_size"]]
    elif isinstance(mult, str):
        mult = tuple(int(m) for m in mult.split(","))
    if mult[0] != 1:
        raise ValueError(f"channel_mult {tuple(mult)}: diffusers' UNet2DModel needs the first "
                         "level at num_channels (its time embedding width follows it)")
    return tuple(int(m) for m in mult)


def _attention_levels(flags: dict[str, Any], levels: int) -> list[bool]:
    """For each level, whether it has attention (``attention_resolutions`` are image sizes)."""
    resolutions = flags["attention_resolutions"]
    if isinstance(resolutions, str):
        resolutions = [int(r) for r in resolutions.split(",") if r]
    downsampling = {flags["image_size"] // int(r) for r in resolutions}
    return [2**level in downsampling for level in range(levels)]


def _head_dim(flags: dict[str, Any], widths: list[int], up_widths: list[int]) -> int:
    """The single attention head width diffusers needs (down, middle and up attention blocks)."""
    per_head = flags["num_head_channels"]
    if per_head != -1:
        dims = {per_head} if all(w % per_head == 0 for w in widths + up_widths) else set()
    else:
        up_heads = flags["num_heads_upsample"]
        up_heads = flags["num_heads"] if up_heads == -1 else up_heads
        dims = {w / flags["num_heads"] for w in widths} | {w / up_heads for w in up_widths}
    if len(dims) != 1 or not float(next(iter(dims))).is_integer():
        raise ValueError(f"attention widths {sorted(set(widths + up_widths))} with num_heads="
                         f"{flags['num_heads']}, num_head_channels={per_head}, num_heads_upsample="
                         f"{flags['num_heads_upsample']} do not give one whole head width, which "
                         "diffusers' UNet2DModel requires")
    return int(dims.pop())


def adm_unet_config(flags: dict[str, Any]) -> dict[str, Any]:
    """The ``UNet2DModel`` config equivalent to a guided-diffusion ``UNetModel`` built from ``flags``."""
    flags = resolve_flags(flags)
    mult = _channel_mult(flags)
    attention = _attention_levels(flags, len(mult))
    widths = [flags["num_channels"] * m for m in mult]
    attention_widths = [w for w, a in zip(widths, attention) if a]
    updown = flags["resblock_updown"]
    return {
        "sample_size": flags["image_size"], "in_channels": 3,
        "out_channels": 6 if flags["learn_sigma"] else 3,
        "block_out_channels": tuple(widths), "layers_per_block": flags["num_res_blocks"],
        "down_block_types": tuple("AttnDownBlock2D" if a else
                                  ("ResnetDownsampleBlock2D" if updown else "DownBlock2D")
                                  for a in attention),
        "up_block_types": tuple("AttnUpBlock2D" if a else
                                ("ResnetUpsampleBlock2D" if updown else "UpBlock2D")
                                for a in reversed(attention)),
        "downsample_type": "resnet" if updown else "conv",
        "upsample_type": "resnet" if updown else "conv",
        "attention_head_dim": _head_dim(flags, attention_widths + [widths[-1]], attention_widths),
        "resnet_time_scale_shift": "scale_shift" if flags["use_scale_shift_norm"] else "default",
        "dropout": float(flags["dropout"]), "norm_num_groups": 32, "attn_norm_num_groups": 32,
        "norm_eps": 1e-5, "act_fn": "silu", "time_embedding_type": "positional",
        "flip_sin_to_cos": True, "freq_shift": 0, "add_attention": True,
    }


def _module_map(config: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """guided-diffusion module prefix -> (diffusers module prefix, kind), kind in module/resnet/attention."""
    modules = {"time_embed.0": ("time_embedding.linear_1", "module"),
               "time_embed.2": ("time_embedding.linear_2", "module"),
               "input_blocks.0.0": ("conv_in", "module"), "out.0": ("conv_norm_out", "module"),
               "out.2": ("conv_out", "module"), "middle_block.0": ("mid_block.resnets.0", "resnet"),
               "middle_block.1": ("mid_block.attentions.0", "attention"),
               "middle_block.2": ("mid_block.resnets.1", "resnet")}
    modules.update(_down_map(config))
    modules.update(_up_map(config))
    return modules


def _resampler(adm_prefix: str, diffusers_prefix: str, as_resnet: bool, conv_name: str
               ) -> dict[str, tuple[str, str]]:
    """Map a down/upsampler: a whole ResBlock, or the convolution of a (Down|Up)sample layer."""
    if as_resnet:
        return {adm_prefix: (diffusers_prefix, "resnet")}
    return {f"{adm_prefix}.{conv_name}": (f"{diffusers_prefix}.conv", "module")}


def _down_map(config: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Module map of ``input_blocks`` 1.. onto ``down_blocks``."""
    modules: dict[str, tuple[str, str]] = {}
    index, levels = 1, len(config["down_block_types"])
    for level, block_type in enumerate(config["down_block_types"]):
        for j in range(config["layers_per_block"]):
            modules[f"input_blocks.{index}.0"] = (f"down_blocks.{level}.resnets.{j}", "resnet")
            if block_type.startswith("Attn"):
                modules[f"input_blocks.{index}.1"] = (f"down_blocks.{level}.attentions.{j}", "attention")
            index += 1
        if level < levels - 1:
            modules.update(_resampler(f"input_blocks.{index}.0", f"down_blocks.{level}.downsamplers.0",
                                      config["downsample_type"] == "resnet", "op"))
            index += 1
    return modules


def _up_map(config: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Module map of ``output_blocks`` onto ``up_blocks``."""
    modules: dict[str, tuple[str, str]] = {}
    index, layers, levels = 0, config["layers_per_block"] + 1, len(config["up_block_types"])
    for up, block_type in enumerate(config["up_block_types"]):
        attention = block_type.startswith("Attn")
        for j in range(layers):
            modules[f"output_blocks.{index}.0"] = (f"up_blocks.{up}.resnets.{j}", "resnet")
            if attention:
                modules[f"output_blocks.{index}.1"] = (f"up_blocks.{up}.attentions.{j}", "attention")
            if j == layers - 1 and up < levels - 1:
                modules.update(_resampler(f"output_blocks.{index}.{1 + attention}",
                                          f"up_blocks.{up}.upsamplers.0",
                                          config["upsample_type"] == "resnet", "conv"))
            index += 1
    return modules


def _split_qkv(fused: torch.Tensor, head_dim: int, legacy_order: bool) -> tuple[torch.Tensor, ...]:
    """q, k, v of a fused 1x1-conv qkv weight (3C, C, 1) or bias (3C), as linear weights/biases."""
    fused = fused.flatten(1) if fused.dim() > 1 else fused
    width, tail = fused.shape[0] // 3, fused.shape[1:]
    if legacy_order:  # QKVAttentionLegacy: rows ordered (head, q|k|v, channel)
        fused = fused.reshape(width // head_dim, 3, head_dim, *tail).transpose(0, 1)
    return tuple(part.clone() for part in fused.reshape(3, width, *tail).unbind(0))


def _convert_attention(part: str, param: str, tensor: torch.Tensor, prefix: str, head_dim: int,
                       legacy_order: bool) -> dict[str, torch.Tensor] | None:
    """diffusers ``Attention`` entries for one AttentionBlock parameter (None if unknown)."""
    if part == "qkv":
        q, k, v = _split_qkv(tensor, head_dim, legacy_order)
        return {f"{prefix}.to_q.{param}": q, f"{prefix}.to_k.{param}": k, f"{prefix}.to_v.{param}": v}
    if part == "proj_out":
        return {f"{prefix}.to_out.0.{param}": tensor.flatten(1) if tensor.dim() > 1 else tensor}
    if part == "norm":
        return {f"{prefix}.group_norm.{param}": tensor}
    return None


def _convert_key(key: str, tensor: torch.Tensor, modules: dict[str, tuple[str, str]],
                 head_dim: int, legacy_order: bool) -> dict[str, torch.Tensor] | None:
    """The diffusers entries for one guided-diffusion entry (None if it maps to nothing)."""
    names = key.split(".")
    for cut in range(len(names) - 1, 0, -1):
        if ".".join(names[:cut]) in modules:
            prefix, kind = modules[".".join(names[:cut])]
            part, param = ".".join(names[cut:-1]), names[-1]
            break
    else:
        return None
    if kind == "module":
        return {".".join([prefix, *names[cut:]]): tensor}
    if kind == "resnet":
        return {f"{prefix}.{_RESNET_PARTS[part]}.{param}": tensor} if part in _RESNET_PARTS else None
    return _convert_attention(part, param, tensor, prefix, head_dim, legacy_order)


def _check_complete(converted: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    """Raise naming every diffusers parameter left unfilled or filled with the wrong shape."""
    with torch.device("meta"):
        expected = UNet2DModel(**config).state_dict()
    missing = sorted(set(expected) - set(converted))
    extra = sorted(set(converted) - set(expected))
    wrong = sorted(f"{k}: {tuple(converted[k].shape)} != {tuple(v.shape)}"
                   for k, v in expected.items() if k in converted and converted[k].shape != v.shape)
    if missing or extra or wrong:
        raise FlagsMismatch("checkpoint does not match its flags: "
                         + "; ".join(f"{label} {items}" for label, items in (
                             ("unfilled diffusers keys", missing), ("unexpected diffusers keys", extra),
                             ("shape mismatches", wrong)) if items))


def convert_adm_state_dict(state_dict: dict[str, torch.Tensor], flags: dict[str, Any]
                           ) -> dict[str, torch.Tensor]:
    """Rename (and split qkv of) a guided-diffusion state dict into ``UNet2DModel`` keys."""
    config = adm_unet_config(flags)
    modules = _module_map(config)
    legacy_order = not resolve_flags(flags)["use_new_attention_order"]
    converted: dict[str, torch.Tensor] = {}
    unmapped = []
    for key, tensor in state_dict.items():
        entries = _convert_key(key, tensor, modules, config["attention_head_dim"], legacy_order)
        if entries is None:
            unmapped.append(key)
        else:
            converted.update(entries)
    if unmapped:
        raise FlagsMismatch(f"guided-diffusion keys with no diffusers counterpart: {unmapped}")
    _check_complete(converted, config)
    return converted


def adm_scheduler(flags: dict[str, Any]) -> DDPMScheduler:
    """guided-diffusion's linear 1000-step schedule (learned-range variance for learn_sigma models)."""
    learned = resolve_flags(flags)["learn_sigma"]
    return DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                         beta_schedule="linear", clip_sample=True,
                         variance_type="learned_range" if learned else "fixed_large")


def adm_to_diffusion(state_dict: dict[str, torch.Tensor], flags: dict[str, Any]) -> DiffusionModel:
    """A float32 ``DiffusionModel`` from a guided-diffusion state dict and its flags."""
    converted = convert_adm_state_dict({k: v.float() for k, v in state_dict.items()}, flags)
    with torch.device("meta"):
        unet = UNet2DModel(**adm_unet_config(flags))
    unet.load_state_dict(converted, assign=True)
    return DiffusionModel(unet.eval(), adm_scheduler(flags))


def read_flags(path: str | Path) -> dict[str, Any]:
    """guided-diffusion flags from a JSON file: ``{"flags": {...}}`` or the flags object itself."""
    data = json.loads(Path(path).read_text())
    return data.get("flags", data)


def _flags_beside(checkpoint: Path) -> tuple[dict[str, Any], str]:
    """Flags of a ``<stem>_config.json`` or ``config.json`` (with a "flags" object) beside the
    file, else the 256x256 unconditional model's; with where they came from."""
    for candidate in (checkpoint.with_name(f"{checkpoint.stem}_config.json"),
                      checkpoint.with_name("config.json")):
        if candidate.is_file() and "flags" in (data := json.loads(candidate.read_text())):
            return data["flags"], f"the flags in {candidate}"
    return ADM_256_UNCOND_FLAGS, DEFAULT_FLAGS_SOURCE


def _shape_flags(state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The flags that a guided-diffusion state dict's keys and shapes tell directly."""
    flags: dict[str, Any] = {"class_cond": "label_emb.weight" in state_dict}
    if "input_blocks.0.0.weight" in state_dict:
        flags["num_channels"] = state_dict["input_blocks.0.0.weight"].shape[0]
    if "out.2.weight" in state_dict:
        flags["learn_sigma"] = state_dict["out.2.weight"].shape[0] == 6
    return flags


def _flags_differ(path: Path, source: str, state_dict: dict[str, torch.Tensor],
                  flags: dict[str, Any]) -> str:
    """Why ``path`` does not convert with ``flags`` and how to pass the right ones."""
    resolved = resolve_flags(flags)
    seen = [f"{name}={value!r} where they say {resolved[name]!r}"
            for name, value in _shape_flags(state_dict).items() if resolved[name] != value]
    return (f"{path} does not match {source}: its flags differ"
            f"{' (the checkpoint has ' + ', '.join(seen) + ')' if seen else ''}. Pass the flags it "
            "was trained with (guided-diffusion's argument names) as JSON, {\"flags\": {...}}: "
            f"`distpure convert-adm {path} OUT_DIR --config FLAGS.json`, or save them as "
            f"{path.with_name(path.stem + '_config.json')}, which load_diffusion reads too")


def load_adm_checkpoint(path: str | Path, flags: dict[str, Any] | None = None) -> DiffusionModel:
    """Load a guided-diffusion checkpoint; flags default to a config beside it, else the 256
    uncond model's. A checkpoint that does not fit them is refused with how to pass its own."""
    path = Path(path)
    flags, source = _flags_beside(path) if flags is None else (flags, "the flags given")
    state_dict = load_state_dict(path)
    try:
        return adm_to_diffusion(state_dict, flags)
    except FlagsMismatch as error:
        raise FlagsMismatch(_flags_differ(path, source, state_dict, flags)) from error


def convert_adm(checkpoint: str | Path, out_dir: str | Path, flags: dict[str, Any] | None = None
                ) -> Path:
    """Write a guided-diffusion checkpoint as a diffusers directory (UNet and scheduler configs)."""
    load_adm_checkpoint(checkpoint, flags).save_pretrained(out_dir)
    return Path(out_dir)
