"""The torch Dataset the training loop reads: (pixel tensor, caption) per item, with the item's
original size, crop top-left and target size (for U-Nets conditioned on them; SD 1/2 ignore them).

How an item knows its epoch: `EpochShuffleSampler` yields `epoch * len(dataset) + i` for a seeded
permutation of `i`, and the Dataset splits that back into (epoch, i). So the caption of item `i`
in epoch `e` depends only on (seed, e, i), in the main process or in any worker, and the loop
needs no epoch bookkeeping: each pass over the data loader is the next epoch. `i` counts repeats
(`len(dataset) = images * repeats`), so two repeats of one image get different captions.

With per-sample repeats (several sources) items are laid out in rounds: round r holds, in
sample order, every sample with more than r repeats. With equal repeats that is `i % images`,
the plain layout, so one source with repeats behaves exactly as before.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset, Sampler

from sdtune.data.captions import CaptionAugment, caption_rng
from sdtune.data.images import ImageDecodeError
from sdtune.data.sources import Sample
from sdtune.data.transforms import (
    SIZE_KEYS,
    apply_fit,
    compute_bucket_fit,
    compute_size_conditioning,
    compute_square_fit,
    to_tensor,
)
from sdtune.errors import SdtuneError

logger = logging.getLogger("sdtune.data")


class ImageCaptionDataset(Dataset):
    """Samples repeated `repeats` times; crops, flips and captions seeded per item and epoch.

    Random crops, flips and caption augmentation come from (seed, epoch, item index), see the
    module docstring: an image flips and crops afresh each epoch, and a resumed run redraws
    exactly what the uninterrupted run drew. An image that
    decoded at scan time but fails now (deleted, overwritten) is replaced by the next good item,
    logged once and recorded in `failed`; the replacement is deterministic.
    """

    def __init__(
        self,
        samples: list[Sample],
        resolution: int,
        center_crop: bool = True,
        random_flip: bool = False,
        repeats: int | Sequence[int] = 1,
        seed: int = 0,
        augment: CaptionAugment | Sequence[CaptionAugment] | None = None,
        buckets: list[tuple[int, int]] | None = None,
        crop: str | None = None,
    ) -> None:
        self.samples = samples
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.repeats = repeats  # one count for all samples, or one per sample
        self.seed = seed
        augment = augment or CaptionAugment()
        self.augments = [augment] * len(samples) if isinstance(augment, CaptionAugment) else augment
        self._items = _round_layout(repeats) if not isinstance(repeats, int) else None
        self.failed: dict[Path, str] = {}  # per process: workers keep their own copy
        self.buckets = buckets  # (width, height) per sample; None: square `resolution` crops
        self.crop = crop or ("center" if center_crop else "random")

    def __len__(self) -> int:
        if self._items is not None:
            return len(self._items)
        return len(self.samples) * self.repeats

    def sample_index(self, item: int) -> int:
        """Which sample item `item` of an epoch shows (see the module docstring)."""
        if self._items is not None:
            return int(self._items[item])
        return item % len(self.samples)

    def size_of(self, item: int) -> tuple[int, int]:
        """(width, height) of item `item` once fitted: its bucket, or the training square."""
        if self.buckets is None:
            return self.resolution, self.resolution
        return self.buckets[self.sample_index(item)]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str | int]:
        return self.get(index)

    def get(self, index: int, size: tuple[int, int] | None = None) -> dict:
        """Item `index` (epoch * len + item); `size` fits it to another item's bucket instead of
        its own (a class image paired with an instance batch)."""
        draw = index  # (epoch, item): the training step seeds this item's noise from it
        epoch, index = divmod(index, len(self))
        position = self.sample_index(index)
        sample, image = self._load_with_fallback(position)
        rng = view_rng(self.seed, epoch, index)
        if size is None and self.buckets is not None:
            size = self.buckets[position]
        if size is None:
            fit = compute_square_fit(image.size, self.resolution, self.center_crop, rng)
        else:
            fit = compute_bucket_fit(image.size, size, self.crop, rng)
        pixels = to_tensor(apply_fit(image, fit))
        flipped = self.random_flip and rng.random() < 0.5
        if flipped:
            pixels = pixels.flip(-1)
        caption, augment = sample.caption, self.augments[position]
        if augment.active:
            caption = augment.apply(caption, caption_rng(self.seed, epoch, index))
        item = {"pixel_values": pixels, "caption": caption, "draw": draw}
        return item | compute_size_conditioning(fit, flipped)

    def _load_with_fallback(self, position: int):
        """Sample `position`'s image, or the next sample (in order) that still decodes."""
        n = len(self.samples)
        for step in range(n):
            sample = self.samples[(position + step) % n]
            if sample.image_path in self.failed:
                continue
            try:
                return sample, sample.load()
            except ImageDecodeError as exc:
                self.failed[sample.image_path] = str(exc)
                logger.warning(
                    "skipping %s during training (it decoded at scan time): %s; "
                    "using the next image instead",
                    sample.image_path,
                    exc,
                )
        raise SdtuneError(
            f"none of the {n} dataset images decodes any more (first: {self.samples[0].image_path})"
        )


def collate_sizes(items: list[dict], prefix: str = "") -> dict[str, torch.Tensor]:
    """The items' sizes (`original_size`, `crop_top_left`, `target_size`, read from
    `prefix + key`), each stacked into a (batch, 2) long tensor; nothing for items made without
    them (hand-built ones)."""
    if not items or any(prefix + key not in item for item in items for key in SIZE_KEYS):
        return {}
    return {
        key: torch.tensor([list(item[prefix + key]) for item in items], dtype=torch.long)
        for key in SIZE_KEYS
    }


def view_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The random stream of one item's crop and flip in one epoch (apart from its caption's)."""
    return random.Random(f"view:{seed}:{epoch}:{index}")


def _round_layout(repeats: Sequence[int]) -> torch.Tensor:
    """Item -> sample for per-sample repeats: round r lists the samples with more than r."""
    counts = torch.as_tensor(list(repeats), dtype=torch.long)
    if len(counts) == 0:
        return counts
    rounds, n = int(counts.max()), len(counts)
    sample = torch.arange(n).repeat(rounds)
    round_of = torch.arange(rounds).repeat_interleave(n)
    return sample[counts[sample] > round_of]


class EpochShuffleSampler(Sampler[int]):
    """A seeded shuffle per epoch that tells the dataset the epoch: yields `epoch * size + i`.

    Each `iter()` is the next epoch. `set_epoch` (called by a resumed run) sets the epoch of the
    next pass, and `skip_next(n)` drops the first `n` indices of that pass only, so a resumed run
    continues mid-epoch without loading the images it already trained on. With several
    processes, each takes every `world_size`-th index of the same shuffle (the tail that does not
    divide evenly is left out, so every process runs the same number of batches).
    """

    def __init__(self, size: int, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        self.size = size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip_next(self, count: int) -> None:
        self._skip = count

    def __len__(self) -> int:
        return self.size // self.world_size

    def __iter__(self) -> Iterator[int]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        skip, self._skip = self._skip, 0
        order = torch.randperm(
            self.size, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        )
        mine = order[: len(self) * self.world_size][self.rank :: self.world_size]
        return iter((mine[skip:] + epoch * self.size).tolist())
