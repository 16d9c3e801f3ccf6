"""Which modules get a LoRA, and the peft configs that say so.

Target specs are resolved without importing peft or torch, so a recipe's targets are checked
before anything loads (sdtune.config_checks); only `build_lora_config` needs peft.
"""

from __future__ import annotations

import re
from typing import Any

from sdtune.errors import SdtuneError

_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]

# U-Net target presets: module-name suffixes that peft matches against the U-Net's modules.
UNET_TARGET_PRESETS: dict[str, list[str]] = {
    # self- and cross-attention projections: the common default of LoRA trainers
    "attn": _ATTENTION,
    # cross-attention only: the text-to-image binding, the smallest useful adapter
    "cross-attn": [f"attn2.{name}" for name in _ATTENTION],
    # attention plus the transformer blocks' feed-forward and in/out projections
    "attn-ff": _ATTENTION + ["ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"],
    # attention plus the ResNet and resampling convolutions (LoCon)
    "locon": _ATTENTION
    + ["conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv"],
}

# CLIP text-encoder presets.
TEXT_ENCODER_TARGET_PRESETS: dict[str, list[str]] = {
    "attn": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "attn-mlp": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
}

LORA_INITS = {"gaussian": "gaussian", "kaiming": True}  # B starts at zero in both


def resolve_targets(spec: str, presets: dict[str, list[str]], key: str) -> list[str] | str:
    """A preset name, `re:<regex>` (matched against full module names), or comma-separated
    module-name suffixes."""
    spec = spec.strip()
    if spec in presets:
        return list(presets[spec])
    if spec.startswith("re:"):
        pattern = spec[3:]
        try:
            re.compile(pattern)
        except (re.error, RecursionError, OverflowError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise SdtuneError(
                f"{key}: {_short(pattern)!r} is not a valid regular expression ({reason}); "
                f"use re:<regex>, a preset ({', '.join(presets)}) or module names"
            ) from None
        if not pattern:
            raise SdtuneError(f"{key}: re: needs a regular expression after it, e.g. re:.*attn2.*")
        return pattern
    names = [name.strip() for name in spec.split(",") if name.strip()]
    if not names:
        raise SdtuneError(
            f"{key} is empty; use a preset ({', '.join(presets)}), re:<regex>, "
            "or comma-separated module names"
        )
    return names


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def short_list(items: list[str], shown: int = 8) -> str:
    """`a, b, c, ... (12 more)`: a list for a one-line message."""
    head = ", ".join(items[:shown])
    return head if len(items) <= shown else f"{head}, ... ({len(items) - shown} more)"


def resolve_unet_targets(spec: str) -> list[str] | str:
    return resolve_targets(spec, UNET_TARGET_PRESETS, "lora.unet_targets")


def resolve_text_encoder_targets(spec: str) -> list[str] | str:
    return resolve_targets(spec, TEXT_ENCODER_TARGET_PRESETS, "lora.text_encoder_targets")


def build_lora_config(
    rank: int,
    alpha: float,
    dropout: float,
    targets: list[str] | str,
    use_dora: bool = False,
    init: str = "gaussian",
) -> Any:
    """A peft LoraConfig; B starts at zero so the adapted model starts equal to the base."""
    from peft import LoraConfig

    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        init_lora_weights=LORA_INITS[init],
        use_dora=use_dora,
    )


def matched_modules(model, targets: list[str] | str) -> list[str]:
    """Names of the modules of `model` that `targets` selects (peft's matching rule)."""
    names = [name for name, _ in model.named_modules() if name]
    if isinstance(targets, str):
        return [n for n in names if re.fullmatch(targets, n)]
    return [n for n in names if any(n == t or n.endswith("." + t) for t in targets)]


def check_targets_matched(model, targets: list[str] | str, what: str, presets: dict) -> None:
    """Fail in one line when a target matches no module (peft ignores names that match
    nothing, and its own error when none match is vaguer), naming modules that exist."""
    if isinstance(targets, str):
        unmatched = [] if matched_modules(model, targets) else [f"re:{targets}"]
    else:
        unmatched = [t for t in targets if not matched_modules(model, [t])]
    if not unmatched:
        return
    from collections import Counter

    import torch

    def kind(name: str) -> str:  # to_q, conv1; to_out.0 and ff.net.2 keep their index
        parts = name.split(".")
        return ".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1]

    counts = Counter(
        kind(name)
        for name, module in model.named_modules()
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and ".lora_" not in name
    )
    kinds = [k for k, _ in counts.most_common()]  # the commonest first: attention, ResNets
    raise SdtuneError(
        f"no {what} module matches the LoRA target{'s' if len(unmatched) > 1 else ''} "
        f"{_short(', '.join(unmatched))}; use a preset ({', '.join(presets)}), re:<regex>, or "
        f"module names such as {short_list(kinds)}"
    )
