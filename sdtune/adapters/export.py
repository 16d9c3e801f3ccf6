"""Convert adapters between layouts, checking every key against the target family first.

`export_kohya` writes the file A1111, ComfyUI and kohya's tools read (keys in `formats`), with
kohya's `ss_*` header fields beside sdtune's own. `export_diffusers` writes the layout sdtune
trains into, which diffusers' `load_lora_weights` and peft read unchanged. Nothing is
written unless every module maps to a module of the target family's model, so a file that
would give "lora key not loaded" in a UI is never produced.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from sdtune import __version__
from sdtune.adapters import formats
from sdtune.adapters import layout as file_layout
from sdtune.adapters.check import check_file_before_write
from sdtune.adapters.formats import Layer
from sdtune.adapters.io import (
    DIFFUSERS_METADATA_KEY,
    METADATA_PREFIX,
    check_writable,
    resolve_adapter_path,
    write_safetensors,
)
from sdtune.adapters.load import Adapter, family_modules, model_modules, read_adapter
from sdtune.errors import SdtuneError

_LOADERS_NETWORK_MODULE = "networks.lora"
SDXL_BASE_MODEL_VERSION = "sdxl_base_v1-0"  # sd-scripts' SDXL_MODEL_VERSION_STR
SDXL_REFINER_MODEL_VERSION = "sdxl_refiner_v1-0"
# ModelSpec (Stability AI's header convention, written by sd-scripts too): architecture ids.
MODELSPEC_VERSION = "1.0.0"
_MODELSPEC_ARCH = {
    "sd1": "stable-diffusion-v1",
    "sd2": "stable-diffusion-v2-512",
    "sd2-v": "stable-diffusion-v2-768-v",
    "sdxl": "stable-diffusion-xl-v1-base",
    "sdxl-refiner": "stable-diffusion-xl-v1-refiner",
}
_SGM = "https://github.com/Stability-AI/generative-models"


def base_model_version(family) -> str:
    """kohya's `ss_base_model_version`: "sd_v1"/"sd_v2" (+ "_v" for v-prediction), or SDXL's
    "sdxl_base_v1-0"."""
    if family.is_xl:  # the refiner has OpenCLIP bigG alone
        refiner = len(family.text_encoders) == 1
        return SDXL_REFINER_MODEL_VERSION if refiner else SDXL_BASE_MODEL_VERSION
    version = "sd_v2" if family.sd_version == 2 else "sd_v1"
    return version + ("_v" if family.prediction_type == "v_prediction" else "")


def modelspec_architecture(family) -> str:
    """ModelSpec's `modelspec.architecture` of a LoRA for `family` (e.g. SDXL's
    "stable-diffusion-xl-v1-base/lora")."""
    if family.is_xl:
        key = "sdxl-refiner" if base_model_version(family) == SDXL_REFINER_MODEL_VERSION else "sdxl"
    elif family.sd_version == 2:
        key = "sd2-v" if family.prediction_type == "v_prediction" else "sd2"
    else:
        key = "sd1"
    return _MODELSPEC_ARCH[key] + "/lora"


def modelspec_metadata(family, resolution, info: dict[str, str]) -> dict[str, str]:
    """ModelSpec's required fields of a LoRA for `family` (what sd-scripts writes beside ss_*);
    the prediction type is the one the adapter was trained with, where its header says."""
    v = info.get("prediction_type", family.prediction_type) == "v_prediction"
    trigger = info.get("trigger", "").strip('"')
    trigger = "" if trigger == "null" else trigger
    return {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": modelspec_architecture(family),
        "modelspec.implementation": _SGM if family.is_xl else "diffusers",
        "modelspec.title": f"{family.name} LoRA" + (f" ({trigger})" if trigger else ""),
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.prediction_type": "v" if v else "epsilon",
    }


def named_family(header: dict[str, str]) -> str | None:
    """The family an adapter file's header names (sdtune's key, else kohya's ss_* fields, else
    ModelSpec's architecture)."""
    named = header.get(METADATA_PREFIX + "family")
    if named:
        return named
    version = header.get("ss_base_model_version", "")
    arch = header.get("modelspec.architecture", "")
    if version.startswith("sdxl_refiner") or arch.startswith(_MODELSPEC_ARCH["sdxl-refiner"]):
        return "sdxl-refiner"
    if version.startswith("sdxl") or arch.startswith("stable-diffusion-xl"):
        return "sdxl"
    if version.startswith("sd_v2") or header.get("ss_v2", "").lower() == "true":
        return "sd2-v" if version.endswith("_v") else "sd2-base"
    if version.startswith("sd_v1"):
        return "sd1"
    return None


def same_base(first: str, second: str) -> bool:
    """Whether two families share a base model (SD 1 vs 2, epsilon vs v), as kohya's
    ss_base_model_version tells them apart: sd1 and sd1-inpaint do, sd1 and sd2-base do not."""
    from sdtune.models.families import get_family

    return base_model_version(get_family(first)) == base_model_version(get_family(second))


