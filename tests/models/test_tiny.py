import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from sdtune.models.families import get_family
from sdtune.models.tiny import TINY_RESOLUTION, TINY_UPSCALER_INPUT, build_tiny_pipeline

R = TINY_RESOLUTION


def _image(side: int) -> Image.Image:
    pixels = np.random.RandomState(0).randint(0, 256, (side, side, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _mode_inputs(family: str) -> dict:
    """The inputs each pipeline kind needs: txt2img, inpaint, depth2img or x4 upscale."""
    if family.endswith("inpaint"):
        mask = Image.fromarray(np.full((R, R), 255, dtype=np.uint8))
        return {"image": _image(R), "mask_image": mask, "height": R, "width": R}
    if family == "sd2-depth":
        return {"image": _image(R), "strength": 1.0}
    if family == "sd2-upscale":
        return {"image": _image(TINY_UPSCALER_INPUT)}
    return {"height": R, "width": R}


EXPECTED_SIDE = {"sd2-upscale": 4 * TINY_UPSCALER_INPUT}


@pytest.mark.parametrize(
    "family", ["sd1", "sd1-inpaint", "sd2-base", "sd2-v", "sd2-inpaint", "sd2-depth", "sd2-upscale"]
)
def test_tiny_pipeline_generates_in_its_mode(tiny_pipe, family):
    pipe = tiny_pipe(family)
    out = pipe(
        prompt="a photo of a cat",
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        **_mode_inputs(family),
    ).images
    side = EXPECTED_SIDE.get(family, R)
    assert out.shape == (1, side, side, 3)
    assert np.isfinite(out).all()


def test_tiny_structure_follows_the_family(tiny_pipe):
    sd1, sd2v, up = tiny_pipe("sd1"), tiny_pipe("sd2-v"), tiny_pipe("sd2-upscale")
    assert sd1.unet.config.use_linear_projection is False
    assert sd2v.unet.config.use_linear_projection is True
    assert sd2v.scheduler.config.prediction_type == "v_prediction"
    assert sd1.text_encoder.config.hidden_act == "quick_gelu"
    assert sd2v.text_encoder.config.hidden_act == "gelu"
    assert sd1.text_encoder.config.vocab_size == 49408
    assert sd2v.tokenizer.pad_token == "!"
    assert len(sd1.vae.config.block_out_channels) == 4  # 3 downsamplings, like real SD
    assert len(up.vae.config.block_out_channels) == 3
    assert up.unet.config.num_class_embeds == 1000
    assert up.vae.config.scaling_factor == 0.08333
    unet_params = sum(p.numel() for p in sd1.unet.parameters())
    assert 1.0e6 < unet_params < 2.0e6


def test_same_seed_same_weights_in_another_process(tiny_pipe):
    code = (
        "import hashlib;from sdtune.models.tiny import build_tiny_pipeline;"
        "p=build_tiny_pipeline('sd1',seed=0);h=hashlib.sha256();"
        "[h.update(v.numpy().tobytes()) for k,v in sorted(p.unet.state_dict().items())];"
        "print(h.hexdigest())"
    )
    import hashlib

    h = hashlib.sha256()
    for _, v in sorted(tiny_pipe("sd1").unet.state_dict().items()):
        h.update(v.numpy().tobytes())
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other.stdout.strip().splitlines()[-1] == h.hexdigest()


def test_other_seed_other_weights_and_caller_rng_untouched(tiny_pipe):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    other = build_tiny_pipeline("sd1", seed=1)
    assert torch.equal(torch.rand(3), expected)
    a = tiny_pipe("sd1").unet.conv_in.weight
    assert not torch.equal(a, other.unet.conv_in.weight)


@pytest.mark.parametrize("family", ["sd1", "sd2-depth", "sd2-upscale"])
def test_save_pretrained_round_trips_exactly(tiny_pipe, tmp_path, family):
    import diffusers

    pipe = tiny_pipe(family)
    pipe.save_pretrained(tmp_path)
    cls = getattr(diffusers, get_family(family).pipeline_class)
    loaded = cls.from_pretrained(tmp_path)
    parts = ["unet", "vae", "text_encoder"] + (["depth_estimator"] if family == "sd2-depth" else [])
    for name in parts:
        ours, theirs = pipe.components[name].state_dict(), loaded.components[name].state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
    assert loaded.tokenizer("a cat").input_ids == pipe.tokenizer("a cat").input_ids
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.scheduler.config) == public(pipe.scheduler.config)
