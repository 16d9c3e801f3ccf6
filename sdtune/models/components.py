"""One object holding a pipeline's parts, with its text encoders and tokenizers by name.

SD 1/2 have one text encoder; SDXL two (CLIP ViT-L `text_encoder`, OpenCLIP bigG
`text_encoder_2`), its refiner one (`text_encoder_2`). Code that tokenizes, encodes prompts,
freezes the base or moves it between devices goes through `Components` and the family's
declared parts, never through `pipe.text_encoder` alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sdtune.data.prompts import Conditioning, encode_prompts, ids_key, tokenize_prompts
from sdtune.models.families import Family, detect_family


@dataclass
class Components:
    family: Family
    unet: torch.nn.Module
    vae: torch.nn.Module
    scheduler: Any
    text_encoders: list[torch.nn.Module]  # in the family's prompt order
    tokenizers: list[Any]  # one per text encoder, same order

    @classmethod
    def of(cls, pipe: Any, family: Family | None = None) -> Components:
        family = family or detect_family(pipe)
        return cls(
            family,
            pipe.unet,
            pipe.vae,
            pipe.scheduler,
            [getattr(pipe, name) for name in family.text_encoders],
            [getattr(pipe, name) for name in family.tokenizers],
        )

    @property
    def text_encoder_names(self) -> tuple[str, ...]:
        return self.family.text_encoders

    @property
    def models(self) -> list[torch.nn.Module]:
        """Every model part: the U-Net, the VAE and the text encoders."""
        return [self.unet, self.vae, *self.text_encoders]

    @property
    def tokenizer_map(self) -> dict[str, Any]:
        """Batch key ("input_ids", "input_ids_2") -> tokenizer, as the training collate takes."""
        return {
            ids_key(name): tokenizer
            for name, tokenizer in zip(self.family.tokenizers, self.tokenizers, strict=True)
        }

    def tokenize(
        self, prompts: Sequence[str], max_token_length: int = 75
    ) -> dict[str, torch.Tensor]:
        """Each tokenizer's ids of `prompts`, under its batch key ("input_ids", "input_ids_2")."""
        return {
            ids_key(name): tokenize_prompts(tokenizer, prompts, max_token_length)
            for name, tokenizer in zip(self.family.tokenizers, self.tokenizers, strict=True)
        }

    def encode(
        self, ids: dict[str, torch.Tensor], text_encoders: Sequence[torch.nn.Module] | None = None
    ) -> Conditioning:
        """The conditioning of token ids (from `tokenize`); `text_encoders` replaces the parts'
        own (e.g. the training loop's wrapped ones)."""
        encoders = list(text_encoders) if text_encoders is not None else self.text_encoders
        keys = [ids_key(name) for name in self.family.tokenizers]
        return encode_prompts(encoders, [ids[k] for k in keys], penultimate=self.family.is_xl)
