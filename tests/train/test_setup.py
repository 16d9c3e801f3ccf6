import importlib.util

import pytest

from sdtune.config import load_config
from sdtune.errors import SdtuneError
from sdtune.train.setup import check_inputs, trackers


def test_trackers_and_a_missing_wandb(monkeypatch):
    assert trackers("tensorboard") == ["tensorboard"] and trackers("none") == []
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SdtuneError, match="wandb is not installed.*log_with=tensorboard"):
        trackers("all")


def test_resume_latest_without_checkpoints_is_a_clear_error(star_images, tmp_path):
    cfg = load_config(
        None,
        {
            "model.path": "m",
            "data.dir": str(star_images),
            "output.dir": str(tmp_path / "run"),
            "train.resume": "latest",
        },
    )
    with pytest.raises(SdtuneError, match="has no checkpoints"):
        check_inputs(cfg)
    cfg.train.resume = str(tmp_path)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    check_inputs(cfg)  # a folder given by path is checked when the run resolves it
