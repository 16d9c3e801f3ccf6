"""Which parts of the model get a LoRA, and with what rank, alpha and learning rate.

The U-Net always trains. SD 1/2 have one text encoder (`lora.train_text_encoder`); SDXL has two,
CLIP ViT-L (`text_encoder`, the same options) and OpenCLIP bigG (`text_encoder_2`,
`lora.train_text_encoder_2`), each with its own rank, alpha and learning rate. An unset value
falls back along the chain text_encoder_2 -> text_encoder -> the U-Net's.

SDXL's U-Net reads only the penultimate hidden states of ViT-L, so that encoder's last layer
never reaches the loss: it gets no LoRA (`lora_targets_of`). A LoRA there would stay at zero,
be written as a module no consumer changes anything with, and stall the gradient sync of
several processes, which waits for every trainable parameter.
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


def reads_last_layer(family: Family, part: str) -> bool:
    """Whether the family's U-Net sees the output of `part`'s last layer: SD 1/2 read the last
    hidden states; SDXL reads both encoders' penultimate states and bigG's pooled embedding,
    which comes out of bigG's last layer."""
    return not (family.is_xl and part == "text_encoder")


def lora_targets_of(encoder, targets: list[str] | str, family: Family, part: str):
    """The modules of `encoder` (a pipeline's `part`) that get a LoRA: those `targets` match,
    less the last layer where the family never reads it."""
    from sdtune.adapters.lora import matched_modules

    if reads_last_layer(family, part):
        return targets
    last = f".layers.{encoder.config.num_hidden_layers - 1}."
    kept = [name for name in matched_modules(encoder, targets) if last not in f".{name}."]
    if not kept:
        raise SdtuneError(
            f"lora.text_encoder_targets matches only the last layer of {part}, whose output "
            f"family '{family.name}' never reads (it uses the penultimate states); target "
            f"earlier layers or set lora.train_{part}=false"
        )
    return kept


def trains_text(cfg: RunConfig) -> bool:
    """Whether any text encoder trains (its outputs then change at every step)."""
    return cfg.lora.train_text_encoder or cfg.lora.train_text_encoder_2
