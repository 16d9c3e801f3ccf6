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


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float tensor (3, H, W) in [-1, 1], the VAE's input range."""
    array = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
