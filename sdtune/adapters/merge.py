"""Fuse adapters into a model, merge several adapters into one, resize, and extract a LoRA.

All four are the same arithmetic on per-module weight changes (`lowrank.compute_delta`):
fusing adds `weight * delta` to the base weights (DoRA layers then rescale each output row to
their magnitude, as peft does); merging concatenates the factors (exact; LoHa and LoKr in their
exact LoRA form) or re-factors the summed change by truncated SVD; resizing re-factors one
adapter's changes; and extracting factors the difference between a fine-tuned model and its
base. The SVD reports how much of each change a rank keeps (energy = kept share of the squared
singular values).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from sdtune.adapters.formats import PARTS, Layer
from sdtune.adapters.load import (
    Adapter,
    check_family,
    check_fits,
    model_modules,
    module_weight,
    read_adapter,
)
from sdtune.adapters.lowrank import as_lora, compute_adapted_weight, compute_delta, factorize
from sdtune.errors import SdtuneError


@dataclass
class LayerReport:
    """What a rank kept of one module's change."""

    module: str
    rank: int
    energy: float
    relative_error: float


def lora_shape(layer: Layer) -> torch.Size:
    """The weight shape a LoRA layer's change has (out, in) or (out, in, kh, kw)."""
    return torch.Size((layer.up.shape[0], *layer.down.shape[1:]))


def fuse_adapters(pipe, adapters: list[tuple[str | Path, float]]) -> list[Adapter]:
    """Add `weight * delta` of every (adapter, weight) to `pipe`'s base weights, in place.

    Every adapter is read and checked against the model before any weight changes, so a bad
    one leaves the model untouched. A DoRA layer rescales the adapted weight to its magnitude,
    as diffusers' `fuse_lora` does.
    """
    from sdtune.models.families import detect_family

    base = detect_family(pipe)
    modules = model_modules(pipe)
    read = []
    for path, weight in adapters:
        adapter = read_adapter(path, modules)
        check_family(adapter, base)
        check_fits(adapter, modules, base.name)
        read.append((adapter, float(weight)))
    with torch.no_grad():
        for adapter, weight in read:
            for module, layer in adapter.layers.items():
                param = module_weight(pipe, module)
                param.copy_(compute_adapted_weight(layer, param, weight).to(param.dtype))
    return [adapter for adapter, _ in read]


def save_merged_model(
    pipe,
    folder: str | Path | None = None,
    checkpoint: str | Path | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Save a fused pipeline as a diffusers folder and/or one original-layout `.safetensors`."""
    from sdtune.models.original_layout import save_original_checkpoint

    written = []
    for target in (folder, checkpoint):
        if target is not None and Path(target).exists() and not overwrite:
            raise SdtuneError(f"'{target}' already exists; pass --overwrite to replace it")
    if folder is not None:
        folder = Path(folder)
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        pipe.save_pretrained(str(tmp))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
        written.append(folder)
    if checkpoint is not None:
        written.append(save_original_checkpoint(pipe, checkpoint))
    return written


def merge_adapters(
    adapters: list[tuple[Adapter, float]], rank: int | None = None
) -> tuple[dict[str, Layer], list[LayerReport]]:
    """One adapter equal to the weighted sum of `adapters`.

    Without `rank`, the factors are concatenated (ranks add up; exact). With `rank`, each
    module's summed change is re-factored by truncated SVD and the kept energy reported.
    LoHa, LoKr and Tucker layers take part through their exact LoRA form (`lowrank.as_lora`).
    """
    by_module: dict[str, list[tuple[Layer, float]]] = {}
    for adapter, weight in adapters:
        for module, layer in adapter.layers.items():
            if layer.magnitude is not None:
                raise SdtuneError(
                    f"'{adapter.path}': {module} is a DoRA layer, which rescales the weight "
                    "instead of adding to it; fuse it into a model with merge --base instead"
                )
            by_module.setdefault(module, []).append((as_lora(layer), weight))
    merged, reports = {}, []
    for module, parts in sorted(by_module.items()):
        if rank is None:
            down = torch.cat([layer.down.float() for layer, _ in parts], dim=0)
            ups = [layer.up.float() * (w * layer.scale) for layer, w in parts]
            merged[module] = Layer(down, torch.cat(ups, dim=1), None)
            continue
        delta = sum(w * compute_delta(layer, lora_shape(layer)) for layer, w in parts)
        result = factorize(delta, rank)
        merged[module] = result.layer
        reports.append(LayerReport(module, result.layer.rank, result.energy, result.relative_error))
    return merged, reports


def resize_adapter(adapter: Adapter, rank: int) -> tuple[dict[str, Layer], list[LayerReport]]:
    """The adapter re-factored to `rank` per module (truncated SVD), with what each rank kept.

    At or above a module's current rank this is lossless (up to float rounding).
    """
    return merge_adapters([(adapter, 1.0)], rank=rank)


def extract_lora(
    base, tuned, rank: int, min_relative_change: float = 1e-6
) -> tuple[dict[str, Layer], list[LayerReport]]:
    """A LoRA of `rank` from the difference of two pipelines' U-Net/text-encoder weights.

    Modules whose weight moved less than `min_relative_change` (relative Frobenius norm) are
    left out. Biases and norms are not low-rank and are not extracted.
    """
    base_modules, tuned_modules = model_modules(base), model_modules(tuned)
    if base_modules != tuned_modules:
        raise SdtuneError(
            "the two models have different modules or shapes; extract needs the same architecture"
        )
    layers, reports = {}, []
    with torch.no_grad():
        for module in sorted(base_modules):
            if module.partition(".")[0] not in PARTS:
                continue
            before = module_weight(base, module).float()
            diff = module_weight(tuned, module).float() - before
            norm = float(diff.norm())
            if norm <= min_relative_change * max(float(before.norm()), 1e-12):
                continue
            result = factorize(diff, rank)
            layers[module] = result.layer
            reports.append(
                LayerReport(module, result.layer.rank, result.energy, result.relative_error)
            )
    if not layers:
        raise SdtuneError(
            "the two models have the same U-Net and text-encoder weights; nothing to extract"
        )
    return layers, reports


def summarize(reports: list[LayerReport]) -> str:
    """A few lines: mean/min kept energy, the worst modules, and the largest relative error."""
    if not reports:
        return "no layers"
    energies = [r.energy for r in reports]
    worst = sorted(reports, key=lambda r: r.energy)[:3]
    lines = [
        f"{len(reports)} layers; kept energy mean {sum(energies) / len(energies):.4f}, "
        f"min {min(energies):.4f}; max relative error {max(r.relative_error for r in reports):.4f}"
    ]
    lines += [
        f"  {r.module}: rank {r.rank}, energy {r.energy:.4f}, error {r.relative_error:.4f}"
        for r in worst
    ]
    return "\n".join(lines)
