"""Read an adapter in any layout, check that it fits a model, and attach it to a pipeline.

Layouts: sdtune/diffusers files (`unet.*`, `text_encoder.*`), PEFT folders
(`adapter_config.json` + `adapter_model.safetensors`), and kohya/A1111/civitai files
(`lora_unet_*`, `lora_te_*`: LoRA, LoCon, LyCORIS LoHa and LoKr). The layout is detected from
the keys. Before anything touches the model, every module is looked up in the model and its
shape compared, so an adapter for another family fails with one line naming both families
instead of a shape-mismatch traceback from deep inside peft.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
from safetensors import safe_open

from sdtune.adapters import formats
from sdtune.adapters import layout as file_layout
from sdtune.adapters.formats import Layer
from sdtune.adapters.io import (
    DIFFUSERS_METADATA_KEY,
    METADATA_PREFIX,
    read_diffusers_metadata,
    resolve_adapter_path,
)
from sdtune.errors import SdtuneError, first_line

logger = logging.getLogger("sdtune.adapters")
PEFT_CONFIG = "adapter_config.json"
_UNET_ROOTS = ("down_blocks.", "up_blocks.", "mid_block.", "conv_in", "conv_out", "time_embedding")
# Cross-attention reads text of this width: it tells SD 1 from SD 2 adapters.
FAMILY_OF_TEXT_WIDTH = {768: "sd1", 1024: "sd2"}


@dataclass
class Adapter:
    """An adapter read from disk: its layers by canonical module name, and its header."""

    path: Path
    layout: str  # "diffusers" | "peft" | "kohya"
    layers: dict[str, Layer]
    header: dict[str, str] = field(default_factory=dict)
    dora: bool = False  # DoRA magnitudes present: only diffusers' loader applies them
    magnitudes: dict[str, torch.Tensor] = field(default_factory=dict)  # DoRA, by module
    repairs: list[str] = field(default_factory=list)  # why the file is not in today's layout

    @property
    def family(self) -> str | None:
        """The family its header names (sdtune files) or its cross-attention width implies."""
        named = self.header.get(METADATA_PREFIX + "family")
        if named:
            return named
        for module, layer in self.layers.items():
            if layer.kind == "lora" and module.endswith(("attn2.to_k", "attn2.to_v")):
                return FAMILY_OF_TEXT_WIDTH.get(int(layer.down.flatten(1).shape[1]))
        return None


def model_modules(pipe) -> dict[str, torch.Size]:
    """Canonical name -> weight shape of every Linear/Conv2d of the U-Net and text encoder.

    Modules already wrapped by peft count under their own name with their base weight's shape.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    modules = {}
    for part in formats.PARTS:
        model = getattr(pipe, part, None)
        if model is None:
            continue
        for name, module in model.named_modules():
            if ".base_layer" in name or ".lora_" in name:
                continue
            if isinstance(module, BaseTunerLayer):
                module = module.get_base_layer()
            elif not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            full = formats.strip_text_model(f"{part}.{name}")
            modules[full] = module.weight.shape
    return modules


@lru_cache(maxsize=8)
def family_modules(family: str) -> dict[str, torch.Size]:
    """The modules of a full-size model of `family` (built on the meta device: no memory)."""
    from sdtune.models.families import build_pipeline_from_config

    return model_modules(build_pipeline_from_config(family, empty=True))


def read_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the header of a safetensors file; a torn file is a one-line error."""
    if path.suffix.lower() != ".safetensors":
        raise SdtuneError(f"adapter '{path}' is not a .safetensors file; only safetensors is read")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types for torn files
        raise SdtuneError(f"'{path}' is not a readable safetensors file: {exc}") from None


def _diffusers_alphas(
    layers: dict[str, Layer], header: dict[str, str], path: Path
) -> dict[str, float]:
    """Per-module alphas from diffusers' adapter metadata (lora_alpha and alpha_pattern)."""
    meta = read_diffusers_metadata(header, path)
    if not meta:
        return {}
    alphas = {}
    for module in layers:
        part, _, name = module.partition(".")
        pattern = formats.match_pattern(name, meta.get(f"{part}.alpha_pattern") or {})
        alpha = pattern if pattern is not None else meta.get(f"{part}.lora_alpha")
        if alpha is not None:
            alphas[module] = float(alpha)
    return alphas


