"""Image to training tensor: resize the short side, crop a square, flip, scale to [-1, 1].

The geometry (how big the resized image is, where the crop or the padding goes) is computed
apart from the pixels, by `compute_square_fit` and `compute_bucket_fit`, so that a dry run can
show exactly the region training keeps without touching an image, and every item can carry its
original size and crop position (`compute_size_conditioning`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image


@dataclass(frozen=True)
class Fit:
    """How an image of `source` (width, height) becomes `size`: resized to `resized`, then
    cropped with its top-left corner at `offset` (`cover`), or pasted at `offset` on a canvas of
    `size` (not `cover`: padded)."""

    source: tuple[int, int]
    resized: tuple[int, int]
    offset: tuple[int, int]
    size: tuple[int, int]
    cover: bool

    def source_box(self) -> tuple[float, float, float, float]:
        """The region kept, (x0, y0, x1, y1) in the original image's pixels."""
        if not self.cover:
            return 0.0, 0.0, float(self.source[0]), float(self.source[1])
        sx, sy = self.source[0] / self.resized[0], self.source[1] / self.resized[1]
        left, top = self.offset
        return left * sx, top * sy, (left + self.size[0]) * sx, (top + self.size[1]) * sy


def compute_square_fit(source: tuple[int, int], size: int, center: bool, rng: random.Random) -> Fit:
    """Short side to `size`, then a `size` x `size` square: the centre, or drawn from `rng`."""
    width, height = source
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    if center:
        left, top = (new_w - size) // 2, (new_h - size) // 2
    else:
        left, top = rng.randint(0, new_w - size), rng.randint(0, new_h - size)
    return Fit(source, (new_w, new_h), (left, top), (size, size), True)


def compute_bucket_fit(
    source: tuple[int, int], size: tuple[int, int], crop: str, rng: random.Random
) -> Fit:
    """Cover `size` (width, height) and crop ("center"/"random"), or fit inside it ("pad")."""
    width, height = size
    cover = crop != "pad"
    scale = (max if cover else min)(width / source[0], height / source[1])
    new_w = max(1, round(source[0] * scale))
    new_h = max(1, round(source[1] * scale))
    if not cover:
        return Fit(
            source, (new_w, new_h), ((width - new_w) // 2, (height - new_h) // 2), size, False
        )
    new_w, new_h = max(width, new_w), max(height, new_h)
    if crop == "center":
        left, top = (new_w - width) // 2, (new_h - height) // 2
    else:
        left, top = rng.randint(0, new_w - width), rng.randint(0, new_h - height)
    return Fit(source, (new_w, new_h), (left, top), size, True)


# The sizes an item carries beside its pixels, for U-Nets conditioned on them (SDXL).
SIZE_KEYS = ("original_size", "crop_top_left", "target_size")


def compute_size_conditioning(fit: Fit, flipped: bool = False) -> dict[str, tuple[int, int]]:
    """An item's sizes as SDXL's micro-conditioning counts them (Podell et al. 2023, sec. 2.2):
    `original_size` (height, width) of the upright source before resizing, `crop_top_left`
    (top, left) of the kept region in the resized image, and `target_size` (height, width).

    Crop coordinates are in the resized image, as diffusers' SDXL training scripts count them.
    A flipped item counts its left edge in the flipped resized image (where a flip-then-crop
    pipeline would have cut the same pixels). A padded item has nothing cut: (0, 0).
    """
    left, top = fit.offset if fit.cover else (0, 0)
    if flipped and fit.cover:
        left = fit.resized[0] - left - fit.size[0]
    return {
        "original_size": (fit.source[1], fit.source[0]),
        "crop_top_left": (top, left),
        "target_size": (fit.size[1], fit.size[0]),
    }


def apply_fit(
    img: Image.Image, fit: Fit, background: tuple[int, int, int] = (127, 127, 127)
) -> Image.Image:
    """Resize (Lanczos) and crop or pad `img` as `fit` says."""
    img = img.resize(fit.resized, Image.Resampling.LANCZOS)
    left, top = fit.offset
    if not fit.cover:
        canvas = Image.new("RGB", fit.size, background)
        canvas.paste(img, (left, top))
        return canvas
    return img.crop((left, top, left + fit.size[0], top + fit.size[1]))


def resize_and_crop(img: Image.Image, size: int, center: bool, rng: random.Random) -> Image.Image:
    """Resize so the short side is `size` (Lanczos), then crop a `size` x `size` square."""
    return apply_fit(img, compute_square_fit(img.size, size, center, rng))


def fit_to_bucket(
    img: Image.Image,
    size: tuple[int, int],
    crop: str,
    rng: random.Random,
    background: tuple[int, int, int] = (127, 127, 127),
) -> Image.Image:
    """Bring an image to exactly `size` (width, height): cover it and crop ("center"/"random"),
    or fit inside it and pad the rest with `background` ("pad": nothing of the image is cut)."""
    return apply_fit(img, compute_bucket_fit(img.size, size, crop, rng), background)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float tensor (3, H, W) in [-1, 1], the VAE's input range."""
    array = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
