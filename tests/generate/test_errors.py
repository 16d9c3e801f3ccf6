"""Bad inputs give one-line errors naming what is wrong and what would be right."""

from __future__ import annotations

import pytest

from sdtune.cli.main import main
from sdtune.errors import SdtuneError
from sdtune.generate.run import GenerationRequest, generate
from tests.generate.conftest import tiny


@pytest.fixture(scope="module")
def sd1():
    return tiny("sd1")


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"mode": "depth2img", "image": "IMG"}, "needs a model of family sd2-depth"),
        ({"mode": "upscale", "image": "IMG"}, "can do: txt2img, img2img, inpaint"),
        ({"mode": "img2img"}, "mode 'img2img' needs --image"),
        ({"mode": "inpaint", "image": "IMG"}, "needs --mask"),
        ({"mode": "inpaint", "image": "IMG", "mask": "SMALL_MASK"}, "is 32x32 but the image"),
        ({"mode": "img2img", "image": "TEXT_FILE"}, "is not a readable image"),
        ({"mode": "img2img", "image": "MISSING"}, "does not exist"),
        ({"width": 100}, "width must be a positive multiple of 8, got 100"),
        ({"mode": "paint"}, "unknown mode 'paint'; valid modes: txt2img"),
        ({"scheduler": "heun"}, "unknown scheduler 'heun'; valid schedulers: ddim"),
        ({"mode": "img2img", "image": "IMG", "strength": 1.5}, "--strength must be in (0, 1]"),
        ({"snapshots": [0.0]}, "snapshot fractions must be in (0, 1]"),
    ],
)
def test_bad_request(sd1, fields, message, tmp_path, rgb64):
    files = {
        "IMG": rgb64,
        "SMALL_MASK": tmp_path / "mask.png",
        "TEXT_FILE": tmp_path / "notes.png",
        "MISSING": tmp_path / "missing.png",
    }
    rgb64.resize((32, 32)).save(files["SMALL_MASK"])
    files["TEXT_FILE"].write_text("not an image")
    fields = {k: files.get(v, v) if isinstance(v, str) else v for k, v in fields.items()}
    with pytest.raises(SdtuneError) as err:
        generate(sd1, GenerationRequest(prompt="x", steps=1, **fields))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_low_guidance_warns_that_the_negative_prompt_is_ignored(sd1, caplog):
    req = GenerationRequest(prompt="x", negative_prompt="blur", guidance_scale=0.5, steps=1)
    generate(sd1, req)
    assert "negative prompt is ignored" in caplog.text


def _cli_error(capsys, *args) -> str:
    assert main(["generate", *args]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sdtune")]
    assert len(err) == 1 and err[0].startswith("sdtune generate: error: "), err
    return err[0]


def test_cli_depth_on_sd1_is_one_line(tiny_sd1_dir, tmp_path, rgb64, capsys):
    rgb64.save(tmp_path / "in.png")
    line = _cli_error(
        capsys, "--model", str(tiny_sd1_dir), "--mode", "depth2img", "--image",
        str(tmp_path / "in.png"), "--out", str(tmp_path / "out"), "--steps", "1",
    )  # fmt: skip
    assert "sd2-depth" in line and not (tmp_path / "out").exists()


def test_cli_bad_numbers_and_cuda_absent(tiny_sd1_dir, tmp_path, capsys):
    model = ["--model", str(tiny_sd1_dir), "--out", str(tmp_path)]
    assert "--snapshots takes comma-separated" in _cli_error(capsys, *model, "--snapshots", "a")
    assert "multiple of 8" in _cli_error(capsys, *model, "--height", "60")
    assert "unknown dtype 'fp8'" in _cli_error(capsys, *model, "--dtype", "fp8")
    import torch

    if not torch.cuda.is_available():
        assert "CUDA is not available" in _cli_error(capsys, *model, "--device", "cuda")
        line = _cli_error(capsys, *model, "--cpu-offload", "--steps", "1")
        assert "--cpu-offload needs a CUDA device" in line
