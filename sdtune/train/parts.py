"""Which parts of the model get a LoRA, and with what rank, alpha and learning rate.

The U-Net always trains. SD 1/2 have one text encoder (`lora.train_text_encoder`); SDXL has two,
CLIP ViT-L (`text_encoder`, the same options) and OpenCLIP bigG (`text_encoder_2`,
`lora.train_text_encoder_2`), each with its own rank, alpha and learning rate. An unset value
falls back along the chain text_encoder_2 -> text_encoder -> the U-Net's.
"""

from __future__ import annotations

from dataclasses import dataclass

from sdtune.config import RunConfig
from sdtune.errors import SdtuneError
from sdtune.models.families import Family


@dataclass(frozen=True)
class TextEncoderLora:
    """The LoRA of one text-encoder part."""

    part: str  # pipeline part name: "text_encoder" or "text_encoder_2"
    rank: int
    alpha: float
    learning_rate: float


def text_encoder_loras(cfg: RunConfig, family: Family) -> list[TextEncoderLora]:
    """The text encoders that train, in the family's order; an error for one it lacks."""
    lora, train = cfg.lora, cfg.train
    rank = lora.text_encoder_rank or lora.rank
    alpha = lora.text_encoder_alpha or lora.alpha
    lr = train.text_encoder_learning_rate or train.learning_rate
    wanted = {
        "text_encoder": (lora.train_text_encoder, rank, alpha, lr),
        "text_encoder_2": (
            lora.train_text_encoder_2,
            lora.text_encoder_2_rank or rank,
            lora.text_encoder_2_alpha or alpha,
            train.text_encoder_2_learning_rate or lr,
        ),
    }
    for part, (on, *_) in wanted.items():
        if on and part not in family.text_encoders:
            key = "lora.train_" + part
            raise SdtuneError(
                f"{key}=true, but family '{family.name}' has no {part} (its text encoders: "
                f"{', '.join(family.text_encoders)}); set {key}=false"
            )
    return [
        TextEncoderLora(part, r, a, rate)
        for part, (on, r, a, rate) in wanted.items()
        if on and part in family.text_encoders
    ]


def trains_text(cfg: RunConfig) -> bool:
    """Whether any text encoder trains (its outputs then change at every step)."""
    return cfg.lora.train_text_encoder or cfg.lora.train_text_encoder_2
