"""Safe image decoding: every image becomes an RGB PIL image, or a clear reason why not.

Photos from phones carry an EXIF orientation; PNGs carry alpha; scans come as CMYK or 16-bit.
Training wants plain RGB the right way up, so all of that is handled here, once.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from PIL import ExifTags, Image, ImageOps

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
    with _opened(Path(path) if isinstance(path, str) else path) as img:
        try:
            img.seek(0)  # first frame of animations
            img.load()
            img = ImageOps.exif_transpose(img)
            return _to_rgb(img, background)
        except _DECODE_ERRORS as exc:
            raise ImageDecodeError(f"cannot decode: {exc}") from None


def probe_image(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image the right way up, read from its header only.

    The checks `load_image` makes before decoding (empty file, unreadable header, too many
    pixels) fail here with the same reasons; a file whose pixel data is torn past its header
    passes here and fails only in `load_image`. Orientation comes from EXIF data stored before
    the pixels (where cameras put it), or from a PNG's EXIF chunk after them, found by skipping
    over the pixel chunks rather than decoding them.
    """
    with _opened(Path(path)) as img:
        try:
            # The base class's getexif reads what the header gave; PNG's own would decode.
            orientation = Image.Image.getexif(img).get(ExifTags.Base.Orientation)
        except _DECODE_ERRORS:
            orientation = None
        if orientation is None and img.format == "PNG":
            orientation = _png_trailing_orientation(Path(path))
        width, height = img.size
    return (height, width) if orientation in _SWAPS_SIDES else (width, height)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_trailing_orientation(path: Path) -> int | None:
    """The EXIF orientation of a PNG's eXIf chunk, read by walking the chunk headers (each
    pixel chunk is skipped with a seek); None without one, or in a file that is not sound."""
    try:
        with path.open("rb") as f:
            if f.read(8) != _PNG_SIGNATURE:
                return None
            while header := f.read(8):
                if len(header) < 8:
                    return None
                length, kind = int.from_bytes(header[:4], "big"), header[4:]
                if kind == b"eXIf":
                    exif = Image.Exif()
                    exif.load(f.read(length))
                    return exif.get(ExifTags.Base.Orientation)
                if kind == b"IEND":
                    return None
                f.seek(length + 4, 1)  # the chunk's data and its CRC
    except (OSError, ValueError, SyntaxError):
        return None
    return None


_SWAPS_SIDES = (5, 6, 7, 8)  # EXIF orientations that turn the image a quarter
_DECODE_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    Image.DecompressionBombWarning,
    Image.DecompressionBombError,
)


@contextmanager
def _opened(path: Path | BinaryIO) -> Iterator[Image.Image]:
    """The image opened lazily (header read, pixels not yet), after the checks every use of it
    makes: not empty, a format pillow knows, at most MAX_IMAGE_PIXELS."""
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
                yield img
    except _DECODE_ERRORS as exc:
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
