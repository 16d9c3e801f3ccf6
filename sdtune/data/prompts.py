"""Captions and prompts to text-encoder inputs and outputs, with optional long-prompt windows.

CLIP sees 77 tokens: a begin token, 75 caption tokens and an end token (then padding). With
`max_token_length` 150 or 225 (as in kohya's scripts), a caption's tokens are cut into 2 or 3
windows of 75; each window gets its own begin and end tokens and padding to 77, is encoded on
its own, and the outputs are joined along the sequence axis (the U-Net's cross-attention takes
any length). The window count is fixed by the option, not by the caption, so every item of a
batch has the same shape; a short caption's extra windows are empty (begin, end, padding).
With 75 the result is exactly what the tokenizer gives with truncation: one window, cut at 75.

Training, the text-embedding cache and `sdtune generate` all go through these functions, so an
adapter trained with long captions is conditioned the same way when it is used.

Conditioning per family (`encode_prompts`): SD 1/2 attend to their one encoder's last hidden
states. SDXL (Podell et al. 2023) attends to the penultimate hidden states of CLIP ViT-L and
OpenCLIP bigG side by side (768 + 1280 = 2048 wide) and adds two inputs through the U-Net's
"text_time" embedding: bigG's pooled, projected embedding and the six micro-conditioning ids
(original size, crop top-left, target size). This is what diffusers' SDXL pipelines compute;
with more than one window, each window is encoded alone and the pooled embedding is the first
window's (as kohya's scripts do).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sdtune.errors import SdtuneError

WINDOW_TOKENS = 75  # caption tokens per window: the encoder's 77 less the begin and end tokens
MAX_TOKEN_LENGTHS = (75, 150, 225)


def count_windows(max_token_length: int) -> int:
    """How many 77-token windows a caption of up to `max_token_length` tokens is encoded in."""
    if max_token_length not in MAX_TOKEN_LENGTHS:
        allowed = ", ".join(map(str, MAX_TOKEN_LENGTHS))
        raise SdtuneError(f"max_token_length must be one of {allowed}; got {max_token_length}")
    return max_token_length // WINDOW_TOKENS


def tokenize_prompts(tokenizer, prompts: Sequence[str], max_token_length: int = 75) -> torch.Tensor:
    """Token ids of shape (len(prompts), windows * 77): each window begin + 75 tokens + end."""
    windows = count_windows(max_token_length)
    width = int(tokenizer.model_max_length)
    if width != WINDOW_TOKENS + 2:
        raise SdtuneError(f"the tokenizer's window is {width} tokens; sdtune expects 77 (CLIP)")
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    body = tokenizer(list(prompts), add_special_tokens=False, truncation=False, verbose=False)
    rows = []
    for tokens in body.input_ids:
        row = []
        for k in range(windows):
            part = tokens[k * WINDOW_TOKENS : (k + 1) * WINDOW_TOKENS]
            row += [bos, *part, eos] + [pad] * (WINDOW_TOKENS - len(part))
        rows.append(row)
    return torch.tensor(rows, dtype=torch.long)


def encode_token_windows(text_encoder, input_ids: torch.Tensor) -> torch.Tensor:
    """The encoder's last hidden states of every window, joined: (batch, windows * 77, width).

    All windows of a batch go through the encoder in one call; each window is encoded as its
    own sequence, so one window's tokens never attend to another's.
    """
    width = WINDOW_TOKENS + 2
    batch, length = input_ids.shape
    hidden = text_encoder(input_ids.reshape(batch * (length // width), width))[0]
    return hidden.reshape(batch, length, hidden.shape[-1])


def ids_key(tokenizer_name: str) -> str:
    """The batch key of a tokenizer's token ids: "input_ids", "input_ids_2", ..."""
    return "input_ids" + tokenizer_name.removeprefix("tokenizer")


