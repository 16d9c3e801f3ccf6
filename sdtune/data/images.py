"""Safe image decoding: every image becomes an RGB PIL image, or a clear reason why not.

Photos from phones carry an EXIF orientation; PNGs carry alpha; scans come as CMYK or 16-bit.
Training wants plain RGB the right way up, so all of that is handled here, once.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import BinaryIO

from PIL import Image, ImageOps

# Every extension pillow can open that people keep training images in.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")

# Pillow's own bomb guard warns at this many pixels and errors at twice that; refuse at the warning.
MAX_IMAGE_PIXELS = 89_478_485


class ImageDecodeError(Exception):
    """An image that cannot be used for training, with the reason."""


def load_image(
    path: str | Path | BinaryIO, background: tuple[int, int, int] = (255, 255, 255)
) -> Image.Image:
    """Open an image (a file or bytes) as upright RGB: EXIF orientation applied, alpha
    composited on `background`."""
    path = Path(path) if isinstance(path, str) else path
    try:
        if isinstance(path, Path) and path.stat().st_size == 0:
            raise ImageDecodeError("empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.width * img.height > MAX_IMAGE_PIXELS:
                    raise ImageDecodeError(
                        f"{img.width}x{img.height} pixels is over the {MAX_IMAGE_PIXELS} limit"
                    )
                img.seek(0)  # first frame of animations
                img.load()
                img = ImageOps.exif_transpose(img)
                return _to_rgb(img, background)
    except ImageDecodeError:
        raise
    except (
        OSError,
        ValueError,
        SyntaxError,
        Image.DecompressionBombWarning,
        Image.DecompressionBombError,
    ) as exc:
        raise ImageDecodeError(f"cannot decode: {exc}") from None


def _to_rgb(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits instead of clipping everything to white.
        img = img.point(lambda v: v / 256).convert("L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, background + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")
