"""What resume refuses before anything loads, and runs that never save a wrong result: an
overwrite over an older run, a resumed run with changed settings, a foreign or hostile
checkpoint, and an update that turns the weights non-finite."""

import os
import types

import pytest
import torch
from safetensors.torch import load_file

import sdtune.train.loop as loop
from sdtune.config import config_to_dict
from sdtune.errors import SdtuneError
from sdtune.train import checkpoint as ckpt
from sdtune.train.loop import train
from sdtune.train.outputs import FINAL_STAGING, read_run_id, write_run_id
from sdtune.train.resume import check_resumable, config_fingerprint
from tests.train.test_resume import _config

LIGHT = {
    "lora.train_text_encoder": False,
    "train.ema_decay": 0.0,
    "data.shuffle_tags": False,
    "data.tag_dropout": 0.0,
}


def _fake_checkpoint(root, step, cfg, run_id="run-a", **extra):
    """A complete checkpoint folder whose state records `cfg` (no model needed)."""
    state = {
        "progress": {"step": step, "epoch": 0, "batch_in_epoch": 0},
        "run_id": run_id,
        "config": config_to_dict(cfg),
        "config_fingerprint": config_fingerprint(cfg),
        **extra,
    }
    write = lambda d: torch.save({}, d / ckpt.ADAPTER_FILE)  # noqa: E731
    return ckpt.save_checkpoint(root, step, state, write, 0)


def _snapshot(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_mtime_ns) for p in folder.rglob("*"))


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(cfg):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loop, "load_base", refuse)


def test_changed_settings_are_refused_by_name_before_the_model_loads(
    tiny_sd1_dir, star_images, tmp_path, no_model_load
):
    out = tmp_path / "run"
    saved = _config(tiny_sd1_dir, star_images, out, **{"lora.train_text_encoder": False})
    saved.train.mixed_precision = "no"  # as the run resolved it
    _fake_checkpoint(out, 2, saved)
    write_run_id(out, "run-a")
    before = _snapshot(out)
    changed = _config(
        tiny_sd1_dir,
        star_images,
        out,
        **{"lora.rank": 8, "lora.train_text_encoder": True, "train.resume": "latest"},
    )
    with pytest.raises(SdtuneError) as info:
        train(changed)
    message = str(info.value)
    assert "lora.rank 4 -> 8" in message
    assert "lora.train_text_encoder False -> True" in message
    assert "\n" not in message and _snapshot(out) == before  # nothing loaded, nothing written


def test_a_checkpoint_of_another_run_is_refused(tiny_sd1_dir, star_images, tmp_path, no_model_load):
    cfg = _config(tiny_sd1_dir, star_images, tmp_path / "other")
    cfg.train.mixed_precision = "no"
    theirs = _fake_checkpoint(tmp_path / "other", 2, cfg, run_id="run-b")
    mine = tmp_path / "mine"
    mine.mkdir()
    write_run_id(mine, "run-a")
    resumed = _config(tiny_sd1_dir, star_images, mine, **{"train.resume": str(theirs)})
    with pytest.raises(SdtuneError, match="belongs to run run-b, but .* holds run run-a"):
        train(resumed)


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_hostile_state_file_is_refused_before_anything_loads_or_is_written(
    tiny_sd1_dir, star_images, tmp_path, no_model_load
):
    out = tmp_path / "run"
    marker = tmp_path / "ran"
    folder = _fake_checkpoint(out, 2, _config(tiny_sd1_dir, star_images, out))
    torch.save({"progress": {"step": 2}, "x": _Payload(marker)}, folder / ckpt.STATE_FILE)
    ckpt.write_manifest(folder, "2")
    before = _snapshot(out)
    resumed = _config(tiny_sd1_dir, star_images, out, **{"train.resume": "latest"})
    with pytest.raises(SdtuneError, match="holds code or objects other than tensors"):
        train(resumed)
    assert not marker.exists() and _snapshot(out) == before


