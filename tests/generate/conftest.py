"""Tiny pipelines of every family, input images, and LoRA adapters made without training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sdtune.adapters.io import save_adapter
from sdtune.adapters.lora import build_lora_config
from sdtune.models.tiny import build_tiny_pipeline

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]


def tiny(family: str):
    pipe = build_tiny_pipeline(family, seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_adapter(family: str, folder, seed: int = 1, scale: float = 0.1):
    """A LoRA on a fresh tiny model of `family` with random B weights (a zero B is a no-op),
    saved the way training saves it, with the family in its header."""
    pipe = build_tiny_pipeline(family, seed=0)
    pipe.unet.add_adapter(build_lora_config(4, 8, 0.0, ATTENTION))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in pipe.unet.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)
    return save_adapter(folder, pipe.unet, info={"family": family})


@pytest.fixture(autouse=True, scope="package")
def one_thread():
    """Tiny models run several times faster on one thread on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def rgb64():
    rng = np.random.RandomState(0)
    return Image.fromarray((rng.rand(64, 64, 3) * 255).astype("uint8"))


@pytest.fixture(scope="session")
def mask64():
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    return mask


@pytest.fixture(scope="session")
def sd1_adapter(tmp_path_factory):
    return make_adapter("sd1", tmp_path_factory.mktemp("sd1-lora"))
