"""Files users get: PNGs with their parameters, snapshot strips, grids; schedulers; precision."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sdtune.cli.main import main
from sdtune.generate.run import (
    GenerationRequest,
    build_generation_job,
    generate,
    generate_to_folder,
)
from sdtune.generate.schedulers import SCHEDULERS
from tests.generate.conftest import tiny


def test_img2img_to_folder_with_snapshots_grid_and_params(tiny_sd1_dir, sd1_adapter, tmp_path):
    image, mask = tmp_path / "in.png", tmp_path / "mask.png"
    Image.new("RGB", (64, 64), "red").save(image)
    Image.new("L", (64, 64), 255).save(mask)
    job = build_generation_job(dict(
        prompt="a sks star", out=str(tmp_path / "out"),
        model=str(tiny_sd1_dir), lora=[(str(sd1_adapter), 0.7)], steps=4, seeds=[5, 9],
        batch_size=1, mode="inpaint", image=str(image), mask=str(mask), strength=0.6,
        scheduler="dpm++2m-karras", snapshots=[0.5, 1.0], negative_prompt="blurry",
    ))  # fmt: skip
    paths = generate_to_folder(job)
    names = sorted(p.name for p in paths)
    assert names == [
        "inpaint-grid-seed5.png",
        "inpaint-seed5-snapshots.png",
        "inpaint-seed5.png",
        "inpaint-seed9-snapshots.png",
        "inpaint-seed9.png",
    ]
    text = Image.open(tmp_path / "out" / "inpaint-seed9.png").text["parameters"]
    assert text.startswith("a sks star\nNegative prompt: blurry\n")
    for field in (
        "Steps: 4", "Sampler: DPM++ 2M", "Schedule type: Karras", "Seed: 9", "Size: 64x64",
        "Denoising strength: 0.6", "Mask: mask.png", "Mode: inpaint",
        'Lora: "pytorch_lora_weights.safetensors:0.7"',
    ):  # fmt: skip
        assert field in text, field
    strip = Image.open(tmp_path / "out" / "inpaint-seed5-snapshots.png")
    assert strip.size == (3 * 64, 64)  # two snapshots and the final image
    again = generate_to_folder(job)
    assert sorted(p.name for p in again)[0] == "inpaint-grid-seed5-1.png"  # nothing overwritten
    first = np.asarray(Image.open(tmp_path / "out" / "inpaint-seed5.png"))
    np.testing.assert_array_equal(first, np.asarray(Image.open(again[0])))  # same seed, same image


def test_snapshots_do_not_change_the_image_and_end_at_it():
    pipe = tiny("sd1")
    req = GenerationRequest(prompt="x", steps=4, seeds=[3])
    plain = generate(pipe, req).images[0]
    snap = generate(pipe, GenerationRequest(prompt="x", steps=4, seeds=[3], snapshots=[0.25, 1]))
    assert len(snap.snapshots[0]) == 2
    np.testing.assert_array_equal(np.asarray(snap.images[0]), np.asarray(plain))
    np.testing.assert_array_equal(np.asarray(snap.snapshots[0][1]), np.asarray(plain))


def test_upscaler_snapshots_use_its_own_callback(rgb64):
    pipe = tiny("sd2-upscale")
    req = GenerationRequest(
        prompt="x", mode="upscale", image=rgb64.resize((32, 32)), steps=2, snapshots=[0.5]
    )
    result = generate(pipe, req)
    assert result.snapshots[0][0].size == (128, 128)


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_every_scheduler_runs_deterministically(name):
    import importlib.util

    from sdtune.errors import SdtuneError

    pipe = tiny("sd2-v")
    req = GenerationRequest(prompt="x", steps=2, scheduler=name, output_type="np")
    if name == "lms" and importlib.util.find_spec("scipy") is None:
        with pytest.raises(SdtuneError, match="needs scipy"):
            generate(pipe, req)
        return
    first = generate(pipe, req).images[0]
    np.testing.assert_array_equal(generate(pipe, req).images[0], first)
    assert pipe.scheduler.config.prediction_type == "v_prediction"  # the caller's pipe untouched


def test_bf16_weights_with_fp32_vae_on_the_cpu(rgb64):
    """The half-precision path of CUDA, runnable here: bf16 U-Net, VAE kept in fp32."""
    from sdtune.generate.device import keep_vae_in_fp32, place_pipeline

    pipe = tiny("sd1")
    place_pipeline(pipe, torch.device("cpu"), torch.bfloat16, vae_fp32=True, channels_last=True)
    assert pipe.unet.dtype == torch.bfloat16 and pipe.vae.dtype == torch.float32
    keep_vae_in_fp32(pipe.vae)  # a second call adds no second set of hooks
    for mode in ("txt2img", "img2img"):
        req = GenerationRequest(prompt="x", mode=mode, image=rgb64, steps=2, output_type="np")
        image = generate(pipe, req).images[0]
        assert image.shape == (64, 64, 3) and np.isfinite(image).all()


def test_cli_upscale_and_info_and_vae(tmp_path, capsys, rgb64):
    pipe_dir = tmp_path / "up"
    tiny("sd2-upscale").save_pretrained(pipe_dir)
    rgb64.resize((32, 32)).save(tmp_path / "small.png")
    args = ["generate", "--model", str(pipe_dir), "--image", str(tmp_path / "small.png")]
    assert main([*args, "--steps", "2", "--noise-level", "30", "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out.split()
    assert Image.open(out[0]).size == (128, 128)  # mode defaults to the family's: upscale
    assert "Noise level: 30" in Image.open(out[0]).text["parameters"]

    assert main(["info", str(pipe_dir)]) == 0
    table = capsys.readouterr().out
    assert "unet (UNet2DConditionModel)" in table and "Conv2d" in table and "upscale" in table

    assert main(["vae", "roundtrip", str(tmp_path / "small.png"), "--model", str(pipe_dir)]) == 0
    assert "12x fewer values" in capsys.readouterr().out  # the upscaler's VAE: 4x per side


# The README's bound for --batch-size: batched kernels round differently, so an image may move
# by 1/255 in a few of its values. Measured on this CPU (8 seeds, 64 px, batch 1 vs 4):
# sd1 2 and sd2-v 13 of 98,304 values, by 1/255 each.
BATCH_MAX_STEP = 1  # in 1/255
BATCH_MAX_SHARE = 0.001  # of all values


@pytest.mark.parametrize("family", ["sd1", "sd2-v"])
def test_batch_size_moves_pngs_by_at_most_the_documented_rounding(family):
    pipe = tiny(family)
    fields = dict(prompt="a red star", steps=6, seeds=list(range(8)), width=64, height=64)
    one = generate(pipe, GenerationRequest(**fields, batch_size=1)).images
    four = generate(pipe, GenerationRequest(**fields, batch_size=4)).images
    diff = np.stack(
        [
            np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int))
            for a, b in zip(one, four, strict=True)
        ]
    )
    assert diff.max() <= BATCH_MAX_STEP
    assert (diff > 0).mean() <= BATCH_MAX_SHARE
