"""Model information: parameters per component and per layer type, as a table.

Counting works on a loaded pipeline or on a family's full-size architecture built on the meta
device (no memory, no download), so `sdtune info sd1` answers "how big is SD 1.5?" offline.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any


@dataclass
class ComponentInfo:
    """Parameter counts of one model of a pipeline, in total and by layer type."""

    name: str
    class_name: str
    parameters: int
    by_layer_type: dict[str, int]


def count_parameters(pipe: Any) -> list[ComponentInfo]:
    """Every torch module of the pipeline (U-Net, VAE, text encoder, DPT, ...), largest first."""
    import torch

    infos = []
    for name, part in pipe.components.items():
        if not isinstance(part, torch.nn.Module):
            continue
        by_type: Counter[str] = Counter()
        for module in part.modules():
            own = sum(p.numel() for p in module.parameters(recurse=False))
            if own:
                by_type[type(module).__name__] += own
        total = sum(p.numel() for p in part.parameters())
        infos.append(ComponentInfo(name, type(part).__name__, total, dict(by_type.most_common())))
    return sorted(infos, key=lambda c: -c.parameters)


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def format_info_table(infos: list[ComponentInfo], title: str = "") -> str:
    """Components with their totals, each followed by its layer types, and a grand total.

    The first column is as wide as its longest label (at least 40), so the numbers line up
    even for long names such as SDXL's `text_encoder_2 (CLIPTextModelWithProjection)`.
    """
    total = sum(c.parameters for c in infos)
    labels = [f"{c.name} ({c.class_name})" for c in infos]
    layers = [f"  {layer}" for c in infos for layer in c.by_layer_type]
    width = max([40] + [len(label) + 2 for label in labels + layers])
    lines = [title] if title else []
    lines.append(f"{'component / layer type':<{width}}{'parameters':>14}{'share':>9}")
    for comp, label in zip(infos, labels, strict=True):
        share = comp.parameters / total if total else 0
        lines.append(f"{label:<{width}}{comp.parameters:>14,}{share:>9.1%}")
        for layer, count in comp.by_layer_type.items():
            part = count / comp.parameters if comp.parameters else 0
            lines.append(f"{'  ' + layer:<{width}}{count:>14,}{part:>9.1%}")
    lines.append(f"{'total':<{width}}{total:>14,}  ({_human(total)})")
    return "\n".join(lines)


def load_for_info(model: str, family: str | None = None) -> tuple[Any, str]:
    """A pipeline to count: a family name builds its full-size architecture on the meta device;
    anything else is loaded as a model (folder, checkpoint, hub id)."""
    from sdtune.models.families import FAMILIES, build_pipeline_from_config

    if model in FAMILIES:
        return build_pipeline_from_config(model, empty=True), f"{model} (full-size architecture)"
    from sdtune.models.loading import load_pipeline

    return load_pipeline(model, family=family), model
