"""The torch Dataset the training loop reads: (pixel tensor, caption) per item."""

from __future__ import annotations

import random

import torch
from torch.utils.data import Dataset

from sdtune.data.images import load_image
from sdtune.data.sources import Sample
from sdtune.data.transforms import resize_and_crop, to_tensor


class ImageCaptionDataset(Dataset):
    """Samples repeated `repeats` times; crops and flips are seeded per item and epoch-free.

    Randomness comes from `seed` and the item index, so a given index always yields the same
    tensor: data order is the sampler's job, and the sampler is seeded by the loop.
    """

    def __init__(
        self,
        samples: list[Sample],
        resolution: int,
        center_crop: bool = True,
        random_flip: bool = False,
        repeats: int = 1,
        seed: int = 0,
    ) -> None:
        self.samples = samples
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.repeats = repeats
        self.seed = seed

    def __len__(self) -> int:
        return len(self.samples) * self.repeats

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        sample = self.samples[index % len(self.samples)]
        rng = random.Random(self.seed * 1_000_003 + index)
        img = resize_and_crop(load_image(sample.image_path), self.resolution, self.center_crop, rng)
        pixels = to_tensor(img)
        if self.random_flip and rng.random() < 0.5:
            pixels = pixels.flip(-1)
        return {"pixel_values": pixels, "caption": sample.caption}
