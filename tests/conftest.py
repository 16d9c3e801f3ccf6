"""Shared fixtures: tiny pipelines of every family (built once per session, read-only), a tiny
SD 1 model saved as a diffusers folder, and a small captioned image set.

Everything is built in-process from config; no test touches the network.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One worker per core (`-n 2` on 2 cores): torch's own threads would make them fight.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)


@pytest.fixture
def train_in_two_processes():
    """Runs `sdtune train ITEMS...` in 2 CPU processes under torchrun (gloo); returns stdout.
    Given a RunConfig instead of key=value items, passes every value it holds."""

    def run(cfg) -> str:
        items = cfg if isinstance(cfg, list) else [
            f"{section}.{key}={value}"
            for section, values in vars(cfg).items()
            for key, value in vars(values).items()
            if value is not None
        ]  # fmt: skip
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += ["--nproc_per_node", "2", "-m", "sdtune.cli.main", "train", *items]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        return proc.stdout

    return run


@pytest.fixture(scope="session")
def tiny_sd1_dir(tmp_path_factory):
    """A tiny random SD 1 pipeline saved with `save_pretrained` (seeded: same weights every run)."""
    from sdtune.models.tiny import build_tiny_pipeline

    folder = tmp_path_factory.mktemp("tiny-sd1")
    build_tiny_pipeline("sd1", seed=0).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def star_images(tmp_path_factory):
    """Eight rendered 64 px star images with caption sidecars that contain the trigger `sks`."""
    from sdtune.data.synthetic import write_shape_dataset

    folder = tmp_path_factory.mktemp("stars")
    write_shape_dataset(folder, shape="star", count=8, size=64, trigger="sks", seed=0)
    return folder


@pytest.fixture(scope="session")
def tiny_pipe():
    """`tiny_pipe(family)`: the seed-0 tiny pipeline of `family`; do not mutate it."""
    from sdtune.models.tiny import build_tiny_pipeline

    cache = {}

    def get(family: str):
        if family not in cache:
            pipe = build_tiny_pipeline(family, seed=0)
            pipe.set_progress_bar_config(disable=True)
            cache[family] = pipe
        return cache[family]

    return get
