"""Single-file checkpoints in the original (LDM/CompVis) layout: read safely, detect, write.

This is the format A1111 and ComfyUI load (`model.diffusion_model.*`, `first_stage_model.*`,
`cond_stage_model.*`; SDXL: `conditioner.embedders.*`). Reading never unpickles code: `.safetensors` is plain data and
`.ckpt`/`.pt` files are opened with `torch.load(weights_only=True)`, which refuses any pickle
that would build an arbitrary object.
"""

from __future__ import annotations

import math
import os
import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sdtune.errors import SdtuneError, first_line, pickle_refusal
from sdtune.models import ldm_keys
from sdtune.models.families import (
    FAMILIES,
    SD1_CONTEXT_DIM,
    SD2_CONTEXT_DIM,
    Family,
    detect_family,
    match_family,
)

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
CHECKPOINT_SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES
FAMILY_METADATA_KEY = "sdtune.family"
# Official SD 2 768 files are v-prediction: "768-v-ema.ckpt" (2.0), "v2-1_768-ema-pruned" (2.1).
_V_NAME = re.compile(r"768|v[-_]?pred", re.IGNORECASE)
_OPENCLIP_H_LAYERS = 24  # blocks of OpenCLIP ViT-H text; diffusers keeps 23
# SDXL checkpoints also hold two tensors text conditioning never uses: CLIP's position ids and
# OpenCLIP's contrastive temperature, trained to its clamp ln(100). Some tools check for them.
_XL_POSITION_IDS = ldm_keys.XL_CLIP_PREFIX + "embeddings.position_ids"
_LOGIT_SCALE = "logit_scale"
# The U-Net's pooled-text + time-ids embedding, only in SDXL; the x4 upscaler has `label_emb.weight`.
_XL_LABEL_EMB = ldm_keys.UNET_PREFIX + "label_emb.0.0.weight"
_XL_REFINER_SHAPE = (1280, 2560)  # refiner U-Net-only files: context width, pooled + 5 time ids
# ComfyUI's mark of a v-prediction SDXL checkpoint: an (empty) tensor named "v_pred".
V_PRED_KEY = "v_pred"
# ...and beside it, of one trained with zero terminal SNR (Lin et al. 2023): "ztsnr".
ZTSNR_KEY = "ztsnr"


def declares_zero_terminal_snr(info: CheckpointInfo) -> bool:
    """Whether a v-prediction checkpoint carries ComfyUI's zero-terminal-SNR mark."""
    return V_PRED_KEY in info.shapes and ZTSNR_KEY in info.shapes


@dataclass
class CheckpointInfo:
    """What detection needs from a checkpoint, read without loading every tensor."""

    path: Path
    shapes: dict[str, tuple[int, ...]]
    metadata: dict[str, str] = field(default_factory=dict)


def _unwrap(obj: Any) -> dict:
    """Original `.ckpt` files nest the weights under "state_dict" (beside the training step)."""
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise SdtuneError(f"checkpoint holds a {type(obj).__name__}, expected a dict of tensors")
    return obj


def _torch_load(path: Path, mmap: bool) -> dict:
    try:
        return _unwrap(torch.load(path, map_location="cpu", weights_only=True, mmap=mmap))
    except pickle.UnpicklingError as exc:
        reason = pickle_refusal(exc)
        if reason is None:
            raise SdtuneError(f"{path} cannot be read: {first_line(exc)}") from None
        raise SdtuneError(
            f"{path} holds code or objects other than tensors and was not loaded ({reason}); "
            "use a .safetensors file, or convert this one on a machine where you trust it"
        ) from None


def _check_suffix(path: Path) -> None:
    if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
        raise SdtuneError(
            f"{path}: unsupported checkpoint type '{path.suffix}'; expected one of "
            + ", ".join(CHECKPOINT_SUFFIXES)
        )


