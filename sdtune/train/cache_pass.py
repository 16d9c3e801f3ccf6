"""The latent and text-embedding caches of a run: opened at the start, filled in one pass.

The pass encodes every item of the first epoch before training (the main process does it
while the others wait), so in a run with several processes each entry is encoded once and
every process then reads it. Items are seeded per item, so their crops and flips are the same
every epoch and the pass covers them all; captions that change every epoch (tag shuffle, tag
dropout) can only be pre-built for the first epoch, and a later variant is encoded the first
time it is drawn and read from the cache after that.
"""

from __future__ import annotations

import logging
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from sdtune.data.cache import LatentCache, default_cache_dir
from sdtune.data.text_cache import TextEmbeddingCache
from sdtune.models.components import Components
from sdtune.train.parts import trains_text

logger = logging.getLogger("sdtune.train")

_AUGMENTATIONS = ("shuffle_tags", "tag_dropout", "caption_dropout")


def augmentations_in_use(data_cfg) -> list[str]:
    """The caption augmentations set in `data` or in any of its sources."""
    tables = [data_cfg, *getattr(data_cfg, "sources", [])]
    return [name for name in _AUGMENTATIONS if any(getattr(t, name, None) for t in tables)]


def open_caches(run) -> None:
    """The caches the config asks for, and one line each on how they meet the rest of the run."""
    cfg, pipe = run.cfg, run.pipe
    folder = Path(cfg.data.cache_dir or default_cache_dir())
    say = logger.info if run.accelerator.is_main_process else logger.debug
    if cfg.data.cache_latents:
        run.latent_cache = LatentCache(folder, pipe.vae, run.dtype)
    if not cfg.data.cache_text_embeddings:
        return
    if trains_text(cfg):
        key = "train_text_encoder" if cfg.lora.train_text_encoder else "train_text_encoder_2"
        say(
            "text-embedding cache off: lora.%s=true changes the text encoder's outputs at every "
            "step, so no stored output would be right",
            key,
        )
        return
    # The frozen text encoders stay on the accelerator even when every caption is cached:
    # later caption variants, held-out items and sample images still go through them.
    parts = Components.of(pipe, run.family)
    run.text_cache = TextEmbeddingCache(
        folder / "text",
        parts.text_encoders,
        run.dtype,
        penultimate=run.family.is_xl,
        ids_keys=list(parts.tokenizer_map),
    )
    augmentations = augmentations_in_use(cfg.data)
    if augmentations:
        say(
            "text-embedding cache with caption augmentation (%s): every caption variant is its "
            "own entry, encoded the first time it is drawn and read after that%s",
            ", ".join(augmentations),
            "; caption dropout reads the empty caption's entry"
            if "caption_dropout" in augmentations
            else "",
        )


def prebuild_caches(run) -> None:
    """Encode the first epoch's items into the caches (main process), then let all go on."""
    if run.latent_cache is None and run.text_cache is None:
        return
    if run.accelerator.is_main_process:
        _encode_first_epoch(run)
    run.accelerator.wait_for_everyone()


def _encode_first_epoch(run) -> None:
    from tqdm.auto import tqdm

    caches = {"latents": run.latent_cache, "text embeddings": run.text_cache}
    caches = {name: cache for name, cache in caches.items() if cache is not None}
    before = {name: (c.hits, c.misses) for name, c in caches.items()}
    dataset, collate = run.loader.dataset, run.loader.collate_fn
    items = DataLoader(
        dataset,
        batch_size=None,  # single items, batched below by size (buckets differ)
        num_workers=run.cfg.train.num_workers,
        generator=torch.Generator(),  # leaves the global random state as training expects it
    )
    bar = tqdm(
        total=len(dataset),
        desc="caching",
        unit="item",
        disable=not sys.stderr.isatty(),
        dynamic_ncols=True,
    )
    waiting: dict[tuple, list] = defaultdict(list)
    for item in items:
        key = tuple(item["pixel_values"].shape)
        waiting[key].append(item)
        if len(waiting[key]) == run.cfg.train.batch_size:
            _encode_batch(run, collate(waiting.pop(key)))
        bar.update(1)
    for group in waiting.values():
        _encode_batch(run, collate(group))
    bar.close()
    if run.text_cache is not None and "caption_dropout" in augmentations_in_use(run.cfg.data):
        ids = Components.of(run.pipe, run.family).tokenize([""], run.cfg.data.max_token_length)
        run.text_cache.encode([""], ids)
    counts = [
        f"{name} {c.misses - before[name][1]} encoded, {c.hits - before[name][0]} read"
        for name, c in caches.items()
    ]
    d, notes = run.cfg.data, []
    if run.latent_cache is not None and (d.random_flip or not d.center_crop):
        notes.append("random crops and flips are fixed per item, so every epoch reads these")
    if run.text_cache is not None and augmentations_in_use(d):
        notes.append("captions vary per epoch: later variants are encoded when first drawn")
    note = f" ({'; '.join(notes)})" if notes else ""
    logger.info("cache pass over %d items: %s%s", len(dataset), "; ".join(counts), note)


@torch.no_grad()
def _encode_batch(run, batch: dict) -> None:
    if run.latent_cache is not None:
        vae = run.pipe.vae
        pixels = batch["pixel_values"].to(vae.device, dtype=vae.dtype)
        run.latent_cache.encode(pixels, batch.get("pixel_keys"))
    if run.text_cache is not None:
        run.text_cache.encode(batch["captions"], batch)


def log_cache_totals(run) -> None:
    """Entries read and encoded by all processes together (a collective: every process calls)."""
    for name, cache in (("latent", run.latent_cache), ("text-embedding", run.text_cache)):
        if cache is None:
            continue
        counts = torch.tensor([cache.hits, cache.misses], device=run.accelerator.device)
        hits, misses = run.accelerator.reduce(counts, reduction="sum").tolist()
        logger.info("%s cache %s: %d read, %d encoded", name, cache.folder, hits, misses)
