"""A real kill -9 in the middle of a run, then `train.resume=latest`: the same adapter, bitwise."""

import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from sdtune.config import load_config
from sdtune.train.checkpoint import list_checkpoints
from sdtune.train.loop import train


def test_kill_9_then_resume_equals_the_uninterrupted_run(tiny_sd1_dir, star_images, tmp_path):
    settings = {
        "model.path": str(tiny_sd1_dir),
        "data.dir": str(star_images),
        "data.resolution": 64,
        "data.random_flip": "true",
        "train.batch_size": 2,
        "train.max_steps": 40,
        "train.learning_rate": 1e-3,
        "train.checkpoint_every_n_steps": 4,
        "train.keep_checkpoints": 2,
        "lora.rank": 4,
    }
    whole = train(load_config(None, {**settings, "output.dir": str(tmp_path / "whole")}))
    out = tmp_path / "killed"
    args = [f"{k}={v}" for k, v in settings.items()] + [f"output.dir={out}"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "sdtune.cli.main", "train", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 300
    while not list_checkpoints(out) or list_checkpoints(out)[-1].name < "step-000012":
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "the run never reached step 12"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # no chance to clean up: maybe mid-step, maybe mid-write
    proc.wait()
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    resumed = train(
        load_config(None, {**settings, "output.dir": str(out), "train.resume": "latest"})
    )
    first, second = load_file(str(whole.adapter_path)), load_file(str(resumed.adapter_path))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