def _peft_layers(state: dict[str, torch.Tensor], config_path: Path) -> dict[str, Layer]:
    """A PEFT folder's layers; the model part is told by the module names."""
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    renamed = {}
    for key, value in state.items():
        name = key.removeprefix(formats.PEFT_PREFIX)
        part = formats.UNET if name.startswith(_UNET_ROOTS) else formats.TEXT_ENCODER
        renamed[f"{part}.{name}"] = value
    layers = formats.parse_diffusers(renamed)
    for module, layer in layers.items():
        name = module.partition(".")[2]
        pattern = formats.match_pattern(name, config.get("alpha_pattern") or {})
        layer.alpha = pattern if pattern is not None else config.get("lora_alpha")
    return layers


def read_adapter(path: str | Path, modules: dict[str, torch.Size]) -> Adapter:
    """The adapter at `path` (file, run folder or PEFT folder), named against `modules`."""
    file = resolve_adapter_path(path)
    state, header = read_state(file)
    layout = formats.detect_layout(state)
    if layout == "kohya":
        layers = formats.parse_kohya(state, formats.kohya_table(modules))
    elif layout == "peft":
        layers = _peft_layers(state, file.parent / PEFT_CONFIG)
    else:
        layers = formats.parse_diffusers(state)
        for module, alpha in _diffusers_alphas(layers, header, file).items():
            layers[module].alpha = alpha
    _check_tensors(layers, file)
    dora = any("lora_magnitude_vector" in key for key in state)
    adapter = Adapter(file, layout, layers, header, dora)
    if layout in ("diffusers", "peft"):
        adapter.magnitudes = _magnitudes(state)
    if layout == "diffusers" and DIFFUSERS_METADATA_KEY in header:
        adapter.repairs = file_layout.needs_rewrite(state, read_diffusers_metadata(header, file))
    elif layout == "diffusers":
        adapter.repairs = file_layout.needs_rewrite(state, {})
    return adapter


