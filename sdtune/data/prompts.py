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
"""

from __future__ import annotations

from collections.abc import Sequence

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


@torch.no_grad()
def encode_prompt_embeds(
    pipe, prompts: Sequence[str], negative_prompts: Sequence[str], max_token_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds, negative_prompt_embeds) for a diffusers pipeline, in the same windows as
    training; the negative prompts (empty ones too) get the same number of windows."""
    device = getattr(pipe, "_execution_device", None) or pipe.device
    encoder = pipe.text_encoder
    embeds = []
    for texts in (prompts, negative_prompts):
        ids = tokenize_prompts(pipe.tokenizer, texts, max_token_length).to(device)
        embeds.append(encode_token_windows(encoder, ids).to(encoder.dtype))
    return embeds[0], embeds[1]