def load_original_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a single-file checkpoint, on the CPU, without running pickled code."""
    path = Path(path)
    _check_suffix(path)
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return _torch_load(path, mmap=False)
    except RuntimeError as exc:
        raise SdtuneError(f"{path}: not a readable torch checkpoint ({exc})") from None


def read_checkpoint_info(path: str | os.PathLike) -> CheckpointInfo:
    """Key names, shapes and header metadata, cheaply (safetensors header; mmap for pickles)."""
    path = Path(path)
    _check_suffix(path)
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
                return CheckpointInfo(path, shapes, dict(f.metadata() or {}))
        except Exception as exc:  # safetensors raises its own error types for a corrupt header
            raise SdtuneError(f"{path}: not a readable .safetensors file ({exc})") from None
    try:
        state_dict = _torch_load(path, mmap=True)
    except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
        state_dict = load_original_state_dict(path)
    shapes = {k: tuple(v.shape) for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    return CheckpointInfo(path, shapes)


def _is_sd2_checkpoint(shapes: dict[str, tuple[int, ...]]) -> bool:
    """SD 2 if the text encoder is OpenCLIP; else the U-Net's context width or projection kind."""
    if any(k.startswith(ldm_keys.OPENCLIP_PREFIX) for k in shapes):
        return True
    if any(k.startswith("cond_stage_model.transformer.") for k in shapes):
        return False
    for key, shape in shapes.items():
        if key.startswith(ldm_keys.UNET_PREFIX) and key.endswith("attn2.to_k.weight"):
            if shape[1] in (SD1_CONTEXT_DIM, SD2_CONTEXT_DIM):
                return shape[1] == SD2_CONTEXT_DIM
        if key.startswith(ldm_keys.UNET_PREFIX) and key.endswith(".proj_in.weight"):
            return len(shape) == 2  # SD 2 projects with linear layers, SD 1 with 1x1 convs
    return False


def _declares_v_prediction(path: Path) -> bool | None:
    """v-prediction declared by a sibling `.yaml` (A1111 convention); None if there is none."""
    config = path.with_suffix(".yaml")
    if not config.is_file():
        return None
    import yaml

    try:
        params = (yaml.safe_load(config.read_text(encoding="utf-8")) or {})["model"]["params"]
    except (yaml.YAMLError, KeyError, TypeError):
        return None
    return params.get("parameterization") == "v"


