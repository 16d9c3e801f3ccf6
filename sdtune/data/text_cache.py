"""A disk cache of text-encoder outputs, so a caption is encoded once, not at every step.

An entry is one caption's hidden states, keyed on everything that determines them: the caption
text (after augmentation), its token ids (so the tokenizer and the long-prompt windows), the
text encoder (its config and a fingerprint of its weights) and the dtype. A changed caption
re-encodes; another text encoder or precision uses other entries, never a stale one.

Caption augmentation and the cache work together: each shuffled or tag-dropped variant is
its own entry, encoded the first time it is drawn and read after that, and caption dropout
reads the entry of the empty caption. The cache is only right while the text encoder is frozen:
with a text-encoder LoRA its outputs change at every step, so the run turns the cache off.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import torch

from sdtune.data.cache import entry_path, first_misses, module_fingerprint, read_entry, write_entry
from sdtune.data.prompts import encode_token_windows


class TextEmbeddingCache:
    def __init__(self, folder: str | Path, text_encoder, dtype: torch.dtype) -> None:
        self.folder = Path(folder)
        self.text_encoder = text_encoder
        self.identity = f"{module_fingerprint(text_encoder)}:{dtype}"
        self.hits = self.misses = 0

    def _path(self, caption: str, input_ids: torch.Tensor) -> Path:
        digest = hashlib.sha256(self.identity.encode())
        digest.update(caption.encode("utf-8", errors="surrogatepass"))
        digest.update(b"\0")
        digest.update(input_ids.to(torch.int64).contiguous().numpy().tobytes())
        return entry_path(self.folder, digest)

    @torch.no_grad()
    def encode(self, captions: Sequence[str], input_ids: torch.Tensor) -> torch.Tensor:
        """The encoder's hidden states of each caption, (batch, tokens, width), from the cache
        or the encoder, on the encoder's device; `input_ids` are the captions' tokens (see
        `tokenize_prompts`), best left on the CPU where the keys are hashed."""
        device = self.text_encoder.device
        input_ids = input_ids.cpu()  # the data loader's tensor: no copy back from the GPU
        paths = [self._path(c, row) for c, row in zip(captions, input_ids, strict=True)]
        found = [read_entry(p, ("embeddings",), device) for p in paths]
        missing = first_misses(paths, found)
        self.hits += len(paths) - len(missing)
        self.misses += len(missing)
        if missing:
            encoded = encode_token_windows(self.text_encoder, input_ids[missing].to(device))
            for row, i in enumerate(missing):
                write_entry(paths[i], {"embeddings": encoded[row]}, {"caption": captions[i]})
                found[i] = (encoded[row],)
        for i, path in enumerate(paths):  # a caption twice in one batch was encoded once
            if found[i] is None:
                found[i] = found[paths.index(path)]
        return torch.stack([entry[0] for entry in found])
