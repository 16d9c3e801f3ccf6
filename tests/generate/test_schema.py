"""The generation options, declared once: the command's flags, the form, checks and argv."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sdtune.cli.main import build_parser, main
from sdtune.errors import SdtuneError
from sdtune.generate.schema import (
    DTYPE_NAMES,
    build_generation_job,
    check_generation_values,
    generation_argv,
    generation_form,
    generation_values,
    read_generation_values,
    values_from_args,
)

# Every flag `sdtune generate` has had, with its default as the command reads it.
FLAGS = {
    "--prompt": "", "--negative-prompt": "", "--model": None, "--family": None, "--lora": [],
    "--fuse": False, "--mode": None, "--image": None, "--mask": None, "--depth-map": None,
    "--strength": 0.8, "--noise-level": 20, "--scheduler": None, "--snapshots": [],
    "--num-images": 1, "--steps": 25, "--guidance": 7.5, "--seed": 0, "--seeds": [],
    "--batch-size": None, "--width": None, "--height": None, "--out": "outputs/images",
    "--max-token-length": None, "--zero-terminal-snr": None, "--guidance-rescale": None,
    "--prediction-type": None, "--device": None, "--dtype": None, "--compile": False,
    "--cpu-offload": False, "--channels-last": False, "--refiner": None, "--refiner-start": 0.8,
    "--original-size": [], "--target-size": [], "--crop-top-left": [], "--aesthetic-score": 6.0,
    "--negative-aesthetic-score": 2.5, "--config-dir": None,
}  # fmt: skip


def _parsed(argv: list[str]) -> dict:
    """The typed values `sdtune generate ARGV` reads."""
    args = build_parser().parse_args(["generate", *argv])
    return read_generation_values(values_from_args(args))


def test_every_flag_keeps_its_name_and_default():
    form = {entry["flag"]: entry for entry in generation_form()}
    assert set(form) == set(FLAGS)
    defaults = _parsed([])
    assert generation_values(build_generation_job({})) == defaults
    by_flag = {entry["flag"]: entry["name"] for entry in generation_form()}
    assert {flag: defaults[by_flag[flag]] for flag in FLAGS} == FLAGS
    assert by_flag["--guidance"] == "guidance_scale"


def test_the_form_is_json_and_names_sections_types_and_ranges():
    form = json.loads(json.dumps(generation_form()))
    entry = {e["name"]: e for e in form}
    assert entry["strength"] == {
        "name": "strength", "flag": "--strength", "section": "mode", "type": "float",
        "default": 0.8, "help": entry["strength"]["help"], "choices": None, "valid": "(0, 1]",
        "nullable": False,
    }  # fmt: skip
    assert entry["seeds"]["type"] == "list[int]" and entry["snapshots"]["type"] == "list[float]"
    assert entry["lora"]["type"] == "lora" and entry["zero_terminal_snr"]["type"] == "bool"
    assert entry["image"]["type"] == "path" and entry["max_token_length"]["choices"] == [
        75,
        150,
        225,
    ]
    assert "dpm++2m-karras" in entry["scheduler"]["choices"]
    assert {e["section"] for e in form} == {
        "prompt", "mode", "sampling", "sdxl", "model", "adapters", "output", "speed",
    }  # fmt: skip


def test_help_shows_ranges_and_choices(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(in (0, 1]; default 0.8)" in text  # --strength
    assert "in [0, 350]" in text and "one of 75, 150, 225" in text
    assert "--zero-terminal-snr, --no-zero-terminal-snr" in text


BAD = {
    "steps": "0",
    "strength": "1.5",
    "guidance_scale": "nan",
    "seeds": "1,,2",
    "snapshots": "0.5,0",
    "width": "60",
    "noise_level": 400,
    "max_token_length": "100",
    "dtype": "fp8",
    "family": "sd9",
    "scheduler": "heun",
    "batch_size": "two",
    "prediction_type": "v",
}
FLAG_OF = {e["name"]: e["flag"] for e in generation_form()}


def test_every_problem_is_reported_at_once():
    problems = check_generation_values({**BAD, "stepz": "3"})
    assert set(problems) == {*BAD, "stepz"}
    assert problems["stepz"] == "unknown generation option 'stepz'; did you mean 'steps'?"
    assert problems["strength"] == "--strength must be in (0, 1], got 1.5"
    assert problems["noise_level"] == "--noise-level must be in [0, 350], got 400"
    assert problems["prediction_type"] == "--prediction-type must be epsilon or v_prediction, got v"
    assert all("\n" not in message for message in problems.values())


def test_a_fine_set_has_no_problems(tmp_path, rgb64):
    rgb64.save(tmp_path / "in.png")
    values = {
        "prompt": "a cat", "mode": "img2img", "image": str(tmp_path / "in.png"), "steps": "4",
        "guidance_scale": 6, "seeds": "1,7,42", "snapshots": [0.5, 1], "width": "64",
        "scheduler": "Euler_A", "dtype": "BF16", "zero_terminal_snr": "false", "fuse": "on",
        "family": "sd1", "batch_size": "", "guidance_rescale": "0.5",
    }  # fmt: skip
    assert check_generation_values(values) == {}


def test_a_mode_without_its_input_and_a_mode_the_family_lacks():
    problems = check_generation_values({"mode": "inpaint"})
    assert problems == {"mode": "mode 'inpaint' needs --image"}
    problems = check_generation_values({"mode": "upscale", "image": None, "family": "sd1"})
    assert problems["mode"] == "mode 'upscale' needs --image"


@pytest.mark.parametrize("name", sorted(BAD))
def test_the_message_is_what_the_command_prints(name, capsys, tmp_path):
    argv = [FLAG_OF[name], str(BAD[name])]
    assert main(["generate", "--out", str(tmp_path / "out"), *argv]) == 2
    printed = capsys.readouterr().err.strip()
    assert printed == f"sdtune generate: error: {check_generation_values({name: BAD[name]})[name]}"


def test_argv_round_trip_of_a_rich_set(tmp_path):
    values = {
        "prompt": "-a sks cat, 'quoted', 100%", "negative_prompt": "blurry", "mode": "inpaint",
        "image": "in.png", "mask": "m.png", "strength": 0.55, "noise_level": 40, "steps": 7,
        "guidance_scale": -1.5, "seed": -3, "num_images": 4, "seeds": [1, 7, 42],
        "batch_size": 2, "width": 96, "height": 128, "scheduler": "dpm++2m-karras",
        "zero_terminal_snr": False, "guidance_rescale": 0.3, "max_token_length": 150,
        "model": "runwayml/stable-diffusion-v1-5", "family": "sd1-inpaint",
        "lora": ["a.safetensors:0.7", "C:\\x\\b.safetensors", "-odd name.safetensors:-0.25"],
        "fuse": True, "snapshots": [0.25, 0.5, 1 / 3], "out": str(tmp_path / "o"),
        "device": "cuda:1", "dtype": "bf16", "compile": True, "cpu_offload": True,
        "channels_last": True,
    }  # fmt: skip
    expected = read_generation_values(values)
    argv = generation_argv(values)
    assert _parsed(argv) == expected
    assert expected["lora"][1] == ("C:\\x\\b.safetensors", 1.0)
    assert expected["snapshots"][2] == 1 / 3  # exact: floats are written in full
    assert _parsed(generation_argv({**values, "zero_terminal_snr": True}))["zero_terminal_snr"]
    assert generation_argv({"steps": 25, "prompt": "x"}) == ["--prompt", "x"]  # defaults left out


def test_a_job_built_from_values_holds_them(tmp_path, rgb64):
    rgb64.save(tmp_path / "in.png")
    (tmp_path / "a.safetensors").write_bytes(b"")
    lora = f"{tmp_path / 'a.safetensors'}:0.5"
    values = {"prompt": "x", "mode": "img2img", "image": str(tmp_path / "in.png"), "lora": lora}
    job = build_generation_job({**values, "steps": "3", "dtype": "fp16", "out": "o"})
    assert job.request.steps == 3 and job.request.image == str(tmp_path / "in.png")
    assert job.lora == [(str(tmp_path / "a.safetensors"), 0.5)] and job.out == "o"
    assert job.speed.dtype == "fp16" and job.request.mode == "img2img"
    with pytest.raises(SdtuneError, match="--steps must be at least 1, got 0"):
        build_generation_job({**values, "steps": 0})


def test_dtype_names_are_the_devices():
    from sdtune.generate.device import DTYPES

    assert DTYPE_NAMES == tuple(DTYPES)


def test_checking_values_imports_no_heavy_library():
    code = (
        "import sys; from sdtune.generate.schema import check_generation_values as c, "
        "generation_form as f, generation_argv as a; c({'steps': '0', 'mode': 'img2img'}); "
        "f(); a({'steps': 3}); print([m for m in ('torch', 'diffusers') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr


def test_an_unset_mode_is_the_models_first_and_names_the_files(rgb64, mask64, tmp_path):
    import numpy as np

    from sdtune.generate.run import GenerationRequest, generate, save_result
    from tests.generate.conftest import tiny

    pipe = tiny("sd1-inpaint")
    request = GenerationRequest(prompt="x", image=rgb64, mask=mask64, steps=2, seeds=[2])
    unset = generate(pipe, request)
    named = generate(pipe, GenerationRequest(**{**vars(request), "mode": "inpaint"}))
    assert unset.mode == "inpaint"
    np.testing.assert_array_equal(np.asarray(unset.images[0]), np.asarray(named.images[0]))
    (path,) = save_result(pipe, request, unset, tmp_path, "m", [])
    assert path.name == "inpaint-seed2.png"
