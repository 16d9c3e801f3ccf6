"""Reading the user's images, masks and depth maps, with one-line errors that say what to fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from sdtune.data.images import ImageDecodeError, load_image
from sdtune.errors import SdtuneError

ImageInput = Image.Image | str | Path


def check_side(name: str, value: int | None) -> None:
    """Width and height must be multiples of 8: the VAE maps 8x8 pixels to one latent."""
    if value is not None and (value < 8 or value % 8):
        raise SdtuneError(f"{name} must be a positive multiple of 8, got {value}")


def read_image(source: ImageInput, what: str = "image") -> Image.Image:
    """An RGB PIL image from a PIL image or a file; a non-image file is a one-line error."""
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    path = Path(source)
    if not path.is_file():
        raise SdtuneError(f"{what} file '{path}' does not exist")
    try:
        return load_image(path)
    except ImageDecodeError as exc:
        raise SdtuneError(
            f"{what} file '{path}' is not a readable image ({exc}); give a PNG, JPEG or WebP"
        ) from None


def read_mask(source: ImageInput, size: tuple[int, int]) -> Image.Image:
    """A greyscale mask (white = repaint) of exactly the image's `size`."""
    mask = read_image(source, "mask").convert("L")
    if mask.size != size:
        name = source if not isinstance(source, Image.Image) else "the mask"
        raise SdtuneError(
            f"mask {name} is {mask.width}x{mask.height} but the image is {size[0]}x{size[1]}; "
            "give a mask of the image's size (white = repaint, black = keep)"
        )
    return mask


def read_depth_map(source: ImageInput | Any, size: tuple[int, int]) -> Any:
    """A depth map as a (1, H, W) float tensor: a tensor as given, or a greyscale image file.

    Near is bright, as the DPT estimator outputs; the pipeline rescales it to [-1, 1] itself,
    so only the relative values matter. 16-bit PNGs keep their precision.
    """
    import numpy as np
    import torch

    if isinstance(source, torch.Tensor):
        return source if source.dim() == 3 else source.reshape(1, *source.shape[-2:])
    if isinstance(source, Image.Image):
        depth = source
    else:
        path = Path(source)
        if not path.is_file():
            raise SdtuneError(f"depth map file '{path}' does not exist")
        try:
            depth = Image.open(path)
            depth.load()
        except (OSError, ValueError, SyntaxError) as exc:
            raise SdtuneError(
                f"depth map '{path}' is not a readable image ({exc}); give a greyscale PNG"
            ) from None
    if depth.size != size:
        raise SdtuneError(
            f"depth map is {depth.width}x{depth.height} but the image is {size[0]}x{size[1]}; "
            "give a depth map of the image's size"
        )
    mode = "I" if depth.mode.startswith("I") else "L"
    array = np.asarray(depth.convert(mode), dtype=np.float32)
    return torch.from_numpy(array / max(float(array.max()), 1.0))[None]
