"""Checkpoints that make resume exact: the adapter plus every piece of training state.

A checkpoint folder `checkpoints/step-000100/` holds the adapter (usable on its own) and
`training_state.pt`: trainable tensors, optimizer, LR schedule, EMA, the position in the data,
the state of every random generator, the run's id and its config. It is written under a temporary
name and renamed into place only when complete; its `COMPLETE` marker, written last, lists every
file with its size, and a folder counts as complete only if all of them are there. Old
checkpoints are pruned only after the new one exists, by renaming them out of the way first
(`.pruning-*`) and deleting them after, so a kill at any moment leaves the last good checkpoint
intact, never a half-deleted folder that looks whole; the next start removes what a kill left.
"""

from __future__ import annotations

import os
import pickle
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sdtune.errors import SdtuneError, first_line, pickle_refusal


@dataclass
class Progress:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # passes over the data started
    batch_in_epoch: int = 0  # micro-batches of the current pass already trained on


CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "training_state.pt"
ADAPTER_FILE = "pytorch_lora_weights.safetensors"
COMPLETE_MARKER = "COMPLETE"
_PREFIX = "step-"
_TMP_PREFIX = ".tmp-"  # a checkpoint being written
_PRUNING_PREFIX = ".pruning-"  # a checkpoint being deleted


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
    tmp = folder / f"{_TMP_PREFIX}{checkpoint_name(step)}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # a torn write of an earlier, killed attempt
        tmp.mkdir()
        write_adapter(tmp)
        check_state_finite(state, tmp / STATE_FILE)
        torch.save(state, tmp / STATE_FILE)
        write_manifest(tmp, f"{step}")
    except (OSError, SdtuneError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a partial checkpoint behind
        _raise_write_failed(root, tmp, step, exc)
    final = folder / checkpoint_name(step)
    if final.exists():  # the same step saved again after a resume: replace it whole
        remove_folder(final)
    os.replace(tmp, final)
    if keep_last > 0:
        for old in list_checkpoints(root)[:-keep_last]:
            remove_folder(old)
    return final


def write_manifest(folder: Path, title: str) -> None:
    """`folder/COMPLETE`, written last: `title`, then each file's name and size."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != COMPLETE_MARKER)
    lines = [title] + [f"{p.name} {p.stat().st_size}" for p in files]
    tmp = folder / f"{COMPLETE_MARKER}.tmp"
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, folder / COMPLETE_MARKER)


def is_complete(folder: Path) -> bool:
    """Whether `folder/COMPLETE` exists and every file it lists is there, at its listed size.

    A marker from before the list existed (one line, the step) needs the state and the adapter."""
    try:
        lines = (folder / COMPLETE_MARKER).read_text(encoding="utf-8").splitlines()[1:]
    except (OSError, UnicodeDecodeError):
        return False
    listed = [line.rsplit(" ", 1) for line in lines if line.strip()]
    if not listed:
        listed = [[STATE_FILE, ""], [ADAPTER_FILE, ""]]
    for entry in listed:
        path = folder / entry[0]
        if not path.is_file():
            return False
        if len(entry) == 2 and entry[1] and str(path.stat().st_size) != entry[1]:
            return False
    return True


def remove_folder(folder: Path) -> None:
    """Rename `folder` to `.pruning-<name>` beside it, then delete it: a kill half-way through
    the delete leaves a name no lister takes for a checkpoint (the next start removes it)."""
    doomed = folder.with_name(f"{_PRUNING_PREFIX}{folder.name}")
    if doomed.exists():
        shutil.rmtree(doomed, ignore_errors=True)
    os.replace(folder, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def remove_checkpoint_leftovers(root: Path) -> list[str]:
    """Delete what kills left under `root/checkpoints/`: torn writes (`.tmp-*`), half-done
    deletes (`.pruning-*`) and `step-*` folders that are not complete. Returns their names."""
    folder = root / CHECKPOINTS_DIR
    if not folder.is_dir():
        return []
    removed = []
    for path in sorted(folder.iterdir()):
        if not path.is_dir():
            continue
        if path.name.startswith((_TMP_PREFIX, _PRUNING_PREFIX)):
            shutil.rmtree(path, ignore_errors=True)
        elif path.name.startswith(_PREFIX) and not is_complete(path):
            remove_folder(path)
        else:
            continue
        removed.append(path.name)
    return removed


def check_state_finite(state: dict, path: Path) -> None:
    """Refuse to save a training state whose floating-point tensors hold NaN or infinity."""
    bad = [name for name, t in _float_tensors(state, "") if not bool(torch.isfinite(t).all())]
    if bad:
        raise SdtuneError(f"not writing '{path}': non-finite values in {', '.join(bad[:3])}")


def _float_tensors(value, name: str):
    if isinstance(value, torch.Tensor):
        if value.is_floating_point():
            yield name, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _float_tensors(item, f"{name}.{key}" if name else str(key))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _float_tensors(item, f"{name}[{i}]")


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
        if p.name.startswith(_PREFIX) and p.name[len(_PREFIX) :].isdigit() and is_complete(p)
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
    if not is_complete(path):
        raise SdtuneError(
            f"train.resume: '{path}' is not a complete checkpoint folder (expected "
            f"{COMPLETE_MARKER} and every file it lists in it), or use train.resume=latest"
        )
    return path


def load_training_state(checkpoint: Path) -> dict:
    """The saved state, read with weights-only unpickling (tensors and plain values only)."""
    path = checkpoint / STATE_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a hostile, torn or foreign file: say which one
        reason = pickle_refusal(exc) if isinstance(exc, pickle.UnpicklingError) else None
        if reason:
            raise SdtuneError(
                f"{path} holds code or objects other than tensors and was not loaded ({reason}); "
                "resume from a checkpoint sdtune wrote"
            ) from None
        raise SdtuneError(f"cannot read {path}: {first_line(exc)}") from None
    if not isinstance(state, dict) or not isinstance(state.get("progress"), dict):
        raise SdtuneError(f"cannot read {path}: it is not an sdtune training state")
    return state
