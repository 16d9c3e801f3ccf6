"""Aspect-ratio buckets: train on wide and tall images without cropping them to squares.

Buckets are sizes (multiples of `step`, 64 px) whose area is close to resolution²; each image
goes to the bucket nearest its aspect ratio, and every batch is drawn from one bucket, so its
images stack. An image smaller than its bucket gets a smaller bucket of the same shape instead
of being blown up, unless upscaling is asked for.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from sdtune.errors import SdtuneError


def build_buckets(
    resolution: int, step: int = 64, max_aspect: float = 2.0
) -> list[tuple[int, int]]:
    """(width, height) pairs, multiples of `step`, area <= resolution², aspect <= max_aspect."""
    area, buckets = resolution * resolution, set()
    width = step
    while width <= resolution * max_aspect:
        height = (area // width) // step * step
        if height >= step and max(width / height, height / width) <= max_aspect:
            buckets.add((width, height))
            buckets.add((height, width))
        width += step
    return sorted(buckets)


def assign_bucket(
    size: tuple[int, int], buckets: list[tuple[int, int]], step: int = 64, upscale: bool = False
) -> tuple[int, int]:
    """The bucket nearest in aspect ratio (in log space, so 2:1 and 1:2 are equally far from
    1:1); shrunk in `step` units while the image is smaller than it, unless `upscale`."""
    width, height = size
    aspect = math.log(width / height)
    bw, bh = min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), -b[0] * b[1]))
    if upscale or (width >= bw and height >= bh):
        return bw, bh
    scale = min(width / bw, height / bh)
    return max(step, int(bw * scale) // step * step), max(step, int(bh * scale) // step * step)


def assign_sample_buckets(samples, data_cfg) -> list[tuple[int, int]]:
    """The (width, height) bucket of each sample (anything with a `.size`) under a `DataConfig`;
    a sample of unknown size gets the square."""
    d = data_cfg
    buckets = build_buckets(d.resolution, d.bucket_step, d.max_aspect)
    square = (d.resolution, d.resolution)
    return [
        assign_bucket(s.size, buckets, d.bucket_step, d.upscale) if s.size else square
        for s in samples
    ]


class BucketBatchSampler(Sampler[list[int]]):
    """Batches from one bucket at a time, seeded per epoch, yielding `epoch * size + i` indices
    (as EpochShuffleSampler does, so items know their epoch).

    Items are grouped per optimizer step across processes and accumulation (`group` = batch
    size x processes x accumulation steps): each bucket's shuffled items are cut into groups,
    the groups are shuffled, and each group is dealt out as micro-batches, process by process.
    So a step sees the same images however it is split. Incomplete groups are kept in a single
    process without accumulation (a smaller last batch) and dropped otherwise.
    """

    def __init__(
        self,
        buckets_of: list[tuple[int, int]],
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        accumulation: int = 1,
    ) -> None:
        self.buckets_of = buckets_of  # one per dataset index (repeats included)
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world_size, self.accumulation = rank, world_size, accumulation
        self.epoch, self._skip = 0, 0
        if not self._micro_batches(0):
            raise SdtuneError(
                f"no bucket holds {batch_size * world_size * accumulation} images for one "
                "optimizer step; lower train.batch_size or gradient_accumulation_steps, raise "
                "data.repeats, or turn data.bucketing off"
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip_next(self, count: int) -> None:
        """Skip the first `count` items (whole micro-batches) of the next pass."""
        self._skip = count // self.batch_size

    def __len__(self) -> int:
        return len(self._micro_batches(0))

    def _micro_batches(self, epoch: int) -> list[list[int]]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        by_bucket: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index, bucket in enumerate(self.buckets_of):
            by_bucket[bucket].append(index)
        group = self.batch_size * self.world_size * self.accumulation
        keep_partial = self.world_size == 1 and self.accumulation == 1
        groups = []
        for bucket in sorted(by_bucket):
            items = by_bucket[bucket]
            order = [items[i] for i in torch.randperm(len(items), generator=gen).tolist()]
            for start in range(0, len(order), group):
                chunk = order[start : start + group]
                if len(chunk) == group or keep_partial:
                    groups.append(chunk)
        groups = [groups[i] for i in torch.randperm(len(groups), generator=gen).tolist()]
        size, mine = len(self.buckets_of), []
        for chunk in groups:
            for micro in range(0, len(chunk), self.batch_size * self.world_size):
                part = chunk[micro : micro + self.batch_size * self.world_size]
                share = part[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
                mine.append([epoch * size + i for i in share])
        return mine

    def __iter__(self) -> Iterator[list[int]]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        skip, self._skip = self._skip, 0
        return iter(self._micro_batches(epoch)[skip:])
