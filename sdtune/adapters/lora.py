"""Which modules get a LoRA, and the peft configs that say so."""

from __future__ import annotations

import re

from peft import LoraConfig

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
        except re.error as exc:
            raise SdtuneError(
                f"{key}: '{pattern}' is not a valid regular expression ({exc})"
            ) from None
        return pattern
    names = [name.strip() for name in spec.split(",") if name.strip()]
    if not names:
        raise SdtuneError(
            f"{key} is empty; use a preset ({', '.join(presets)}), re:<regex>, "
            "or comma-separated module names"
        )
    return names


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
) -> LoraConfig:
    """A peft LoraConfig; B starts at zero so the adapted model starts equal to the base."""
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
    """Fail naming the targets when none of them matched a module (peft's own error is vaguer)."""
    if not matched_modules(model, targets):
        raise SdtuneError(
            f"no {what} module matches the LoRA targets {targets}; "
            f"valid presets: {', '.join(presets)}"
        )
