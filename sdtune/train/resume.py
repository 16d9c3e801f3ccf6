"""What resume checks before anything loads: the checkpoint's state file, its run and its config.

The state is read (weights-only) before the model loads or a file is written, so a hostile or
torn file costs nothing. The checkpoint records its run's id and config: a checkpoint of
another run is refused, and so is any changed setting that would not continue the same run
(the rank, the targets, the data, the objective, ...), each named with both values. Settings
that only say how long to run or what to log and sample may change, and are logged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdtune.config import RunConfig, config_to_dict
from sdtune.errors import SdtuneError, quote
from sdtune.train import checkpoint as ckpt
from sdtune.train.outputs import read_run_id

logger = logging.getLogger("sdtune.train")

# Settings a resumed run may change: how long it runs, how it logs, checkpoints and samples,
# and how fast it computes (not what).
RESUMABLE_CHANGES = frozenset(
    {
        "train.max_steps",
        "train.resume",
        "train.log_every_n_steps",
        "train.checkpoint_every_n_steps",
        "train.keep_checkpoints",
        "train.num_workers",
        "train.compile",
        "train.attention",
        "train.gradient_checkpointing",
        "train.tf32",
        "data.cache_latents",
        "data.cache_dir",
        "data.cache_text_embeddings",
        "output.dir",
        "output.overwrite",
        "output.export_kohya",
        "output.log_with",
        "output.validation_every_n_steps",
        "output.sample_prompts",
        "output.sample_seed",
        "output.sample_every_n_steps",
        "output.sample_steps",
    }
)
_PATH_KEYS = ("model.path", "model.config_dir", "data.dir", "data.class_dir", "data.dataset")


@dataclass
class ResumePoint:
    folder: Path  # the checkpoint
    state: dict  # its training state, already read
    run_id: str


def flat_config(cfg: RunConfig | dict) -> dict[str, Any]:
    data = cfg if isinstance(cfg, dict) else config_to_dict(cfg)
    return {f"{s}.{k}": v for s, values in data.items() for k, v in values.items()}


def config_fingerprint(cfg: RunConfig | dict) -> str:
    """A hash of the settings a resumed run must keep (all but RESUMABLE_CHANGES)."""
    kept = {k: v for k, v in flat_config(cfg).items() if k not in RESUMABLE_CHANGES}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_resume_point(cfg: RunConfig) -> ResumePoint:
    """The checkpoint `train.resume` names, its state read and checked against `cfg`."""
    out = Path(cfg.output.dir)
    folder = ckpt.resolve_resume(out, cfg.train.resume)
    state = ckpt.load_training_state(folder)
    run_id = state.get("run_id")
    folder_run = read_run_id(out)
    if run_id and folder_run and run_id != folder_run:
        raise SdtuneError(
            f"train.resume: '{folder}' belongs to run {run_id}, but '{out}' holds run "
            f"{folder_run}; resume from one of its own checkpoints, or choose another output.dir"
        )
    saved = state.get("config")
    if isinstance(saved, dict):
        check_resumable(saved, cfg, folder)
    else:
        logger.warning("%s records no config (an older sdtune); settings not compared", folder)
    return ResumePoint(folder, state, run_id or folder_run or "")


def check_resumable(saved: dict, cfg: RunConfig, folder: Path) -> None:
    """Refuse settings that differ from the checkpoint's, except RESUMABLE_CHANGES (logged)."""
    before, now = flat_config(saved), flat_config(cfg)
    refused, allowed = [], []
    for key in now:
        old, new = before.get(key), now[key]
        if key in _PATH_KEYS and isinstance(old, str) and isinstance(new, str) and old and new:
            old, new = _as_path(old), _as_path(new)
        if key not in before or old == new:
            continue
        change = f"{key} {quote(before[key], 60)} -> {quote(now[key], 60)}"
        (allowed if key in RESUMABLE_CHANGES else refused).append(change)
    if refused:
        raise SdtuneError(
            f"train.resume: '{folder}' was trained with other settings: {'; '.join(refused)}; "
            "resume with the checkpoint's values, or start a new run in another output.dir"
        )
    for change in allowed:
        if not change.startswith(("train.resume ", "output.overwrite ")):
            logger.info("resume: %s", change)


def _as_path(value: str) -> str:
    return os.path.abspath(value) if os.path.exists(value) else value
