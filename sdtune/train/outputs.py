"""The run folder: created fresh, never silently written over, never left half-written.

- `output.overwrite=true` over a folder that holds files moves them into `previous-N/` inside
  it (and says so), so an older run's checkpoints can never be taken for the new run's.
- The folder records its run's id (`run-id`), which every checkpoint also holds; resume
  refuses a checkpoint of another run.
- The final files (adapter, EMA, kohya file, model card, `config.yaml`) are written into
  `.final-tmp/`, listed in its `COMPLETE` marker, and only then moved into place, `config.yaml`
  last. Until then the folder keeps its earlier state; a kill half-way through the moves is
  finished at the next start, a kill before the marker is rolled back.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from pathlib import Path

from sdtune.errors import SdtuneError
from sdtune.train.checkpoint import COMPLETE_MARKER, remove_checkpoint_leftovers, write_manifest

logger = logging.getLogger("sdtune.train")

PREVIOUS_PREFIX = "previous-"
_MOVING_PREFIX = ".moving-previous-"  # earlier contents being moved aside
RUN_ID_FILE = "run-id"
FINAL_STAGING = ".final-tmp"
CONFIG_FILE = "config.yaml"


def check_output_dir(folder: str | Path, overwrite: bool) -> Path:
    """Refuse a `folder` that already holds files unless `overwrite` is set; create nothing."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise SdtuneError(f"output.dir '{folder}' is a file, not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise SdtuneError(
            f"output folder '{folder}' already holds files (a previous run?); choose another "
            "output.dir, or set output.overwrite=true (its files are kept in previous-N/)"
        )
    return folder


def prepare_output_dir(
    folder: str | Path, overwrite: bool, resuming: bool = False, main_process: bool = True
) -> Path:
    """Check `folder` as above and create it. A fresh run (`overwrite`, not resuming) over a
    folder that holds files first moves them aside into `previous-N/` (main process only)."""
    folder = check_output_dir(folder, overwrite or resuming)
    folder.mkdir(parents=True, exist_ok=True)
    if main_process and not resuming:
        kept = move_earlier_run_aside(folder)
        if kept is not None:
            logger.warning(
                "output.overwrite: what '%s' held is kept in '%s' (delete it when not needed)",
                folder,
                kept,
            )
    return folder


def move_earlier_run_aside(folder: Path) -> Path | None:
    """Move everything in `folder` except earlier `previous-*` folders into `previous-N/`.

    Entries go into `.moving-previous-N/` first, renamed to `previous-N/` when all are in, so a
    kill half-way leaves nothing that a run would read as its own (the next start goes on)."""
    moving = sorted(folder.glob(f"{_MOVING_PREFIX}*"))
    entries = [
        p for p in folder.iterdir() if not p.name.startswith((PREVIOUS_PREFIX, _MOVING_PREFIX))
    ]
    if not entries and not moving:
        return None
    if moving:
        target = moving[0]
    else:
        taken = {p.name for p in folder.iterdir()}
        n = 1
        while f"{PREVIOUS_PREFIX}{n}" in taken or f"{_MOVING_PREFIX}{n}" in taken:
            n += 1
        target = folder / f"{_MOVING_PREFIX}{n}"
    try:
        target.mkdir(exist_ok=True)
        for entry in entries:
            os.replace(entry, target / entry.name)
        kept = folder / (PREVIOUS_PREFIX + target.name[len(_MOVING_PREFIX) :])
        os.replace(target, kept)
    except OSError as exc:
        raise SdtuneError(
            f"cannot move the earlier contents of '{folder}' aside: {exc.strerror or exc}; "
            "nothing was deleted"
        ) from None
    return kept


def remove_leftovers(folder: Path) -> None:
    """What kills left: finish or roll back the final files, delete torn or half-deleted
    checkpoints. Main process, before the run writes anything."""
    staging = folder / FINAL_STAGING
    if staging.is_dir():
        if (staging / COMPLETE_MARKER).is_file():
            commit_final_files(folder)
            logger.warning("finished moving the final files a stopped run had written")
        else:
            shutil.rmtree(staging, ignore_errors=True)
    removed = remove_checkpoint_leftovers(folder)
    if removed:
        logger.warning("removed what a stopped run left in checkpoints/: %s", ", ".join(removed))


def read_run_id(folder: Path) -> str | None:
    try:
        return (folder / RUN_ID_FILE).read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def write_run_id(folder: Path, run_id: str | None = None) -> str:
    """Record the folder's run id (a new one unless given); returns it."""
    run_id = run_id or uuid.uuid4().hex
    tmp = folder / f"{RUN_ID_FILE}.tmp"
    try:
        tmp.write_text(run_id + "\n", encoding="utf-8")
        os.replace(tmp, folder / RUN_ID_FILE)
    except OSError as exc:
        raise SdtuneError(f"cannot write '{folder / RUN_ID_FILE}': {exc.strerror or exc}") from None
    return run_id


def begin_final_files(folder: Path) -> Path:
    """An empty `.final-tmp/` in `folder` for the final files."""
    staging = folder / FINAL_STAGING
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    return staging


def commit_final_files(folder: Path) -> None:
    """List the staged files in their marker, then move each into `folder`, config last.

    Called again on a staging folder whose marker exists, it moves what is still there."""
    staging = folder / FINAL_STAGING
    try:
        if not (staging / COMPLETE_MARKER).is_file():
            write_manifest(staging, "final")
        names = sorted(
            (p.name for p in staging.iterdir() if p.name != COMPLETE_MARKER),
            key=lambda name: name == CONFIG_FILE,
        )
        for name in names:
            os.replace(staging / name, folder / name)
        shutil.rmtree(staging)
    except OSError as exc:
        raise SdtuneError(
            f"cannot move the final files into '{folder}': {exc.strerror or exc}; they are "
            f"complete in '{staging}'"
        ) from None


def run_is_complete(folder: Path) -> bool:
    """Whether `folder` holds a finished run: its config written last, nothing left staged."""
    return (folder / CONFIG_FILE).is_file() and not (folder / FINAL_STAGING).exists()