def infer_family(header: dict[str, str], adapter_family: str | None = None) -> str:
    """The family an adapter file names: sdtune's header, kohya's ss_* fields, else its widths."""
    named = named_family(header)
    if named:
        return named
    if adapter_family == "sd2":
        return "sd2-base"
    if adapter_family in ("sd1", "sdxl", "sdxl-refiner"):
        return adapter_family
    raise SdtuneError(
        "cannot tell the adapter's model family from its header or shapes; pass --family "
        "(sd1, sd2-base, sd2-v, sdxl, ...)"
    )


def read_for_family(
    path: str | Path, family: str | None, base=None
) -> tuple[Adapter, object, dict]:
    """The adapter at `path`, named against a model, that model's family and its modules.

    The model is `base` (a pipeline) when given, else a full-size model of `family` (given or
    read from the file). Every module must exist in it, and an adapter whose cross-attention
    reads another text width (768: SD 1, 1024: SD 2, 2048: SDXL) or whose names are of
    another model line (SDXL's second encoder) is refused, naming both families.
    """
    from sdtune.models.families import FAMILIES, detect_family, get_family

    if base is not None:
        fam = get_family(family) if family else detect_family(base)
        modules = model_modules(base)
    else:
        if family is None:  # the header says, or the names and widths do (read against SD 2)
            named = named_family(_read_header(path))
            family = named if named in FAMILIES else None
        if family is None:
            probe = read_adapter(path, family_modules("sd2-base"))
            family = infer_family(probe.header, probe.family)
        fam = get_family(family)
        modules = family_modules(fam.name)
    if base is None:
        _check_named_family(path, fam.name)
    adapter = read_adapter(path, modules)
    guessed = adapter.family
    line = guessed if guessed in ("sd1", "sd2") else getattr(FAMILIES.get(guessed), "line", None)
    if line is not None and line != fam.line:
        raise SdtuneError(
            f"'{adapter.path}' is an {guessed} adapter (its module names and text widths) but "
            f"the target family is {fam.name}; pass the adapter's own family"
        )
    missing = sorted(m for m in adapter.layers if m not in modules)
    if missing:
        shown = ", ".join(missing[:3]) + (
            f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        )
        raise SdtuneError(
            f"'{adapter.path}': {len(missing)} key(s) map to no module of the {fam.name} model: "
            f"{shown}"
        )
    return adapter, fam, modules


