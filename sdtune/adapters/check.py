"""`sdtune check`: how many modules of an adapter file each consumer would load, and which not.

Consumers: diffusers (its own `load_lora_weights`, run on an empty copy of the model: weights on
the meta device, so a full-size check allocates nothing; with `--model`, a fresh model of
its shapes, where a module that was wrapped but left without the file's weights also shows), AUTOMATIC1111 and ComfyUI/Forge (their
key-matching rules, re-stated in `sdtune.adapters.consumers` and run on the model's weights in
the original (LDM) layout they load). A module counts as loaded when the consumer patches the
right module at the strength the file means (alpha / rank): ComfyUI and A1111 read alpha only
from `.alpha` tensors, so a file whose alpha lives in its header loads at the wrong strength.

The diffusers layout is for diffusers; A1111 and ComfyUI read the kohya layout. The verdict (and
the exit code of `sdtune check`) covers the consumers a file's layout is meant for, and the
report says where the other file goes.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

from sdtune.adapters import consumers, formats
from sdtune.adapters.formats import Layer
from sdtune.adapters.load import read_state
from sdtune.errors import SdtuneError

DIFFUSERS = "diffusers"
FOR_LAYOUT = {
    "diffusers": (DIFFUSERS,),
    "peft": (DIFFUSERS,),
    "kohya": (DIFFUSERS, consumers.A1111, consumers.COMFYUI),
}
_SCALE_RTOL = 1e-4
_LISTED = 20  # module names listed per consumer


@dataclass
class ConsumerResult:
    consumer: str
    loaded: int
    not_loaded: list[str] = field(default_factory=list)  # canonical module names
    wrong_strength: list[str] = field(default_factory=list)  # "module (x instead of y)"
    meant_for: bool = True

    @property
    def ok(self) -> bool:
        return not (self.not_loaded or self.wrong_strength)


@dataclass
class CheckReport:
    path: Path
    layout: str
    family: str
    modules: int
    results: list[ConsumerResult]

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results if r.meant_for)

    def failures(self) -> list[ConsumerResult]:
        return [r for r in self.results if r.meant_for and not r.ok]

    def format_table(self) -> str:
        lines = [f"{self.path}: {self.layout} layout, {self.family}, {self.modules} modules"]
        for r in self.results:
            line = f"  {r.consumer:<14} {r.loaded:>4}/{self.modules} load"
            if not r.meant_for:
                bad = (
                    f"{len(r.not_loaded)} not loaded, {len(r.wrong_strength)} at the wrong strength"
                )
                lines.append(f"{line} ({bad}; not this file's consumer)")
                continue
            lines.append(line)
            lines += [f"      not loaded: {name}" for name in r.not_loaded[:_LISTED]]
            lines += [f"      wrong strength: {name}" for name in r.wrong_strength[:_LISTED]]
            more = len(r.not_loaded) + len(r.wrong_strength) - 2 * _LISTED
            if more > 0:
                lines.append(f"      ... and up to {more} more")
        if self.layout == "kohya":
            lines.append("This kohya file is for AUTOMATIC1111/Forge and ComfyUI (and diffusers).")
        else:
            lines.append(
                "This file is for diffusers; for AUTOMATIC1111/Forge and ComfyUI use the kohya "
                f"file (sdtune convert {self.path} --to kohya --out NAME.safetensors)."
            )
        verdict = "every module loads" if self.ok else "some modules would not load"
        lines.append(f"verdict: {verdict} in {', '.join(FOR_LAYOUT[self.layout])}")
        return "\n".join(lines)


def _fresh_like(base):
    """A pipeline of the same family and shapes as `base`, without its adapters (random
    weights: what is checked is which LoRA weights diffusers loads, not the base's)."""
    from sdtune.models.build import build_pipeline, load_family_configs
    from sdtune.models.families import detect_family

    family = detect_family(base)
    configs = load_family_configs(family)
    configs["unet"] = dict(base.unet.config)
    configs["vae"] = dict(base.vae.config)
    for part in family.text_encoders:
        configs[part] = getattr(base, part).config.to_dict()
    return build_pipeline(family, configs)


@lru_cache(maxsize=4)
def _empty_family(family: str):
    from sdtune.models.families import build_pipeline_from_config

    return build_pipeline_from_config(family, empty=True)


def ldm_shapes_of(pipe) -> dict[str, torch.Size]:
    """The model's weights in the original layout, by key, as shapes (from an empty copy)."""
    from sdtune.models.families import detect_family
    from sdtune.models.original_layout import pipeline_to_original

    if detect_family(pipe).is_xl:
        return _xl_ldm_shapes(pipe)
    state, _ = pipeline_to_original(pipe)
    return {k: v.shape for k, v in state.items()}


XL_TEXT_PREFIXES = ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model.")


def _xl_ldm_shapes(pipe) -> dict[str, torch.Size]:
    """An SDXL model's adaptable weights as an SDXL checkpoint names them: the U-Net under
    `model.diffusion_model.` by its original module names, CLIP ViT-L under
    `conditioner.embedders.0.transformer.text_model.`, OpenCLIP bigG (q/k/v fused) under
    `conditioner.embedders.1.model.`. The consumers' rules need nothing else."""
    from sdtune.adapters.load import model_modules
    from sdtune.models import ldm_keys

    modules = model_modules(pipe)
    shapes = {}
    for module, shape in modules.items():
        part, _, path = module.partition(".")
        if part == formats.UNET:
            shapes[f"{ldm_keys.UNET_PREFIX}{modules.original[path]}.weight"] = shape
        elif part == formats.TEXT_ENCODER:
            shapes[f"{XL_TEXT_PREFIXES[0]}text_model.{path}.weight"] = shape
    if getattr(pipe, formats.TEXT_ENCODER_2, None) is not None:
        text = {
            k: v
            for k, v in pipe.text_encoder_2.state_dict().items()
            if not k.startswith("text_projection")
        }
        for key, value in ldm_keys.openclip_to_original(text).items():
            key = XL_TEXT_PREFIXES[1] + key.removeprefix(ldm_keys.OPENCLIP_PREFIX)
            shapes[key] = value.shape
    return shapes


@lru_cache(maxsize=4)
def _family_ldm_shapes(family: str) -> dict[str, torch.Size]:
    return ldm_shapes_of(_empty_family(family))


def diffusers_applied(path: Path, empty_pipe) -> tuple[dict[str, float], str]:
    """Modules diffusers' `load_lora_weights` wraps when it loads `path` into an empty copy of
    the model, with their scale; and the first line of any warning or error it gives."""
    import copy

    from peft.tuners.tuners_utils import BaseTunerLayer

    pipe = copy.deepcopy(empty_pipe)
    try:
        with library_messages() as said:
            pipe.load_lora_weights(str(path), adapter_name="check", low_cpu_mem_usage=True)
    except (ValueError, RuntimeError, KeyError, TypeError) as exc:
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        mismatch = next((line for line in lines if line.startswith("size mismatch")), None)
        if mismatch:  # torch's first line only says that loading failed
            return {}, (
                f"refused the file: {mismatch[:300]} (the adapter was made for a model of "
                "other sizes; check it against that model with --model)"
            )
        return {}, f"refused the file: {lines[0] if lines else type(exc).__name__}"
    scales = {}
    for part in formats.PARTS:
        model = getattr(pipe, part, None)
        for name, module in model.named_modules() if model is not None else ():
            if isinstance(module, BaseTunerLayer) and _loaded_from_file(module):
                scales[formats.strip_text_model(f"{part}.{name}")] = float(module.scaling["check"])
    found = [
        str(w.message)
        for w in said.warnings
        if issubclass(w.category, (UserWarning, RuntimeWarning))
    ]
    found += [line for r in said.logs for line in r.splitlines() if "LoRA keys" not in line]
    return scales, (found[0].strip().splitlines()[0] if found else "")


@dataclass
class LibraryMessages:
    """What diffusers, peft and transformers said while a block ran."""

    logs: list[str] = field(default_factory=list)  # log records at WARNING or above
    warnings: list = field(default_factory=list)  # warnings.WarningMessage, every category


class _Records(logging.Handler):
    def __init__(self, logs: list[str]):
        super().__init__(logging.WARNING)
        self.logs = logs

    def emit(self, record: logging.LogRecord) -> None:
        self.logs.append(record.getMessage())


@contextlib.contextmanager
def library_messages():
    """Collect every warning and every diffusers/peft/transformers log record at WARNING or
    above while the block runs, instead of printing them (the caller reports what matters);
    the loggers' levels, handlers and propagation are put back after."""
    said = LibraryMessages()
    handler = _Records(said.logs)
    loggers = [logging.getLogger(n) for n in ("diffusers", "peft", "transformers")]
    kept = [(lg.level, lg.handlers[:], lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.handlers = [handler]
        lg.propagate = False
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield said
    finally:
        said.warnings.extend(caught)
        for lg, (level, handlers, propagate) in zip(loggers, kept, strict=True):
            lg.handlers = handlers
            lg.propagate = propagate
            lg.setLevel(level)


def _loaded_from_file(module) -> bool:
    """Whether diffusers put the file's weights into a wrapped module: peft starts B at zero, so
    a module whose B is still zero was wrapped but not loaded (the fate of a mixed file's
    attention layers). On the meta device values cannot be read: wrapped counts as loaded."""
    if "check" not in getattr(module, "scaling", {}):
        return False
    up = module.lora_B["check"].weight
    return up.device.type == "meta" or bool(up.detach().abs().sum() > 0)


def down_keys(state: dict[str, torch.Tensor], layout: str, modules) -> dict[str, str]:
    """Canonical module name -> key of its down (A) weight in the file."""
    table = formats.kohya_table(modules) if layout == "kohya" else {}
    found = {}
    for key in state:
        if layout == "kohya":
            name, _, tensor = key.partition(".")
            if tensor == "lora_down.weight":
                found[table.get(name, name)] = key
            continue
        split = formats.split_pair_key(key.removeprefix(formats.PEFT_PREFIX))
        if split and split[1] == "down":
            found[formats.strip_text_model(split[0])] = key
    return found


def _result(consumer, applied, intended, keys, meant_for) -> ConsumerResult:
    """Compare what a consumer applies (by down key) with what the file means (by module)."""
    result = ConsumerResult(consumer, 0, meant_for=meant_for)
    for module in sorted(intended):
        scale = applied.get(keys.get(module, ""))
        if scale is None:
            result.not_loaded.append(module)
        elif abs(scale - intended[module]) > _SCALE_RTOL * max(1.0, abs(intended[module])):
            result.wrong_strength.append(f"{module} ({scale:g} instead of {intended[module]:g})")
        else:
            result.loaded += 1
    return result


def check_adapter(path: str | Path, family: str | None = None, base=None) -> CheckReport:
    """What each consumer would load of the adapter at `path` (see the module docstring).

    `base` (a pipeline) is the model to check against; without it a full-size model of
    `family` (given, or read from the file) is built on the meta device.
    """
    from sdtune.adapters.export import read_for_family

    adapter, fam, modules = read_for_family(path, family, base)
    state, _ = read_state(adapter.path)
    if any(layer.kind != "lora" for layer in adapter.layers.values()):
        raise SdtuneError(
            f"'{adapter.path}' holds LoHa/LoKr layers; the check covers LoRA and LoCon files"
        )
    empty = _fresh_like(base) if base is not None else _empty_family(fam.name)
    ldm = ldm_shapes_of(empty) if base is not None else _family_ldm_shapes(fam.name)
    intended = {m: _intended_scale(layer) for m, layer in adapter.layers.items()}
    keys = down_keys(state, adapter.layout, modules)
    meant = FOR_LAYOUT[adapter.layout]
    scales, said = diffusers_applied(adapter.path, empty)
    wrapped = {m: s for m, s in scales.items()}
    diffusers_result = _result(
        DIFFUSERS, {keys.get(m, m): s for m, s in wrapped.items()}, intended, keys, True
    )
    if said:
        diffusers_result.not_loaded.insert(0, f"(diffusers said: {said})")
    results = [diffusers_result]
    for apply, name in (
        (consumers.a1111_applied, consumers.A1111),
        (consumers.comfyui_applied, consumers.COMFYUI),
    ):
        applied = apply(state, ldm).scales
        results.append(_result(name, applied, intended, keys, name in meant))
    return CheckReport(adapter.path, adapter.layout, fam.name, len(adapter.layers), results)


def _intended_scale(layer: Layer) -> float:
    return layer.scale


def check_file_before_write(
    state: dict[str, torch.Tensor], header: dict[str, str], family: str | None, base=None
) -> CheckReport:
    """The check of tensors about to be written: raise, naming the modules, unless every
    consumer of their layout loads every module."""
    import tempfile

    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory(prefix="sdtune-check-") as tmp:
        path = Path(tmp) / "adapter.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=header)
        report = check_adapter(path, family, base)
    failed = report.failures()
    if failed:
        first = failed[0]
        names = first.not_loaded + first.wrong_strength
        count = len([n for n in names if not n.startswith("(")])
        raise SdtuneError(
            f"{first.consumer} would not load {count} of {report.modules} modules "
            f"({', '.join(names[:3])}); nothing was written"
        )
    return report