def test_how_long_and_what_to_log_may_change_and_are_logged(tiny_sd1_dir, star_images, caplog):
    saved = _config(tiny_sd1_dir, star_images, "out")
    now = _config(
        tiny_sd1_dir,
        star_images,
        "out",
        **{"train.max_steps": 60, "train.log_every_n_steps": 5, "output.sample_steps": 3},
    )
    assert config_fingerprint(saved) == config_fingerprint(now)
    with caplog.at_level("INFO", logger="sdtune.train"):
        check_resumable(config_to_dict(saved), now, "ckpt")
    for change in ("train.max_steps 6 -> 60", "train.log_every_n_steps 1 -> 5"):
        assert change in caplog.text
    now.train.seed = 1
    assert config_fingerprint(saved) != config_fingerprint(now)
    with pytest.raises(SdtuneError, match="train.seed 0 -> 1"):
        check_resumable(config_to_dict(saved), now, "ckpt")


def test_overwrite_over_an_older_run_never_picks_its_checkpoints(
    tiny_sd1_dir, star_images, tmp_path, caplog
):
    """The older run's step-000100/110 go to previous-1/; the new run resumes its own."""
    out = tmp_path / "run"
    older = _config(tiny_sd1_dir, star_images, out)
    for step in (100, 110):
        _fake_checkpoint(out, step, older, run_id="older")
    settings = {**LIGHT, "train.max_steps": 3, "train.checkpoint_every_n_steps": 1}
    settings["train.keep_checkpoints"] = 2
    with caplog.at_level("INFO", logger="sdtune.train"):
        first = train(
            _config(tiny_sd1_dir, star_images, out, **settings, **{"output.overwrite": True})
        )
    assert "previous-1" in caplog.text
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-000001", "step-000002"]
    assert [p.name for p in ckpt.list_checkpoints(out / "previous-1")] == [
        "step-000100",
        "step-000110",
    ]
    run_id = read_run_id(out)
    assert run_id and ckpt.load_training_state(ckpt.list_checkpoints(out)[-1])["run_id"] == run_id
    assert (out / "config.yaml").is_file() and not (out / FINAL_STAGING).exists()
    caplog.clear()
    with caplog.at_level("INFO", logger="sdtune.train"):
        resumed = train(
            _config(
                tiny_sd1_dir,
                star_images,
                out,
                **{**settings, "train.max_steps": 4, "train.resume": "latest"},
            )
        )
    assert f"resumed from {out / 'checkpoints' / 'step-000002'} at step 2" in caplog.text
    assert "resume: train.max_steps 3 -> 4" in caplog.text
    assert resumed.steps == 4 and read_run_id(out) == run_id
    weights = load_file(str(resumed.adapter_path))
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert first.adapter_path == resumed.adapter_path


def test_an_update_that_turns_weights_infinite_is_never_saved(
    tiny_sd1_dir, star_images, tmp_path, monkeypatch
):
    """A finite loss and gradient, but the last update overflows (as learning_rate=1e38 does)."""
    real = loop.build_optimizer

    def overflowing(*args, **kwargs):
        optimizer, steps = real(*args, **kwargs), {"n": 0}
        step = optimizer.step

        def step_then_overflow(self, *a, **k):
            result = step(*a, **k)
            steps["n"] += 1
            if steps["n"] == 2:
                with torch.no_grad():
                    optimizer.param_groups[0]["params"][0].view(-1)[0] = float("inf")
            return result

        optimizer.step = types.MethodType(step_then_overflow, optimizer)
        return optimizer

    monkeypatch.setattr(loop, "build_optimizer", overflowing)
    out = tmp_path / "run"
    settings = {**LIGHT, "train.max_steps": 2, "train.checkpoint_every_n_steps": 1}
    with pytest.raises(SdtuneError, match="update of step 2 made 1 of .* LoRA weights non-finite"):
        train(_config(tiny_sd1_dir, star_images, out, **settings))
    assert sorted(os.listdir(out / "checkpoints")) == ["step-000001"]
    assert not (out / ckpt.ADAPTER_FILE).exists() and not (out / FINAL_STAGING).exists()
    kept = load_file(str(out / "checkpoints" / "step-000001" / ckpt.ADAPTER_FILE))
    assert all(torch.isfinite(t).all() for t in kept.values())
