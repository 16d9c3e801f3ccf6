"""Image to training tensor: resize the short side, crop a square, flip, scale to [-1, 1]."""

from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image


def resize_and_crop(img: Image.Image, size: int, center: bool, rng: random.Random) -> Image.Image:
    """Resize so the short side is `size` (Lanczos), then crop a `size` x `size` square."""
    scale = size / min(img.width, img.height)
    new_w, new_h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
    img = img.resize((new_w, new_h), Image.Resampling.LANCZOS)
    if center:
        left, top = (new_w - size) // 2, (new_h - size) // 2
    else:
        left, top = rng.randint(0, new_w - size), rng.randint(0, new_h - size)
    return img.crop((left, top, left + size, top + size))


def fit_to_bucket(
    img: Image.Image,
    size: tuple[int, int],
    crop: str,
    rng: random.Random,
    background: tuple[int, int, int] = (127, 127, 127),
) -> Image.Image:
    """Bring an image to exactly `size` (width, height): cover it and crop ("center"/"random"),
    or fit inside it and pad the rest with `background` ("pad": nothing of the image is cut)."""
    width, height = size
    cover = crop != "pad"
    scale = (max if cover else min)(width / img.width, height / img.height)
    new_w = max(1, round(img.width * scale))
    new_h = max(1, round(img.height * scale))
    if cover:
        new_w, new_h = max(width, new_w), max(height, new_h)
    img = img.resize((new_w, new_h), Image.Resampling.LANCZOS)
    if not cover:
        canvas = Image.new("RGB", (width, height), background)
        canvas.paste(img, ((width - new_w) // 2, (height - new_h) // 2))
        return canvas
    if crop == "center":
        left, top = (new_w - width) // 2, (new_h - height) // 2
    else:
        left, top = rng.randint(0, new_w - width), rng.randint(0, new_h - height)
    return img.crop((left, top, left + width, top + height))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float tensor (3, H, W) in [-1, 1], the VAE's input range."""
    array = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
