"""What an adapter file holds: format, algorithm, family, targets, ranks, alphas, size, metadata.

Works on sdtune's files and on foreign ones (diffusers, PEFT, kohya/A1111, LyCORIS), read by the
same parser that loads them, so what it shows is what loading applies: per-module alphas from
peft's `alpha_pattern`, LoHa/LoKr ranks, and each layer's algorithm (LoRA, LoCon, LoHa, LoKr,
with Tucker and DoRA marked).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import safe_open

from sdtune.adapters.io import METADATA_PREFIX, resolve_adapter_path
from sdtune.adapters.load import FAMILY_OF_TEXT_WIDTH
from sdtune.errors import SdtuneError

# kohya names the text encoder of SD 1 `lora_te_`, diffusers `text_encoder.`; both have q/k/v.
_TEXT_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "text_encoder.", "text_encoder_2.", "te.")


@dataclass
class AdapterSummary:
    path: Path
    format: str  # "diffusers", "peft" or "kohya"
    family: str  # sdtune's header, else "sd1"/"sd2"/"sdxl" guessed from names and shapes
    parameters: int
    modules: int
    ranks: Counter = field(default_factory=Counter)
    alphas: Counter = field(default_factory=Counter)
    targets: Counter = field(
        default_factory=Counter
    )  # module kind -> count (to_q, attn2.to_k, ...)
    metadata: dict[str, str] = field(default_factory=dict)
    algorithms: Counter = field(default_factory=Counter)  # "LoRA", "LoCon", "LoHa+DoRA", ...

    def format_table(self) -> str:
        def counts(c: Counter) -> str:
            return ", ".join(f"{k} x{n}" for k, n in sorted(c.items(), key=str)) or "-"

        lines = [
            f"file        {self.path}",
            f"format      {self.format}",
            f"algorithm   {counts(self.algorithms)}",
            f"family      {self.family}",
            f"modules     {self.modules} adapted, {self.parameters:,} parameters",
            f"ranks       {counts(self.ranks)}",
            f"alphas      {counts(self.alphas)}",
            f"targets     {counts(self.targets)}",
        ]
        if self.metadata:
            lines.append("metadata")
            for key, value in sorted(self.metadata.items()):
                shown = value if len(value) <= 100 else value[:97] + "..."
                lines.append(f"  {key:<28} {shown}")
        return "\n".join(lines)


def detect_format(keys: list[str]) -> str:
    if any(k.startswith(("lora_unet_", "lora_te")) for k in keys):
        return "kohya"
    if any(k.startswith("base_model.model.") for k in keys):
        return "peft"
    if any(k.startswith(("unet.", "text_encoder.", "text_encoder_2.")) for k in keys):
        return "diffusers"
    raise SdtuneError(
        "no LoRA keys found (expected lora_unet_*/lora_te_* (kohya), unet.*/text_encoder.* "
        "(diffusers) or base_model.model.* (PEFT))"
    )


_ATTN_KIND = re.compile(r"(attn[12])[._](to_q|to_k|to_v|to_out)")
_OTHER_KIND = re.compile(
    r"(q_proj|k_proj|v_proj|out_proj|fc1|fc2|proj_in|proj_out|conv_shortcut"
    r"|conv1|conv2|ff[._]net)"
)


def _module_kind(module: str) -> str:
    """`...transformer_blocks.0.attn2.to_k` -> `unet attn2.to_k`; kohya's `_` names alike."""
    part = "text" if module.startswith(_TEXT_PREFIXES) else "unet"
    match = _ATTN_KIND.search(module)
    if match:
        return f"{part} {match[1]}.{match[2]}"
    match = _OTHER_KIND.search(module)
    return f"{part} {match[1] if match else module.rsplit('.', 1)[-1]}"


def inspect_adapter(path: str | Path) -> AdapterSummary:
    from sdtune.adapters.load import read_adapter

    path = resolve_adapter_path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            header = f.metadata() or {}
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
    except Exception as exc:  # safetensors raises its own error types for torn files
        raise SdtuneError(f"'{path}' is not a readable safetensors file: {exc}") from None
    fmt = detect_format(keys)
    adapter = read_adapter(path, {})  # kohya names stay as written: no model to name them by
    summary = AdapterSummary(
        path=path,
        format=fmt,
        family="unknown",
        parameters=sum(_numel(s) for s in shapes.values()),
        modules=len(adapter.layers),
        metadata={
            k[len(METADATA_PREFIX) :] if k.startswith(METADATA_PREFIX) else k: v
            for k, v in header.items()
            if k != "format"
        },
    )
    for module, layer in adapter.layers.items():
        summary.algorithms[layer.algorithm] += 1
        summary.ranks[layer.rank or "full"] += 1
        summary.targets[_module_kind(module)] += 1
        if layer.rank == 0:
            summary.alphas["unused (full factors)"] += 1
        elif layer.alpha is None:
            summary.alphas["= rank (none stored)"] += 1
        else:
            summary.alphas[f"{layer.alpha:g}"] += 1
    summary.family = (
        summary.metadata.get("family") or adapter.family or _guess_family(adapter.layers)
    )
    return summary


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _guess_family(layers: dict) -> str:
    """SD 1, SD 2 and SDXL differ in the text width the cross-attention keys read: 768, 1024
    and 2048."""
    from sdtune.adapters.lowrank import compute_out_in

    for module, layer in layers.items():
        if re.search(r"attn2[._]to_k$", module):
            width = compute_out_in(layer)[1]
            return FAMILY_OF_TEXT_WIDTH.get(width, f"unknown (cross-attention width {width})")
    return "unknown"