@dataclass
class Conditioning:
    """What a family's U-Net is conditioned on, apart from the noisy latents and the timestep.

    `embeds`: the states cross-attention attends to, (batch, tokens, width). `pooled`: SDXL's
    pooled text embedding, (batch, width); None for SD 1/2.
    """

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None

    def to(self, *args, **kwargs) -> Conditioning:
        pooled = self.pooled.to(*args, **kwargs) if self.pooled is not None else None
        return Conditioning(self.embeds.to(*args, **kwargs), pooled)

    def unet_kwargs(self, time_ids: torch.Tensor | None = None) -> dict:
        """Keyword arguments of `UNet2DConditionModel.forward` beside the latents and timestep."""
        kwargs = {"encoder_hidden_states": self.embeds}
        if self.pooled is not None:
            if time_ids is None:
                raise SdtuneError("an SDXL U-Net needs micro-conditioning time ids; none given")
            kwargs["added_cond_kwargs"] = {
                "text_embeds": self.pooled,
                "time_ids": time_ids.to(self.pooled.device, self.pooled.dtype),
            }
        return kwargs


def encode_prompts(
    text_encoders: Sequence[torch.nn.Module],
    input_ids: Sequence[torch.Tensor],
    penultimate: bool = False,
) -> Conditioning:
    """The conditioning from each encoder's token ids (see `tokenize_prompts`), in prompt order.

    One encoder (SD 1/2): its last hidden states of every window, joined. Several (SDXL):
    each one's penultimate hidden states (`penultimate`), joined along the width, and the last
    encoder's pooled projection of the first window.
    """
    if len(text_encoders) == 1 and not penultimate:
        return Conditioning(encode_token_windows(text_encoders[0], input_ids[0]))
    width = WINDOW_TOKENS + 2
    states, pooled = [], None
    for encoder, ids in zip(text_encoders, input_ids, strict=True):
        batch, length = ids.shape
        windows = length // width
        out = encoder(ids.reshape(batch * windows, width), output_hidden_states=penultimate)
        hidden = out.hidden_states[-2] if penultimate else out.last_hidden_state
        states.append(hidden.reshape(batch, length, hidden.shape[-1]))
        if encoder is text_encoders[-1] and getattr(out, "text_embeds", None) is not None:
            pooled = out.text_embeds.reshape(batch, windows, -1)[:, 0]
    return Conditioning(torch.cat(states, dim=-1), pooled)


def compute_time_ids(
    original_size: torch.Tensor, crop_top_left: torch.Tensor, target_size: torch.Tensor
) -> torch.Tensor:
    """SDXL's micro-conditioning ids, (batch, 6): original (h, w), crop (top, left), target (h, w).

    Each input is a (batch, 2) tensor, as items carry them (sdtune.data.transforms).
    """
    return torch.cat([original_size, crop_top_left, target_size], dim=1).float()


@torch.no_grad()
def encode_prompt_conditioning(
    pipe, prompts: Sequence[str], negative_prompts: Sequence[str], max_token_length: int
) -> tuple[Conditioning, Conditioning]:
    """The prompts' and the negative prompts' conditioning for a pipeline of any family, in
    the same windows as training (the negative prompts, empty ones too, get as many)."""
    from sdtune.models.components import Components

    parts = Components.of(pipe)
    device = getattr(pipe, "_execution_device", None) or pipe.device
    dtype = parts.text_encoders[-1].dtype
    results = []
    for texts in (prompts, negative_prompts):
        ids = parts.tokenize(texts, max_token_length)
        results.append(parts.encode({k: v.to(device) for k, v in ids.items()}).to(dtype))
    return results[0], results[1]


@torch.no_grad()
def encode_prompt_embeds(
    pipe, prompts: Sequence[str], negative_prompts: Sequence[str], max_token_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds, negative_prompt_embeds) for a diffusers pipeline, in the same windows as
    training; the negative prompts (empty ones too) get the same number of windows."""
    positive, negative = encode_prompt_conditioning(
        pipe, prompts, negative_prompts, max_token_length
    )
    return positive.embeds, negative.embeds
