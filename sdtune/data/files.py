"""Writing files beside the user's data without ever leaving half of one.

A write goes to a hidden temporary file in the same folder and is renamed over the target
(`os.replace`, atomic on one file system): a reader, a crash or a second writer sees the old
file or the new one, never a mix. A replaced file keeps its permission bits.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def save_atomic(path: Path, data: bytes) -> Path:
    """Write `data` to `path` through a temporary file in its folder; OSError if it fails, and
    then `path` is as it was and no temporary file is left."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:  # "x": a fresh file, created with the user's umask
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if path.is_file():
            os.chmod(tmp, path.stat().st_mode & 0o7777)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
