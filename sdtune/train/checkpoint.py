"""Checkpoints that make resume exact: the adapter plus every piece of training state.

A checkpoint folder `checkpoints/step-000100/` holds the adapter (usable on its own) and
`training_state.pt`: trainable tensors, optimizer, LR schedule, EMA, the position in the data and
the state of every random generator. It is written under a temporary name and renamed into place
only when complete, and old checkpoints are pruned only after the new one exists, so a kill at any
moment leaves the last good checkpoint intact and `resume=latest` never picks a torn one.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sdtune.errors import SdtuneError


@dataclass
class Progress:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # passes over the data started
    batch_in_epoch: int = 0  # micro-batches of the current pass already trained on


CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "training_state.pt"
COMPLETE_MARKER = "COMPLETE"
_PREFIX = "step-"


def checkpoint_name(step: int) -> str:
    return f"{_PREFIX}{step:06d}"


def capture_rng_state() -> dict:
    """The state of Python's, NumPy's and torch's (CPU and every CUDA device) generators."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(_as_tuple(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def save_checkpoint(
    root: Path,
    step: int,
    state: dict,
    write_adapter: Callable[[Path], object],
    keep_last: int,
) -> Path:
    """Write checkpoint `step` under `root/checkpoints/`, then prune to the newest `keep_last`."""
    folder = root / CHECKPOINTS_DIR
    tmp = folder / f".tmp-{checkpoint_name(step)}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # a torn write of an earlier, killed attempt
        tmp.mkdir()
        write_adapter(tmp)
        torch.save(state, tmp / STATE_FILE)
        (tmp / COMPLETE_MARKER).write_text(f"{step}\n", encoding="utf-8")
    except (OSError, SdtuneError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a partial checkpoint behind
        _raise_write_failed(root, tmp, step, exc)
    final = folder / checkpoint_name(step)
    if final.exists():  # the same step saved again after a resume: replace it whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep_last > 0:
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _raise_write_failed(root: Path, tmp: Path, step: int, exc: Exception) -> None:
    """Stop the run with one line: what failed, and which checkpoint is still there to resume."""
    if isinstance(exc, OSError):
        where = exc.filename or tmp
        reason = f"cannot write '{where}': {exc.strerror or exc}"
    else:
        reason = str(exc)
    saved = list_checkpoints(root)
    kept = f"'{saved[-1]}' is intact (train.resume=latest)" if saved else "none was saved yet"
    raise SdtuneError(
        f"checkpoint of step {step} not saved: {reason}; the last checkpoint {kept}"
    ) from None


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    folder = root / CHECKPOINTS_DIR
    if not folder.is_dir():
        return []
    found = [
        p
        for p in folder.iterdir()
        if p.name.startswith(_PREFIX)
        and (p / COMPLETE_MARKER).is_file()
        and (p / STATE_FILE).is_file()
    ]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX) :]))


def resolve_resume(root: Path, resume: str) -> Path:
    """`latest` -> the newest complete checkpoint of this run; otherwise a checkpoint folder."""
    if resume == "latest":
        found = list_checkpoints(root)
        if not found:
            raise SdtuneError(
                f"train.resume=latest but '{root / CHECKPOINTS_DIR}' holds no complete checkpoint; "
                "drop train.resume to start afresh"
            )
        return found[-1]
    path = Path(resume)
    if not (path / COMPLETE_MARKER).is_file() or not (path / STATE_FILE).is_file():
        raise SdtuneError(
            f"train.resume: '{path}' is not a complete checkpoint folder "
            f"(expected {STATE_FILE} and {COMPLETE_MARKER} in it), or use train.resume=latest"
        )
    return path


def load_training_state(checkpoint: Path) -> dict:
    """The saved state, read with weights-only unpickling (tensors and plain values only)."""
    try:
        return torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:  # a torn or foreign file: say which one
        raise SdtuneError(f"cannot read {checkpoint / STATE_FILE}: {exc}") from None