def detect_family_from_checkpoint(info: CheckpointInfo) -> Family:
    """The family of an original-layout checkpoint, from its key names and shapes.

    SD 2 epsilon and v-prediction weights look alike; the sibling `.yaml`'s `parameterization`,
    then a file name containing "768" or "v-pred", decide; otherwise sd2-base, with a warning.
    """
    shapes = info.shapes
    named = info.metadata.get(FAMILY_METADATA_KEY)
    if named in FAMILIES:
        return _xl_prediction(FAMILIES[named], shapes)
    conv_in = shapes.get(ldm_keys.UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is None:
        kind = (
            "a LoRA/adapter" if any(k.startswith("lora_") for k in shapes) else "not a base model"
        )
        raise SdtuneError(
            f"{info.path}: no U-Net weights (model.diffusion_model.*): {kind}; "
            "expected a full Stable Diffusion checkpoint"
        )
    xl = _xl_kind_of_checkpoint(shapes)
    if xl is not None:
        family = match_family(conv_in[1], False, "epsilon", xl=xl, source=str(info.path))
        return _xl_prediction(family, shapes)
    sd2 = _is_sd2_checkpoint(shapes)
    upscaler = ldm_keys.UNET_PREFIX + "label_emb.weight" in shapes
    family = match_family(conv_in[1], sd2, "epsilon", is_upscaler=upscaler, source=str(info.path))
    if family.name != "sd2-base":
        return family
    v_pred = _declares_v_prediction(info.path)
    if v_pred is None:
        v_pred = bool(_V_NAME.search(info.path.name))
        if not v_pred:
            warnings.warn(
                f"{info.path.name}: SD 2 epsilon and v-prediction weights look alike; loading as "
                "sd2-base (512, epsilon). Pass family='sd2-v' if this is a 768-v model.",
                stacklevel=3,
            )
    return FAMILIES["sd2-v"] if v_pred else family


def _xl_kind_of_checkpoint(shapes: dict[str, tuple[int, ...]]) -> str | None:
    """ "base", "refiner" or None (not SDXL), from the keys of an original-layout file.

    The text encoders' places decide (bigG is embedder 1 in the base, 0 in the refiner); a
    file with the U-Net alone is a refiner only with the refiner's real widths.
    """
    if any(k.startswith(ldm_keys.XL_OPENCLIP_PREFIX) for k in shapes):
        return "base"
    if any(k.startswith(ldm_keys.XL_REFINER_OPENCLIP_PREFIX) for k in shapes):
        return "refiner"
    label = shapes.get(_XL_LABEL_EMB)
    if label is None:
        return None
    for key, shape in shapes.items():
        if key.startswith(ldm_keys.UNET_PREFIX) and key.endswith("attn2.to_k.weight"):
            return "refiner" if (shape[1], label[1]) == _XL_REFINER_SHAPE else "base"
    return "base"


def _xl_prediction(family: Family, shapes: dict[str, tuple[int, ...]]) -> Family:
    """A v-prediction SDXL family when the file carries the `v_pred` mark."""
    if family.is_xl and V_PRED_KEY in shapes:
        return match_family(
            family.unet_in_channels,
            False,
            "v_prediction",
            xl="refiner" if family.name == "sdxl-refiner" else "base",
        )
    return family


def _xl_text_to_original(pipe: Any, family: Family) -> dict[str, torch.Tensor]:
    """SDXL's text encoders under `conditioner.embedders.*`, as Stability's files have them."""
    state = {}
    if "text_encoder" in family.text_encoders:
        state.update(
            ldm_keys.clip_to_original(pipe.text_encoder.state_dict(), ldm_keys.XL_CLIP_PREFIX)
        )
        positions = pipe.text_encoder.config.max_position_embeddings
        state[_XL_POSITION_IDS] = torch.arange(positions, dtype=torch.int64)[None]
    refiner = family.text_encoders == ("text_encoder_2",)
    prefix = ldm_keys.XL_REFINER_OPENCLIP_PREFIX if refiner else ldm_keys.XL_OPENCLIP_PREFIX
    state.update(ldm_keys.openclip_to_original(pipe.text_encoder_2.state_dict(), prefix=prefix))
    state[prefix + _LOGIT_SCALE] = torch.tensor(math.log(100.0))
    if family.prediction_type == "v_prediction":
        state[V_PRED_KEY] = torch.zeros(0)
        if pipe.scheduler.config.get("rescale_betas_zero_snr"):
            state[ZTSNR_KEY] = torch.zeros(0)
    return state


def pipeline_to_original(pipe: Any) -> tuple[dict[str, torch.Tensor], Family]:
    """The U-Net, VAE and text encoder(s) of `pipe` as one original-layout state dict."""
    family = detect_family(pipe)
    state = {}
    state.update(ldm_keys.unet_to_original(pipe.unet.state_dict(), pipe.unet.config))
    state.update(ldm_keys.vae_to_original(pipe.vae.state_dict(), pipe.vae.config))
    if family.is_xl:
        state.update(_xl_text_to_original(pipe, family))
        return state, family
    text = pipe.text_encoder.state_dict()
    if family.sd_version == 2:
        layers = pipe.text_encoder.config.num_hidden_layers
        pad = _OPENCLIP_H_LAYERS if layers == _OPENCLIP_H_LAYERS - 1 else 0
        state.update(ldm_keys.openclip_to_original(text, pad_to_layers=pad))
    else:
        state.update(ldm_keys.clip_to_original(text))
    return state, family


def save_original_checkpoint(
    pipe: Any, path: str | os.PathLike, dtype: torch.dtype | None = None
) -> Path:
    """Write `pipe` as one `.safetensors` in the original layout (for A1111/ComfyUI).

    `dtype` (e.g. torch.float16) casts floating-point weights. The family is recorded in the
    header so sdtune reloads a v-prediction export as such. Written to a temporary name first.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise SdtuneError(f"{path}: single-file checkpoints are written as .safetensors only")
    state, family = pipeline_to_original(pipe)
    tensors = {}
    for key, value in state.items():
        value = value.detach().to("cpu")
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        tensors[key] = value.contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", FAMILY_METADATA_KEY: family.name})
    os.replace(tmp, path)
    return path
