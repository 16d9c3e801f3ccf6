import importlib.util
import logging

import pytest

from sdtune.config import load_config
from sdtune.errors import SdtuneError
from sdtune.train.loop import format_duration, train
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


def test_xformers_is_checked_before_the_model_loads(star_images, tmp_path, monkeypatch):
    cfg = load_config(
        None,
        {
            "model.path": "not-loaded",
            "data.dir": str(star_images),
            "output.dir": str(tmp_path / "run"),
            "train.attention": "xformers",
        },
    )
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SdtuneError, match="xformers is not installed.*train.attention=sdpa"):
        check_inputs(cfg)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(SdtuneError, match="needs a CUDA GPU"):
        check_inputs(cfg)
    cfg.train.attention = "sdpa"
    check_inputs(cfg)


def test_durations_read_naturally():
    assert [format_duration(s) for s in (4.6, 65, 3599, 3720)] == ["5s", "1m05s", "59m59s", "1h02m"]


def test_the_run_estimates_its_time_after_the_first_steps(
    tiny_sd1_dir, star_images, tmp_path, caplog
):
    cfg = load_config(
        None,
        {
            "model.path": str(tiny_sd1_dir),
            "data.dir": str(star_images),
            "data.resolution": 32,
            "lora.rank": 2,
            "train.max_steps": 5,
            "train.log_every_n_steps": 5,
            "output.dir": str(tmp_path / "run"),
            "output.log_with": "none",
        },
    )
    with caplog.at_level(logging.INFO, logger="sdtune.train"):
        train(cfg)
    estimate = [r.getMessage() for r in caplog.records if r.getMessage().startswith("time:")]
    assert len(estimate) == 1 and "over the first 3 steps" in estimate[0]
    assert estimate[0].endswith("for the 2 left")
    assert any(
        r.getMessage().startswith("step 5/5") and "0s left" in r.getMessage()
        for r in caplog.records
    )


@pytest.mark.parametrize("variable", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
def test_sharded_launches_are_refused_before_anything_is_written(
    variable, star_images, tmp_path, monkeypatch
):
    cfg = load_config(
        None,
        {
            "model.path": "not-loaded",
            "data.dir": str(star_images),
            "output.dir": str(tmp_path / "r"),
        },
    )
    monkeypatch.setenv(variable, "true")
    with pytest.raises(SdtuneError, match=f"{variable}=true.*recipes/accelerate/multi-gpu.yaml"):
        check_inputs(cfg)
    assert not (tmp_path / "r").exists()
    monkeypatch.setenv(variable, "false")
    check_inputs(cfg)


def test_auto_precision_is_bf16_where_the_gpu_has_it_and_off_on_a_cpu(monkeypatch):
    from sdtune.train.setup import resolve_mixed_precision

    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert resolve_mixed_precision("auto") == "no"
    assert resolve_mixed_precision("fp16") == "fp16"  # an explicit choice is kept
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.is_bf16_supported", lambda: True)
    assert resolve_mixed_precision("auto") == "bf16"
    monkeypatch.setattr("torch.cuda.is_bf16_supported", lambda: False)
    assert resolve_mixed_precision("auto") == "fp16"
