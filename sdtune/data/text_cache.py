"""A disk cache of text-encoder outputs, so a caption is encoded once, not at every step.

An entry is one caption's hidden states, keyed on everything that determines them: the caption
text (after augmentation), its token ids (so the tokenizer and the long-prompt windows), the
text encoder (its config and a fingerprint of its weights) and the dtype. A changed caption
re-encodes; another text encoder or precision uses other entries, never a stale one.

Caption augmentation and the cache work together: each shuffled or tag-dropped variant is
its own entry, encoded the first time it is drawn and read after that, and caption dropout
reads the entry of the empty caption. The cache is only right while the text encoder is frozen:
with a text-encoder LoRA its outputs change at every step, so the run turns the cache off.

For SDXL an entry holds everything the U-Net takes from the caption: both encoders' states side
by side and bigG's pooled embedding (the time ids come from the image, not the caption).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import torch

from sdtune.data.cache import entry_path, first_misses, module_fingerprint, read_entry, write_entry
from sdtune.data.prompts import Conditioning, encode_prompts


class TextEmbeddingCache:
    """Cached conditioning of captions for `text_encoders` (in prompt order; SDXL: penultimate
    states and the pooled embedding, `penultimate=True`)."""

    def __init__(
        self,
        folder: str | Path,
        text_encoders,
        dtype: torch.dtype,
        penultimate: bool = False,
        ids_keys: Sequence[str] = ("input_ids",),
    ) -> None:
        self.folder = Path(folder)
        if isinstance(text_encoders, torch.nn.Module):
            text_encoders = [text_encoders]
        self.text_encoders = list(text_encoders)
        self.penultimate = penultimate
        self.ids_keys = tuple(ids_keys)
        prints = ":".join(module_fingerprint(e) for e in self.text_encoders)
        self.identity = f"{prints}:{dtype}" + (":penultimate" if penultimate else "")
        self.fields = ("embeddings", "pooled") if penultimate else ("embeddings",)
        self.hits = self.misses = 0

    def _path(self, caption: str, rows: Sequence[torch.Tensor]) -> Path:
        digest = hashlib.sha256(self.identity.encode())
        digest.update(caption.encode("utf-8", errors="surrogatepass"))
        digest.update(b"\0")
        for row in rows:
            digest.update(row.to(torch.int64).contiguous().numpy().tobytes())
        return entry_path(self.folder, digest)

    @torch.no_grad()
    def encode(
        self, captions: Sequence[str], input_ids: torch.Tensor | dict[str, torch.Tensor]
    ) -> Conditioning:
        """The conditioning of each caption, from the cache or the encoders, on the encoders'
        device; `input_ids` are the captions' tokens (a tensor, or the batch's ids by key as
        the collate makes them), best left on the CPU where the keys are hashed."""
        device = self.text_encoders[0].device
        if not isinstance(input_ids, dict):
            input_ids = {self.ids_keys[0]: input_ids}
        ids = [input_ids[k].cpu() for k in self.ids_keys]  # no copy back from the GPU
        paths = [self._path(c, [t[i] for t in ids]) for i, c in enumerate(captions)]
        found = [read_entry(p, self.fields, device) for p in paths]
        missing = first_misses(paths, found)
        self.hits += len(paths) - len(missing)
        self.misses += len(missing)
        if missing:
            cond = encode_prompts(
                self.text_encoders, [t[missing].to(device) for t in ids], self.penultimate
            )
            for row, i in enumerate(missing):
                entry = {"embeddings": cond.embeds[row]}
                if cond.pooled is not None:
                    entry["pooled"] = cond.pooled[row]
                write_entry(paths[i], entry, {"caption": captions[i]})
                found[i] = tuple(entry[f] for f in self.fields)
        for i, path in enumerate(paths):  # a caption twice in one batch was encoded once
            if found[i] is None:
                found[i] = found[paths.index(path)]
        embeds = torch.stack([entry[0] for entry in found])
        pooled = torch.stack([entry[1] for entry in found]) if self.penultimate else None
        return Conditioning(embeds, pooled)
