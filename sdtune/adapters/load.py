"""Read an adapter in any layout, check that it fits a model, and attach it to a pipeline.

Layouts: sdtune/diffusers files (`unet.*`, `text_encoder.*`, SDXL's `text_encoder_2.*`), PEFT folders
(`adapter_config.json` + `adapter_model.safetensors`), and kohya/A1111/civitai files
(`lora_unet_*`, `lora_te_*`, SDXL's `lora_te1_*`/`lora_te2_*`: LoRA, LoCon, LyCORIS LoHa and
LoKr). The layout is detected from
the keys. Before anything touches the model, every module is looked up in the model and its
shape compared, so an adapter for another family fails with one line naming both families
instead of a shape-mismatch traceback from deep inside peft.
"""

from __future__ import annotations

import json
import logging
import re
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
# Cross-attention reads text of this width: it tells SD 1, SD 2 and SDXL adapters apart.
FAMILY_OF_TEXT_WIDTH = {768: "sd1", 1024: "sd2", 2048: "sdxl", 1280: "sdxl-refiner"}
# Names only SDXL's kohya layout has: the second encoder, the original U-Net's blocks.
_XL_KOHYA_NAMES = re.compile(r"lora_te2_|lora_unet_(input_blocks|middle_block|output_blocks)_")
_CROSS_ATTENTION_K = re.compile(r"attn2[._]to_k$")


@dataclass
class Adapter:
    """An adapter read from disk: its layers by canonical module name, and its header."""

    path: Path
    layout: str  # "diffusers" | "peft" | "kohya"
    layers: dict[str, Layer]
    header: dict[str, str] = field(default_factory=dict)
    dora: bool = False  # DoRA magnitudes present: only diffusers' loader applies them
    repairs: list[str] = field(default_factory=list)  # why the file is not in today's layout

    @property
    def family(self) -> str | None:
        """The family its header names (sdtune files), or the one its names or cross-attention
        width imply: a second text encoder or original U-Net block names are SDXL's."""
        from sdtune.adapters.lowrank import compute_out_in

        named = self.header.get(METADATA_PREFIX + "family")
        if named:
            return named
        if any(
            m.startswith(formats.TEXT_ENCODER_2 + ".") or _XL_KOHYA_NAMES.match(m)
            for m in self.layers
        ):
            return "sdxl"
        for module, layer in self.layers.items():
            if _CROSS_ATTENTION_K.search(module):
                return FAMILY_OF_TEXT_WIDTH.get(compute_out_in(layer)[1])
        return None


