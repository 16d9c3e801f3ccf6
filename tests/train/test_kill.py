"""Real kills -9 during a run, then `train.resume=latest`: the same adapter, bitwise.

The run is killed three times: from outside in the middle of training, from inside while it
deletes an old checkpoint, and from inside half-way through moving its final files into place.
After each kill no half-deleted or half-written folder counts as complete, and the next start
cleans up what the kill left. All runs go through the CLI in fresh processes, so they share
the same thread settings (CPU kernels with other thread counts may round differently)."""

import os
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from sdtune.train.checkpoint import (
    ADAPTER_FILE,
    CHECKPOINTS_DIR,
    list_checkpoints,
    load_training_state,
)
from sdtune.train.outputs import FINAL_STAGING, run_is_complete

# The CLI with a kill -9 of itself in the middle of a delete of an old checkpoint (`prune`: one
# file gone, the rest there) or of the moves of the final files (`final`: one file moved).
HOOK = """
import os, shutil, signal, sys
mode = sys.argv[1]
real_rmtree, real_replace = shutil.rmtree, os.replace
def dying_rmtree(path, *a, **k):
    adapter = os.path.join(path, "pytorch_lora_weights.safetensors")
    if mode == "prune" and os.path.basename(path).startswith(".pruning-") and os.path.exists(adapter):
        os.unlink(adapter)  # (a leftover of an earlier kill, its adapter gone, is cleaned up)
        os.kill(os.getpid(), signal.SIGKILL)
    return real_rmtree(path, *a, **k)
moved = []
def dying_replace(src, dst):
    if mode == "final" and "/.final-tmp/" in str(src) and "/.final-tmp/" not in str(dst):
        if moved:
            os.kill(os.getpid(), signal.SIGKILL)
        moved.append(dst)
    return real_replace(src, dst)
shutil.rmtree, os.replace = dying_rmtree, dying_replace
from sdtune.cli.main import main
sys.exit(main(sys.argv[2:]))
"""


def _command(settings: dict, out, *extra, hook=None):
    args = [f"{k}={v}" for k, v in settings.items()] + [f"output.dir={out}", *extra]
    if hook:
        return [sys.executable, "-c", HOOK, hook, "train", *args]
    return [sys.executable, "-m", "sdtune.cli.main", "train", *args]


def _assert_nothing_torn_counts(out):
    """Every listed checkpoint has all its files and reads back; the run is not finished."""
    for folder in list_checkpoints(out):
        assert load_training_state(folder)["progress"]["step"] == int(folder.name[5:])
        load_file(str(folder / ADAPTER_FILE))
    assert not run_is_complete(out)


def test_kill_9_then_resume_equals_the_uninterrupted_run(tiny_sd1_dir, star_images, tmp_path):
    settings = {
        "model.path": tiny_sd1_dir,
        "data.dir": star_images,
        "data.resolution": 64,
        "data.random_flip": "true",
        "train.batch_size": 2,
        "train.max_steps": 24,
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
    _assert_nothing_torn_counts(out)
    resume = ("train.resume=latest",)
    for hook, torn in (("prune", CHECKPOINTS_DIR), ("final", FINAL_STAGING)):
        killed = subprocess.run(
            _command(settings, out, *resume, hook=hook), capture_output=True, timeout=600
        )
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
        left = os.listdir(out / torn)
        assert any(n.startswith(".pruning-") for n in left) if hook == "prune" else left
        _assert_nothing_torn_counts(out)
    resumed = subprocess.run(
        _command(settings, out, *resume), capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    assert not any(n.startswith(".") for n in os.listdir(out / CHECKPOINTS_DIR))
    assert run_is_complete(out)
    first = load_file(str(tmp_path / "whole" / "pytorch_lora_weights.safetensors"))
    second = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
