"""Every mode on a tiny model of a family that can run it: shape, seeded determinism, and an
adapter that changes the output, fuses to the same output, and unloads back to the base."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdtune.generate.adapters import fuse_adapters, unload_adapters
from sdtune.generate.run import GenerationRequest, generate
from sdtune.generate.txt2img import load_adapters
from tests.generate.conftest import make_adapter, tiny

# Measured on this CPU over the cases below: fused vs live max |diff| <= 6e-6 on [0, 1] pixels;
# fuse, unfuse and unload vs the base <= 6e-6 (live unload alone is bit-exact, see
# test_adapters.py). The tolerances leave a margin of ~15x.
FUSED_ATOL = 1e-4
UNLOADED_ATOL = 1e-4

CASES = {
    # id: (family, mode, request fields besides the prompt, expected output side)
    "txt2img-sd1": ("sd1", "txt2img", {"width": 64, "height": 64}, 64),
    "txt2img-sd2v": ("sd2-v", "txt2img", {"width": 64, "height": 48}, None),
    "img2img-sd1": ("sd1", "img2img", {"strength": 0.75}, 64),
    "inpaint-sd1-inpaint": ("sd1-inpaint", "inpaint", {}, 64),
    "inpaint-sd1-latent-mask": ("sd1", "inpaint", {}, 64),
    "depth2img-estimated": ("sd2-depth", "depth2img", {"strength": 1.0}, 64),
    "upscale": ("sd2-upscale", "upscale", {"noise_level": 20}, 128),
}


def _request(mode, fields, rgb64, mask64):
    fields = dict(fields)
    if mode in ("img2img", "inpaint", "depth2img"):
        fields["image"] = rgb64
    if mode == "upscale":
        fields["image"] = rgb64.resize((32, 32))
    if mode == "inpaint":
        fields["mask"] = mask64
    return GenerationRequest(
        prompt="a red star", mode=mode, steps=3, seeds=[7], output_type="np", **fields
    )


@pytest.mark.parametrize("case", list(CASES))
def test_mode_with_adapter(case, rgb64, mask64, tmp_path):
    family, mode, fields, side = CASES[case]
    pipe = tiny(family)
    req = _request(mode, fields, rgb64, mask64)
    base = generate(pipe, req).images[0]
    expected = (48, 64, 3) if case == "txt2img-sd2v" else (side, side, 3)
    assert base.shape == expected and np.isfinite(base).all()
    np.testing.assert_array_equal(generate(pipe, req).images[0], base)  # same seed, same image

    load_adapters(pipe, [(make_adapter(family, tmp_path), 1.0)])
    live = generate(pipe, req).images[0]
    assert np.abs(live - base).max() > 1e-2, "the adapter does not change the output"
    fuse_adapters(pipe)
    fused = generate(pipe, req).images[0]
    np.testing.assert_allclose(fused, live, atol=FUSED_ATOL)
    unload_adapters(pipe)
    np.testing.assert_allclose(generate(pipe, req).images[0], base, atol=UNLOADED_ATOL)


def test_other_seed_other_image_and_batches_do_not_change_images(rgb64, mask64):
    """An image depends on its own seed only, not on which seeds share its batch."""
    pipe = tiny("sd1")
    for mode in ("txt2img", "inpaint"):
        req = _request(mode, {}, rgb64, mask64)
        together = generate(
            pipe, GenerationRequest(**{**vars(req), "seeds": [3, 4], "batch_size": 2})
        )
        alone = generate(pipe, GenerationRequest(**{**vars(req), "seeds": [4]}))
        np.testing.assert_allclose(together.images[1], alone.images[0], atol=1e-4)
        assert np.abs(together.images[0] - together.images[1]).max() > 1e-2


def test_latent_mask_inpainting_keeps_the_unmasked_latents(rgb64, mask64):
    """On a plain 4-channel model the known region's latents are the input image's latents."""
    pipe = tiny("sd1")
    outs = [
        generate(
            pipe,
            GenerationRequest(
                **{
                    **vars(_request("inpaint", {}, rgb64, mask64)),
                    "seeds": [s],
                    "output_type": "np",
                }
            ),
        )
        for s in (1, 2)
    ]
    a, b = (o.images[0] for o in outs)
    changed = np.abs(a - b)
    # 16 px = 2 latents of margin around the 32 px hole: the VAE decoder's reach
    outside = np.ones((64, 64), bool)
    outside[0:56, 0:56] = False
    assert changed[outside].max() < 0.5 * changed[24:40, 24:40].max()


def test_depth_map_given_by_the_user_steers_the_image(rgb64):
    pipe = tiny("sd2-depth")
    ramp = torch.linspace(0, 1, 64).repeat(64, 1)[None]
    outs = [
        generate(
            pipe,
            GenerationRequest(
                prompt="x", mode="depth2img", image=rgb64, depth_map=d, steps=2, output_type="np"
            ),
        ).images[0]
        for d in (ramp, ramp.flip(-1))
    ]
    assert np.abs(outs[0] - outs[1]).max() > 1e-3
