"""A real kill -9 in the middle of a run, then `train.resume=latest`: the same adapter, bitwise.

All three runs go through the CLI in fresh processes, so they share the same thread settings
(CPU kernels with other thread counts may round differently)."""

import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from sdtune.train.checkpoint import list_checkpoints


def _command(settings: dict, out, *extra):
    args = [f"{k}={v}" for k, v in settings.items()] + [f"output.dir={out}", *extra]
    return [sys.executable, "-m", "sdtune.cli.main", "train", *args]


def test_kill_9_then_resume_equals_the_uninterrupted_run(tiny_sd1_dir, star_images, tmp_path):
    settings = {
        "model.path": tiny_sd1_dir,
        "data.dir": star_images,
        "data.resolution": 64,
        "data.random_flip": "true",
        "train.batch_size": 2,
        "train.max_steps": 40,
        "train.learning_rate": 1e-3,
        "train.checkpoint_every_n_steps": 4,
        "train.keep_checkpoints": 2,
        "lora.rank": 4,
    }
    whole = subprocess.run(
        _command(settings, tmp_path / "whole"), capture_output=True, text=True, timeout=600
    )
    assert whole.returncode == 0, whole.stderr[-2000:]
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        _command(settings, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 300
    while not list_checkpoints(out) or list_checkpoints(out)[-1].name < "step-000012":
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "the run never reached step 12"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # no chance to clean up: maybe mid-step, maybe mid-write
    proc.wait()
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    resumed = subprocess.run(
        _command(settings, out, "train.resume=latest"), capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    first = load_file(str(tmp_path / "whole" / "pytorch_lora_weights.safetensors"))
    second = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