def _read_header(path: str | Path) -> dict[str, str]:
    """The header of an adapter file; {} where it cannot be read (read_adapter then says why)."""
    from safetensors import safe_open

    try:
        with safe_open(str(resolve_adapter_path(path)), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # noqa: BLE001 - not readable here: read_adapter names the problem
        return {}


def _check_named_family(path: str | Path, family: str) -> None:
    """Refuse a `--family` that contradicts the family the file's header names."""
    from sdtune.models.families import FAMILIES

    named = named_family(_read_header(path))
    if named in FAMILIES and not same_base(named, family):
        raise SdtuneError(
            f"'{path}' says it is a {named} adapter but --family is {family}; --family is only "
            "for files that do not say, so drop it"
        )


def _lora_only(adapter: Adapter) -> dict[str, Layer]:
    if adapter.dora:
        raise SdtuneError(f"'{adapter.path}' is a DoRA adapter; kohya LoRA cannot hold it")
    other = sorted(m for m, layer in adapter.layers.items() if layer.kind != "lora")
    if other:
        raise SdtuneError(
            f"'{adapter.path}' holds {adapter.layers[other[0]].kind} layers ({other[0]}); "
            "only LoRA/LoCon can be exported"
        )
    return adapter.layers


def kohya_metadata(layers: dict[str, Layer], header: dict[str, str], family) -> dict[str, str]:
    """kohya's `ss_*` fields (what A1111's and civitai's pages show) plus sdtune's own keys."""
    ranks = Counter(layer.rank for layer in layers.values())
    alphas = Counter(
        layer.alpha if layer.alpha is not None else layer.rank for layer in layers.values()
    )
    info = {
        k[len(METADATA_PREFIX) :]: v for k, v in header.items() if k.startswith(METADATA_PREFIX)
    }
    resolution = info.get("resolution", str(family.resolution))
    meta = {
        "ss_network_module": _LOADERS_NETWORK_MODULE,
        "ss_network_dim": str(ranks.most_common(1)[0][0]),
        "ss_network_alpha": f"{alphas.most_common(1)[0][0]:g}",
        "ss_base_model_version": base_model_version(family),
        "ss_v2": str(family.sd_version == 2 and not family.is_xl),
        "ss_v_parameterization": str(
            info.get("prediction_type", family.prediction_type) == "v_prediction"
        ),
        "ss_sd_model_name": info.get("base_model", family.name),
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_training_comment": f"exported by sdtune {__version__}",
        **modelspec_metadata(family, resolution, info),
    }
    conv = [layer for layer in layers.values() if layer.down.ndim == 4 and layer.down.shape[-1] > 1]
    if conv:
        conv_alpha = conv[0].alpha if conv[0].alpha is not None else conv[0].rank
        args = {"conv_dim": str(conv[0].rank), "conv_alpha": f"{conv_alpha:g}"}
        meta["ss_network_args"] = json.dumps(args)
    if "tag_frequency" in info:
        meta["ss_tag_frequency"] = info["tag_frequency"]
    for key, value in header.items():
        if key.startswith(METADATA_PREFIX):
            meta[key] = value
    meta[METADATA_PREFIX + "family"] = family.name
    meta[METADATA_PREFIX + "exported_from"] = "diffusers"
    return meta


def export_kohya(
    adapter_path: str | Path,
    out_path: str | Path,
    family: str | None = None,
    overwrite: bool = False,
    base=None,
) -> Path:
    """Write the adapter at `adapter_path` as a kohya/A1111/ComfyUI `.safetensors` at `out_path`.

    `family` is the base model family (e.g. "sd1", "sd2-v"); None reads it from the header.
    `base`, a pipeline (e.g. the one just trained), is the model to check the keys against;
    without it, a full-size model of the family (built on the meta device) is used.
    Fails, naming the keys, if any module is not part of that model, or if diffusers,
    AUTOMATIC1111 or ComfyUI would not load every module (`sdtune.adapters.check`).
    """
    out_path = check_writable(out_path, overwrite)
    adapter, fam, modules = read_for_family(adapter_path, family, base)
    layers = _lora_only(adapter)
    state = formats.to_kohya_state_dict(layers, getattr(modules, "original", None))
    table = formats.kohya_table(modules)
    names = {key.partition(".")[0] for key in state}
    unmapped = sorted(names - table.keys())
    if unmapped:  # cannot happen unless the key map is wrong: then never write the file
        raise SdtuneError(f"kohya names {unmapped[:3]} map to no module of the {fam.name} model")
    meta = kohya_metadata(layers, adapter.header, fam)
    check_file_before_write(state, {"format": "pt", **meta}, fam.name, base)
    return write_safetensors(out_path, state, meta, overwrite)


def export_diffusers(
    adapter_path: str | Path,
    out_path: str | Path,
    family: str | None = None,
    overwrite: bool = False,
    base=None,
) -> Path:
    """Write any adapter, checked with diffusers first, in the layout sdtune trains into (`sdtune.adapters.layout`): PEFT
    names, real alphas and the LoraConfig fields in diffusers' metadata, DoRA magnitudes kept.

    This is also how a file of the earlier mixed layout is rewritten. LoHa/LoKr layers become
    LoRA at their exact rank, which needs the modules' shapes: pass `base` for a model that is
    not full-size.
    """
    from sdtune.adapters.lowrank import as_lora

    out_path = check_writable(out_path, overwrite)
    adapter, fam, modules = read_for_family(adapter_path, family, base)
    layers = {m: as_lora(layer, modules[m]) for m, layer in adapter.layers.items()}
    meta = {k: v for k, v in adapter.header.items() if k.startswith(METADATA_PREFIX)}
    meta[METADATA_PREFIX + "family"] = fam.name
    meta[METADATA_PREFIX + "exported_from"] = adapter.layout
    magnitudes = {m: x.magnitude for m, x in adapter.layers.items() if x.magnitude is not None}
    state, per_part = file_layout.layers_to_file(layers, magnitudes)
    meta[DIFFUSERS_METADATA_KEY] = file_layout.metadata_header(per_part)
    check_file_before_write(state, {"format": "pt", **meta}, fam.name, base)
    return write_safetensors(out_path, state, meta, overwrite)


def write_layers(
    layers: dict[str, Layer],
    out_path: str | Path,
    family: str,
    layout: str = "diffusers",
    info: dict[str, str] | None = None,
    overwrite: bool = False,
    modules: dict | None = None,
) -> Path:
    """Write LoRA layers made by merge/resize/extract in `layout` ("diffusers" or "kohya").

    kohya names are checked against `modules` (default: the full-size family's).
    """
    from sdtune.models.families import get_family

    fam = get_family(family)
    header = {METADATA_PREFIX + k: v for k, v in (info or {}).items()}
    header[METADATA_PREFIX + "family"] = fam.name
    if layout == "kohya":
        modules = modules or family_modules(fam.name)
        original = getattr(modules, "original", None)
        table = formats.kohya_table(modules)
        unmapped = sorted(m for m in layers if formats.kohya_name(m, original) not in table)
        if unmapped:
            raise SdtuneError(f"modules {unmapped[:3]} are not part of the {fam.name} model")
        state = formats.to_kohya_state_dict(layers, original)
        return write_safetensors(out_path, state, kohya_metadata(layers, header, fam), overwrite)
    if layout != "diffusers":
        raise SdtuneError(f"unknown adapter layout '{layout}'; expected diffusers or kohya")
    state, per_part = file_layout.layers_to_file(layers)
    header[DIFFUSERS_METADATA_KEY] = file_layout.metadata_header(per_part)
    return write_safetensors(out_path, state, header, overwrite)
