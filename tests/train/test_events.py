"""A run's events: one stream that the log, the trackers and readers share; stop on request."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import sdtune.train.loop as loop
from sdtune.config import load_config
from sdtune.errors import SdtuneError
from sdtune.train.checkpoint import list_checkpoints
from sdtune.train.events import EventTail, loss_history, read_events
from sdtune.train.loop import train

REPO = Path(__file__).resolve().parents[2]


def _values(tiny_sd1_dir, star_images, out, **overrides):
    values = {
        "model.path": str(tiny_sd1_dir),
        "data.dir": str(star_images),
        "data.resolution": 64,
        "lora.rank": 4,
        "train.batch_size": 2,
        "train.max_steps": 4,
        "train.learning_rate": 1e-3,
        "train.log_every_n_steps": 1,
        "output.dir": str(out),
    }
    values.update(overrides)
    return values


def test_events_describe_the_run_and_the_tensorboard_log_is_made_from_them(
    tiny_sd1_dir, star_images, tmp_path
):
    out = tmp_path / "run"
    values = _values(
        tiny_sd1_dir,
        star_images,
        out,
        **{
            "train.checkpoint_every_n_steps": 2,
            "data.validation_split": 0.25,
            "output.validation_every_n_steps": 2,
            "output.sample_prompts": ["a star"],
            "output.sample_steps": 2,
        },
    )
    result = train(load_config(None, values))
    events = read_events(out)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "finished"
    assert kinds.count("step") == 4 and kinds.count("checkpoint") == 1
    assert kinds.count("validation") == 2 and kinds.count("sample") == 1  # step 2 and the end
    start = events[0]
    assert start["config"] == yaml.safe_load((out / "config.yaml").read_text())
    assert start["items"] == 6 and start["max_steps"] == 4 and start["family"] == "sd1"
    steps = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in steps] == [1, 2, 3, 4]
    assert all(e["loss"] > 0 and e["lr"] > 0 and e["eta_s"] >= 0 for e in steps)
    [checkpoint] = [e for e in events if e["event"] == "checkpoint"]
    assert Path(checkpoint["path"]) == list_checkpoints(out)[0]
    [sample] = [e for e in events if e["event"] == "sample"]
    assert Path(sample["grid"]).is_file()
    assert events[-1]["adapter"] == str(result.adapter_path)
    assert events[-1]["last_loss"] == pytest.approx(steps[-1]["loss"])
    # TensorBoard is a sink of the same events: the same numbers at the same steps.
    logs = next(out.rglob("events.out.tfevents.*")).parent
    scalars = EventAccumulator(str(logs)).Reload()
    logged = [(s.step, s.value) for s in scalars.Scalars("loss")]
    assert logged == [(s, pytest.approx(v, rel=1e-6)) for s, v in loss_history(out)]
    val = [e["val_loss"] for e in events if e["event"] == "validation"]
    assert [s.value for s in scalars.Scalars("val_loss")] == pytest.approx(val, rel=1e-6)


def test_a_failing_run_ends_its_events_with_the_one_line_error(
    tiny_sd1_dir, star_images, tmp_path, monkeypatch
):
    def failing(batch, run):
        raise SdtuneError("the batch could not be read")

    monkeypatch.setattr(loop, "training_step", failing)
    out = tmp_path / "failed"
    with pytest.raises(SdtuneError):
        train(load_config(None, _values(tiny_sd1_dir, star_images, out)))
    last = read_events(out)[-1]
    assert last["event"] == "failed" and last["error"] == "the batch could not be read"


def test_a_tail_reads_each_event_once_and_never_a_half_written_line(tmp_path):
    tail = EventTail(tmp_path)
    assert tail.read_new() == []
    path = tmp_path / "events.jsonl"
    path.write_text('{"event": "start", "step": 0}\n{"event": "st')
    assert tail.read_new() == [{"event": "start", "step": 0}]
    with path.open("a") as f:
        f.write('ep", "step": 1}\n')
    assert tail.read_new() == [{"event": "step", "step": 1}]
    assert tail.read_new() == []


def _start_cli_run(values: dict, env_extra: dict | None = None) -> subprocess.Popen:
    items = [f"{k}={v}" for k, v in values.items()]
    env = {**os.environ, **(env_extra or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "sdtune.cli.main", "train", *items],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_step(out: Path, proc: subprocess.Popen, step: int) -> None:
    tail = EventTail(out)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if any(e["event"] == "step" and e["step"] >= step for e in tail.read_new()):
            return
        time.sleep(0.02)
    raise AssertionError(f"the run never reached step {step}: {proc.communicate()}")


# The stop file is also what the web app's stop button writes; its end-to-end tests (tests/ui)
# stop and resume through it in the default run, so its bit-exact variant here runs with -m slow.
@pytest.mark.parametrize("how", [pytest.param("stop file", marks=pytest.mark.slow), "SIGTERM"])
def test_a_stop_request_checkpoints_exits_cleanly_and_resume_equals_the_whole_run(
    tiny_sd1_dir, star_images, tmp_path, how
):
    # Every run goes through the CLI in its own process, as a user runs it.
    values = _values(tiny_sd1_dir, star_images, tmp_path / "stopped", **{"train.max_steps": 12})
    out = tmp_path / "stopped"
    proc = _start_cli_run(values)
    _wait_for_step(out, proc, 2)
    if how == "stop file":
        (out / "STOP").write_text("")
    else:
        proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    last = read_events(out)[-1]
    assert last["event"] == "stopped" and last["reason"] == how
    assert 2 <= last["step"] < 12, "the run went to the end instead of stopping"
    assert Path(last["checkpoint"]) == list_checkpoints(out)[-1]
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    assert not (out / "STOP").exists()
    assert "continue with train.resume=latest" in stdout
    resumed = _start_cli_run({**values, "train.resume": "latest"})
    assert resumed.communicate(timeout=120) and resumed.returncode == 0
    assert read_events(out)[-1]["event"] == "finished"
    if how == "SIGTERM":
        return  # the exact-resume comparison is the same for both ways of asking
    whole = _start_cli_run({**values, "output.dir": tmp_path / "whole"})
    assert whole.communicate(timeout=120) and whole.returncode == 0
    first = load_file(str(out / "pytorch_lora_weights.safetensors"))
    second = load_file(str(tmp_path / "whole" / "pytorch_lora_weights.safetensors"))
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
