"""Tiny pipelines of every family, built once per test session and shared (read-only)."""

from __future__ import annotations

import pytest


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
