"""Small JPEG previews of dataset images, made once and kept in a cache folder.

A thumbnail is named after the image's resolved path, modification time and byte size (and the
thumbnail size), so an image edited in place gets a new one and an unchanged image is never
decoded twice. Images are decoded as training decodes them (sdtune.data.images: upright, alpha
on white); the file is written under a temporary name and renamed, so a reader or a second
writer never sees half a thumbnail. Old thumbnails of edited images are left in the cache.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

from PIL import Image

from sdtune.data.files import save_atomic
from sdtune.data.images import ImageDecodeError, load_image
from sdtune.errors import SdtuneError

THUMBNAIL_FORMAT = 1  # bump when the way thumbnails are made changes: old ones are not reused
JPEG_QUALITY = 85


def thumbnail(cache_dir: str | Path, image_path: str | Path, size: int = 256) -> Path:
    """The cached JPEG of `image_path` whose longest side is `size` (or the image's own, when
    smaller: nothing is enlarged); made now if there is none for this version of the file."""
    if size < 1:
        raise SdtuneError(f"thumbnail size {size} must be at least 1 pixel")
    image = Path(image_path)
    try:
        resolved = image.resolve(strict=True)
        stat = resolved.stat()
    except OSError as exc:
        raise SdtuneError(f"cannot make a thumbnail of '{image}': {exc.strerror or exc}") from None
    target = Path(cache_dir) / thumbnail_name(resolved, stat.st_mtime_ns, stat.st_size, size)
    if target.is_file():
        return target
    try:
        img = load_image(resolved)
    except ImageDecodeError as exc:
        raise SdtuneError(f"cannot make a thumbnail of '{image}': {exc}") from None
    img.thumbnail((size, size), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        save_atomic(target, buffer.getvalue())
    except OSError as exc:
        raise SdtuneError(f"cannot write thumbnail '{target}': {exc.strerror or exc}") from None
    return target


def thumbnail_name(resolved: Path, mtime_ns: int, byte_size: int, size: int) -> str:
    """The cache file name of one version of one image at one size."""
    key = f"{THUMBNAIL_FORMAT}\0{resolved}\0{mtime_ns}\0{byte_size}\0{size}"
    return f"{hashlib.sha256(key.encode('utf-8', 'surrogateescape')).hexdigest()[:32]}.jpg"
