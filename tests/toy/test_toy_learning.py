"""A shortened demo on the shipped toy base: the LoRA must teach the held-out ring.

This is the check that fine-tuning *learns*: the base draws no rings for the trigger prompts,
and the adapter must make it draw them in at least 30% more of them without losing the held-in
shapes (the full demo trains 800 steps instead of 500; with these settings, 3% -> 57% rings
and held-in shape 92% -> 94% were measured while the loader still dropped the adapter's
attention layers; the whole adapter passes the same assertions). Breaks it was seen to catch: training latents without the
VAE's scaling factor, the adapter not fused at inference, the text encoder's part not saved.
"""

import pytest
from PIL import Image
from safetensors import safe_open

from sdtune.demo import DemoSettings, run_demo

SHORT = DemoSettings(max_steps=500, seeds_per_prompt=2)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return run_demo(tmp_path_factory.mktemp("toy") / "demo", SHORT)


def test_short_demo_writes_adapter_grid_curve_and_samples(demo):
    with safe_open(str(demo.adapter_path), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("text_encoder.") for k in keys)
    assert any(k.startswith("unet.") for k in keys)
    grid = Image.open(demo.grid_path)
    assert grid.height == 2 * 128 and grid.width > 4 * 128
    assert Image.open(demo.loss_curve_path).size == (640, 400)
    assert len(list((demo.out / "samples-after").glob("*.png"))) == 4
    assert "concept" in demo.summary()


def test_short_demo_teaches_the_ring_and_keeps_the_held_in_shapes(demo):
    summary = demo.summary()
    assert demo.before.concept_rate <= 0.1, summary
    assert demo.after.concept_rate >= demo.before.concept_rate + 0.3, summary
    assert demo.after.shape_rate >= demo.before.shape_rate - 0.1, summary