def _magnitudes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DoRA magnitude vectors by canonical module name (PEFT folders: without their prefix)."""
    found = {}
    for key, value in state.items():
        module = file_layout.split_magnitude_key(key.removeprefix(formats.PEFT_PREFIX))
        if module is not None:
            found[module] = value
    return found


def _check_tensors(layers: dict[str, Layer], file: Path) -> None:
    """LoRA halves are floating-point matrices (or conv kernels); anything else is a bad file."""
    for module, layer in layers.items():
        tensors = [layer.down, layer.up] if layer.kind == "lora" else list(layer.factors.values())
        for t in tensors:
            if not t.is_floating_point() or t.ndim < 2:
                raise SdtuneError(
                    f"adapter '{file}': module '{module}' holds a {t.dtype} tensor of shape "
                    f"{tuple(t.shape)}; LoRA weights must be floating-point matrices"
                )


def _fits(layer: Layer, shape: torch.Size) -> bool:
    if layer.kind != "lora":
        from sdtune.adapters.lowrank import compute_delta

        try:
            compute_delta(layer, shape)
        except (SdtuneError, RuntimeError):
            return False
        return True
    down, up = layer.down, layer.up
    return (
        down.ndim == up.ndim == len(shape)
        and up.shape[0] == shape[0]
        and down.flatten(1).shape[1] == shape[1:].numel()
        and up.flatten(1).shape[1] == down.shape[0]
    )


def _shown(items: list[str]) -> str:
    return ", ".join(items[:3]) + (f" and {len(items) - 3} more" if len(items) > 3 else "")


def check_fits(adapter: Adapter, modules: dict[str, torch.Size], base: str) -> None:
    """Fail, naming the adapter's and the model's family and the first bad keys, unless every
    layer has a module of the right shape in the model."""
    missing = sorted(m for m in adapter.layers if m not in modules)
    wrong = []
    for module, layer in sorted(adapter.layers.items()):
        if module in modules and not _fits(layer, modules[module]):
            got = layer.up.shape[0] if layer.kind == "lora" else "?"
            width = layer.down.flatten(1).shape[1] if layer.kind == "lora" else "?"
            shape = tuple(modules[module])
            wrong.append(f"{module} (adapter out {got} x in {width}, model weight {shape})")
    if not (missing or wrong):
        return
    family = adapter.family or "an unknown family"
    problem = (
        f"{len(missing)} module(s) not in the model: {_shown(missing)}"
        if missing
        else f"{len(wrong)} module(s) of another shape: {_shown(wrong)}"
    )
    raise SdtuneError(
        f"adapter '{adapter.path}' is for {family} and does not fit the {base} base model: "
        f"{problem}; use a base model of the adapter's family"
    )


def check_family(adapter: Adapter, base) -> None:
    """An adapter whose header names a family with another text width does not fit `base`."""
    from sdtune.models.families import FAMILIES

    named = adapter.header.get(METADATA_PREFIX + "family")
    trained_on = FAMILIES.get(named) if named else None
    if trained_on and trained_on.cross_attention_dim != base.cross_attention_dim:
        raise SdtuneError(
            f"adapter '{adapter.path}' was trained on the {named} family but the base model is "
            f"{base.name}; use a base model of the {named} family"
        )


def attach_adapter(pipe, path: str | Path, adapter_name: str) -> Adapter:
    """Read, check and attach the adapter at `path` to `pipe` live, under `adapter_name`.

    A file in the layout sdtune writes goes to diffusers' own loader as it is. Every other
    layout (kohya, PEFT folders, diffusers files in older or mixed names) is converted to LoRA
    layers (LoHa/LoKr exactly, by SVD at their numerical rank) with alpha folded into `up`,
    DoRA magnitudes kept, and handed over as a dict; what was repaired is logged in one line.
    """
    from sdtune.adapters.lowrank import as_lora
    from sdtune.models.families import detect_family

    base = detect_family(pipe)
    modules = model_modules(pipe)
    adapter = read_adapter(path, modules)
    check_family(adapter, base)
    check_fits(adapter, modules, base.name)
    as_written = adapter.layout == "diffusers" and DIFFUSERS_METADATA_KEY in adapter.header
    if as_written and not adapter.repairs:
        source = str(adapter.path)
    else:
        layers = {m: as_lora(layer, modules[m]) for m, layer in adapter.layers.items()}
        folded = formats.to_peft_state_dict(layers)
        source = {file_layout.file_prefix(k): v for k, v in folded.items()}
        for module, magnitude in adapter.magnitudes.items():
            source[file_layout.file_prefix(module) + file_layout.MAGNITUDE] = magnitude
        log_repairs(adapter)
    try:
        pipe.load_lora_weights(source, adapter_name=adapter_name)
    except (
        ValueError,
        RuntimeError,
        KeyError,
        TypeError,
    ) as exc:  # TypeError: unknown header field
        raise SdtuneError(
            f"adapter '{adapter.path}' does not fit the base model: {first_line(exc)}"
        ) from None
    return adapter


def log_repairs(adapter: Adapter) -> None:
    """One line saying what of an older diffusers-layout file was read differently, if anything."""
    if adapter.repairs:
        logger.warning(
            "adapter '%s': repaired on loading (%s); all %d modules loaded; "
            "`sdtune convert %s --to diffusers --out NEW.safetensors` rewrites it",
            adapter.path,
            "; ".join(adapter.repairs),
            len(adapter.layers),
            adapter.path,
        )
