"""Which modules get a LoRA, and the peft configs that say so."""

from __future__ import annotations

from peft import LoraConfig

from sdtune.errors import SdtuneError

# U-Net target presets: module-name suffixes that peft matches against the U-Net's modules.
UNET_TARGET_PRESETS: dict[str, list[str]] = {
    # self- and cross-attention projections: the common default of LoRA trainers
    "attn": ["to_q", "to_k", "to_v", "to_out.0"],
    # cross-attention only: the text-to-image binding, the smallest useful adapter
    "cross-attn": ["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"],
}

# CLIP text-encoder attention projections.
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def resolve_unet_targets(spec: str) -> list[str]:
    """A preset name, or comma-separated module-name suffixes, as a list of suffixes."""
    spec = spec.strip()
    if spec in UNET_TARGET_PRESETS:
        return list(UNET_TARGET_PRESETS[spec])
    names = [name.strip() for name in spec.split(",") if name.strip()]
    if not names:
        raise SdtuneError(
            f"lora.unet_targets is empty; use a preset ({', '.join(UNET_TARGET_PRESETS)}) "
            "or comma-separated module names"
        )
    return names


def build_lora_config(rank: int, alpha: float, dropout: float, targets: list[str]) -> LoraConfig:
    """A peft LoraConfig; B starts at zero so the adapted model starts equal to the base."""
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        init_lora_weights="gaussian",
    )


def check_targets_matched(model, targets: list[str], what: str) -> None:
    """Fail naming the targets when none of them matched a module (peft's own error is vaguer)."""
    names = [name for name, _ in model.named_modules()]
    if not any(name == t or name.endswith("." + t) for name in names for t in targets):
        raise SdtuneError(
            f"no {what} module matches the LoRA targets {targets}; "
            f"valid presets: {', '.join(UNET_TARGET_PRESETS)}"
        )
