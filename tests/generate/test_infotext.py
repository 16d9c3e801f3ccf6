"""Every PNG sdtune writes, read back with A1111's infotext rules (tests/generate/a1111_infotext):
each field holds what made the image, with values that hold commas, colons and newlines intact."""

from __future__ import annotations

import shutil

import pytest
from PIL import Image

from sdtune.cli.main import main
from sdtune.generate.outputs import GenerationParams, save_png
from sdtune.generate.run import (
    GenerationRequest,
    build_generation_job,
    generate,
    generate_to_folder,
    save_result,
)
from tests.generate.a1111_infotext import parse_infotext
from tests.generate.conftest import tiny

AWKWARD_MODEL = "models/toy, copy: 2"  # a comma and a colon: A1111 quotes such values


def _read(path) -> dict[str, str]:
    return parse_infotext(Image.open(path).text["parameters"])


def test_values_with_commas_colons_and_newlines_round_trip(tmp_path):
    params = GenerationParams(
        prompt="a cat, sitting\non a mat: red",
        negative_prompt="blurry, dark",
        steps=20,
        guidance_scale=7.5,
        seed=42,
        width=64,
        height=48,
        scheduler="DPM++ 2M",
        schedule_type="Karras",
        model=AWKWARD_MODEL,
        adapters=[("/x/style.safetensors", 0.8), ("b, c.safetensors", 0.5)],
        mode="inpaint",
        denoising_strength=0.6,
        mask='mask "1".png',
        dtype="bfloat16",
    )
    fields = _read(save_png(Image.new("RGB", (64, 48)), tmp_path, params, "x"))
    assert fields == {
        "Prompt": "a cat, sitting\non a mat: red",
        "Negative prompt": "blurry, dark",
        "Steps": "20",
        "Sampler": "DPM++ 2M",
        "Schedule type": "Karras",
        "CFG scale": "7.5",
        "Seed": "42",
        "Size-1": "64",
        "Size-2": "48",
        "Model": AWKWARD_MODEL,
        "Denoising strength": "0.6",
        "Mask": 'mask "1".png',
        "Mode": "inpaint",
        "Precision": "bfloat16",
        "Lora": "style.safetensors:0.8; b, c.safetensors:0.5",
        "Generator": "sdtune",
    }


def test_txt2img_images_grid_and_snapshots_carry_their_own_values(
    tiny_sd1_dir, sd1_adapter, tmp_path
):
    model = tmp_path / "toy, copy: 2"  # a real folder whose name must survive the round trip
    shutil.copytree(tiny_sd1_dir, model)
    values = dict(
        prompt="a sks star, bright",
        out=str(tmp_path / "out"),
        model=str(model),
        lora=[(str(sd1_adapter), 0.7)],
        negative_prompt="blurry, dark",
        steps=2,
        guidance_scale=6.0,
        seeds=[5, 9, 11],
        width=48,
        height=32,
        snapshots=[0.5],
    )
    paths = generate_to_folder(build_generation_job(values))
    by_name = {p.name: _read(p) for p in paths}
    assert set(by_name) == {
        "seed5.png", "seed9.png", "seed11.png", "grid-seed5.png",
        "seed5-snapshots.png", "seed9-snapshots.png", "seed11-snapshots.png",
    }  # fmt: skip
    common = {
        "Prompt": "a sks star, bright",
        "Negative prompt": "blurry, dark",
        "Steps": "2",
        "Sampler": "PLMS",  # the model's own PNDMScheduler, by its A1111 name
        "CFG scale": "6",
        "Size-1": "48",  # the generated image's size, on the grid and strips too
        "Size-2": "32",
        "Model": str(model),
        "Lora": "pytorch_lora_weights.safetensors:0.7",
        "Generator": "sdtune",
    }
    for seed in (5, 9, 11):
        assert by_name[f"seed{seed}.png"] == {**common, "Seed": str(seed)}
        strip = by_name[f"seed{seed}-snapshots.png"]
        assert strip == {**common, "Seed": str(seed), "Snapshots": "0.5"}
    assert by_name["grid-seed5.png"] == {**common, "Seed": "5", "Grid": "3x1 of 3"}
    assert Image.open(tmp_path / "out" / "grid-seed5.png").size == (3 * 48, 32)


