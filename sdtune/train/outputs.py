"""The run folder: created fresh, never silently written over."""

from __future__ import annotations

from pathlib import Path

from sdtune.errors import SdtuneError


def check_output_dir(folder: str | Path, overwrite: bool) -> Path:
    """Refuse a `folder` that already holds files unless `overwrite` is set; create nothing."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise SdtuneError(f"output.dir '{folder}' is a file, not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise SdtuneError(
            f"output folder '{folder}' already holds files (a previous run?); "
            "choose another output.dir, or set output.overwrite=true to write into it"
        )
    return folder


def prepare_output_dir(folder: str | Path, overwrite: bool) -> Path:
    """Check `folder` as above, then create it."""
    folder = check_output_dir(folder, overwrite)
    folder.mkdir(parents=True, exist_ok=True)
    return folder