def model_modules(pipe) -> formats.ModelModules:
    """Canonical name -> weight shape of every Linear/Conv2d of the U-Net and text encoders.

    Modules already wrapped by peft count under their own name with their base weight's shape.
    An SDXL model's modules also carry their original U-Net names (`ModelModules.original`).
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    from sdtune.models.families import xl_kind

    modules = formats.ModelModules()
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
    if xl_kind(dict(pipe.unet.config)) is not None:
        prefix = formats.UNET + "."
        paths = [m[len(prefix) :] for m in modules if m.startswith(prefix)]
        modules.original = formats.original_unet_names(pipe.unet.config, paths)
    return modules


@lru_cache(maxsize=8)
def family_modules(family: str) -> formats.ModelModules:
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


def _config_alpha(name: str, config: dict, rank: int) -> float | None:
    """A module's alpha as `alpha / rank` scale: peft's `alpha_pattern` (a regular expression
    matched on the name's end) over `lora_alpha`; with `use_rslora` the scale is alpha / sqrt(r)."""
    alpha = formats.match_pattern(name, config.get("alpha_pattern") or {})
    alpha = alpha if alpha is not None else config.get("lora_alpha")
    if alpha is None:
        return None
    return float(alpha) * rank**0.5 if config.get("use_rslora") else float(alpha)


def _diffusers_alphas(
    layers: dict[str, Layer], header: dict[str, str], path: Path
) -> dict[str, float]:
    """Per-module alphas from diffusers' adapter metadata (lora_alpha and alpha_pattern)."""
    meta = read_diffusers_metadata(header, path)
    if not meta:
        return {}
    alphas = {}
    for module, layer in layers.items():
        part, _, name = module.partition(".")
        config = {k.partition(".")[2]: v for k, v in meta.items() if k.startswith(part + ".")}
        alpha = _config_alpha(name, config, layer.rank)
        if alpha is not None:
            alphas[module] = alpha
    return alphas


def _peft_layers(state: dict[str, torch.Tensor]) -> dict[str, Layer]:
    """A PEFT folder's layers (one model: a U-Net or a text encoder); the model part is told by
    the module names. A text encoder is taken for the first: a folder does not say which."""
    renamed = {}
    for key, value in state.items():
        name = key.removeprefix(formats.PEFT_PREFIX)
        part = formats.UNET if name.startswith(_UNET_ROOTS) else formats.TEXT_ENCODER
        renamed[f"{part}.{name}"] = value
    return formats.parse_diffusers(renamed)


def _peft_alphas(layers: dict[str, Layer], config_path: Path) -> None:
    """Each layer's alpha from the folder's `adapter_config.json` (absent: alpha = rank)."""
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    for module, layer in layers.items():
        layer.alpha = _config_alpha(module.partition(".")[2], config, layer.rank)


def read_adapter(path: str | Path, modules: dict[str, torch.Size]) -> Adapter:
    """The adapter at `path` (file, run folder or PEFT folder), named against `modules`."""
    file = resolve_adapter_path(path)
    state, header = read_state(file)
    layout = formats.detect_layout(state)
    if layout == "kohya":
        layers = formats.parse_kohya(state, formats.kohya_table(modules))
    else:
        layers = _peft_layers(state) if layout == "peft" else formats.parse_diffusers(state)
    _check_tensors(layers, file)
    if layout == "peft":
        _peft_alphas(layers, file.parent / PEFT_CONFIG)
    elif layout == "diffusers":
        for module, alpha in _diffusers_alphas(layers, header, file).items():
            layers[module].alpha = alpha
    for module, layer in layers.items():
        layer.shape = modules.get(module)
    dora = any(layer.magnitude is not None for layer in layers.values())
    adapter = Adapter(file, layout, layers, header, dora)
    if layout == "diffusers":  # what of an earlier sdtune layout has to be read differently
        meta = read_diffusers_metadata(header, file) if DIFFUSERS_METADATA_KEY in header else {}
        adapter.repairs = file_layout.needs_rewrite(state, meta)
    return adapter


def _check_tensors(layers: dict[str, Layer], file: Path) -> None:
    """LoRA halves are floating-point matrices (or conv kernels); anything else is a bad file."""
    for module, layer in layers.items():
        for t in layer.tensors:
            if not t.is_floating_point() or (t.ndim < 2 and t is not layer.magnitude):
                raise SdtuneError(
                    f"adapter '{file}': module '{module}' holds a {t.dtype} tensor of shape "
                    f"{tuple(t.shape)}; LoRA weights must be floating-point matrices"
                )


def _fits(layer: Layer, shape: torch.Size) -> bool:
    """Whether the layer's factors multiply out to a change of `shape` (checked on the meta
    device: shapes only, no arithmetic), with a magnitude per output row for DoRA."""
    from dataclasses import replace

    from sdtune.adapters.lowrank import compute_delta

    def meta(t):
        return None if t is None else t.to("meta")

    factors = {k: meta(v) for k, v in layer.factors.items()}
    probe = replace(layer, down=meta(layer.down), up=meta(layer.up), factors=factors)
    try:
        compute_delta(probe, shape)
    except (RuntimeError, SdtuneError, KeyError, IndexError, ValueError):
        return False
    if layer.magnitude is not None and layer.magnitude.numel() != shape[0]:
        return False
    return layer.kind != "lora" or layer.down.ndim == len(shape) == layer.up.ndim


def _shown(items: list[str]) -> str:
    return ", ".join(items[:3]) + (f" and {len(items) - 3} more" if len(items) > 3 else "")


def check_fits(adapter: Adapter, modules: dict[str, torch.Size], base: str) -> None:
    """Fail, naming the adapter's and the model's family and the first bad keys, unless every
    layer has a module of the right shape in the model."""
    missing = sorted(m for m in adapter.layers if m not in modules)
    wrong = []
    for module, layer in sorted(adapter.layers.items()):
        if module in modules and not _fits(layer, modules[module]):
            from sdtune.adapters.lowrank import compute_out_in

            got, width = compute_out_in(layer)
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
    """An adapter that its header says (sdtune's family, kohya's ss_base_model_version) is for
    a family of another model line or text width does not fit `base`; nor does one whose names
    are another line's (SDXL's second encoder or original U-Net blocks, on SD 1/2, or the
    reverse): SD 1 on SDXL, SDXL on SD 2, and so on. Both families are named."""
    from sdtune.adapters.export import named_family
    from sdtune.models.families import FAMILIES

    named = named_family(adapter.header)
    trained_on = FAMILIES.get(named) if named else None
    if trained_on and (
        trained_on.line != base.line or trained_on.cross_attention_dim != base.cross_attention_dim
    ):
        raise SdtuneError(
            f"adapter '{adapter.path}' was trained on the {named} family but the base model is "
            f"{base.name}; use a base model of the {named} family"
        )
    guessed = adapter.family if named is None else None
    line = "sdxl" if guessed and guessed.startswith("sdxl") else guessed
    if line and line != base.line and (line == "sdxl" or base.line == "sdxl"):
        raise SdtuneError(
            f"adapter '{adapter.path}' is an {guessed} adapter (its module names and widths) but "
            f"the base model is {base.name}; use a base model of the {guessed} family"
        )


def _lora_for_peft(pipe, adapter: Adapter, modules: dict) -> dict[str, torch.Tensor]:
    """Every layer as an exact LoRA (no SVD) in peft's names, alpha folded in.

    A DoRA adapter whose file gives some modules no magnitude gets, for those, the norm of
    their adapted weight: peft would otherwise rescale them to the base weight's norm.
    """
    from sdtune.adapters.lowrank import as_lora, compute_adapted_weight

    layers = {m: as_lora(layer, modules[m]) for m, layer in adapter.layers.items()}
    if adapter.dora:
        for module, layer in layers.items():
            if layer.magnitude is None:
                weight = module_weight(pipe, module).detach()
                layer.magnitude = compute_adapted_weight(layer, weight).flatten(1).norm(dim=1)
    state = formats.to_peft_state_dict(layers)
    for part in formats.TEXT_PARTS:
        text = getattr(pipe, part, None)
        if text is None or not hasattr(text, "text_model"):
            continue
        # transformers 4 (and transformers 5's CLIPTextModelWithProjection) name the level
        prefix = part + "."
        state = {
            (prefix + _in_text_model(text, k[len(prefix) :]) if k.startswith(prefix) else k): v
            for k, v in state.items()
        }
    return state


def _in_text_model(model, name: str) -> str:
    """`name` of a text encoder's module, under `text_model.` where the model has that level
    (everything but CLIPTextModelWithProjection's `text_projection`)."""
    if hasattr(model, "text_model") and not name.startswith(("text_model.", "text_projection")):
        return "text_model." + name
    return name


def module_weight(pipe, module: str) -> torch.nn.Parameter:
    """The base weight of a canonical module of `pipe` (under any peft wrapper)."""
    part, _, name = module.partition(".")
    model = getattr(pipe, part)
    if part in formats.TEXT_PARTS:
        name = _in_text_model(model, name)
    target = model.get_submodule(name)
    if hasattr(target, "get_base_layer"):
        target = target.get_base_layer()
    return target.weight


def attach_adapter(pipe, path: str | Path, adapter_name: str) -> Adapter:
    """Read, check and attach the adapter at `path` to `pipe` live, under `adapter_name`.

    Every layout is read by sdtune (so every loading path applies the same layers at the same
    strength, whatever key spelling or alpha_pattern the file uses) and handed to diffusers as
    exact LoRA layers with alpha folded into `up`: LoHa, LoKr and Tucker layers in their exact
    LoRA form, DoRA with its magnitudes. What was repaired of a file in an earlier sdtune
    layout is logged in one line.
    """
    from sdtune.models.families import detect_family

    base = detect_family(pipe)
    modules = model_modules(pipe)
    adapter = read_adapter(path, modules)
    check_family(adapter, base)
    check_fits(adapter, modules, base.name)
    source = _lora_for_peft(pipe, adapter, modules)
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