MODES = {
    # mode: (family, request fields, fields the PNG must add)
    "img2img": ("sd1", {"strength": 0.75}, {"Denoising strength": "0.75", "Mode": "img2img"}),
    "inpaint": (
        "sd1-inpaint",
        {"strength": 0.9},
        {"Denoising strength": "0.9", "Mask": "image", "Mode": "inpaint"},
    ),
    "depth2img": (
        "sd2-depth",
        {"strength": 1.0},
        {"Denoising strength": "1", "Mode": "depth2img"},
    ),
    "upscale": ("sd2-upscale", {"noise_level": 30}, {"Noise level": "30", "Mode": "upscale"}),
}
SAMPLERS = {"sd1": "PLMS", "sd1-inpaint": "PLMS", "sd2-depth": "PLMS", "sd2-upscale": "DDIM"}


@pytest.mark.parametrize("mode", list(MODES))
def test_every_mode_writes_its_fields(mode, rgb64, mask64, tmp_path):
    family, fields, expected = MODES[mode]
    pipe = tiny(family)
    image = rgb64.resize((32, 32)) if mode == "upscale" else rgb64
    req = GenerationRequest(
        prompt="a red star", mode=mode, steps=2, seeds=[3, 4], batch_size=2, image=image, **fields
    )
    if mode == "inpaint":
        req.mask = mask64
    result = generate(pipe, req)
    paths = save_result(pipe, req, result, tmp_path, AWKWARD_MODEL, [])
    side = 128 if mode == "upscale" else 64
    common = {
        "Prompt": "a red star",
        "Negative prompt": "",
        "Steps": "2",
        "Sampler": SAMPLERS[family],
        "CFG scale": "7.5",
        "Size-1": str(side),
        "Size-2": str(side),
        "Model": AWKWARD_MODEL,
        "Generator": "sdtune",
        **expected,
    }
    assert [p.name for p in paths] == [
        f"{mode}-seed3.png",
        f"{mode}-seed4.png",
        f"{mode}-grid-seed3.png",
    ]
    assert _read(paths[0]) == {**common, "Seed": "3"}
    assert _read(paths[1]) == {**common, "Seed": "4"}
    assert _read(paths[2]) == {**common, "Seed": "3", "Grid": "2x1 of 2"}


def test_chosen_scheduler_and_precision_are_named(tiny_sd1_dir, tmp_path):
    pipe = tiny("sd1")
    req = GenerationRequest(prompt="x", steps=2, scheduler="dpm++2m-karras", width=32, height=32)
    (path,) = save_result(pipe, req, generate(pipe, req), tmp_path, "m", [])
    fields = _read(path)
    assert fields["Sampler"] == "DPM++ 2M" and fields["Schedule type"] == "Karras"
    for name, sampler in (("euler-a", "Euler a"), ("ddim", "DDIM"), ("unipc", "UniPC")):
        req = GenerationRequest(prompt="x", steps=2, scheduler=name, width=32, height=32)
        (path,) = save_result(pipe, req, generate(pipe, req), tmp_path, "m", [])
        assert _read(path)["Sampler"] == sampler and "Schedule type" not in _read(path)


def test_vae_pngs_say_what_they_are(tmp_path, capsys, rgb64, tiny_sd1_dir):
    rgb64.save(tmp_path / "in, 1.png")
    args = ["vae", "roundtrip", str(tmp_path / "in, 1.png"), "--model", str(tiny_sd1_dir)]
    assert main([*args, "--out", str(tmp_path / "o")]) == 0
    path = capsys.readouterr().out.strip().splitlines()[-1]
    assert _read(path) == {
        "Prompt": "VAE round trip of in, 1.png",
        "Negative prompt": "",
        "Size-1": "64",
        "Size-2": "64",
        "Model": str(tiny_sd1_dir),
        "Mode": "vae roundtrip",
        "Generator": "sdtune",
    }
