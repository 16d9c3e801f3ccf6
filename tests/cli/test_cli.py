"""The CLI as users run it: one-line errors with exit status 2, never a traceback."""

import subprocess
import sys

import pytest


def run_cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "sdtune.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )


def _assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("sdtune")]
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_missing_dataset_folder(tmp_path, tiny_sd1_dir):
    proc = run_cli(
        "train",
        f"model.path={tiny_sd1_dir}",
        f"data.dir={tmp_path / 'nope'}",
        f"output.dir={tmp_path / 'out'}",
    )
    _assert_one_line_error(proc, "dataset folder", "does not exist")


def test_empty_dataset(tmp_path, tiny_sd1_dir):
    (tmp_path / "empty").mkdir()
    proc = run_cli(
        "train",
        f"model.path={tiny_sd1_dir}",
        f"data.dir={tmp_path / 'empty'}",
        f"output.dir={tmp_path / 'out'}",
    )
    _assert_one_line_error(proc, "is empty")


def test_unknown_config_key(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  path: x\ndata:\n  dir: y\n")
    proc = run_cli("train", str(recipe), "lora.rnak=4")
    _assert_one_line_error(proc, "unknown config key 'lora.rnak'", "lora.rank")


def test_model_path_that_does_not_exist(tmp_path, star_images):
    proc = run_cli(
        "train",
        f"model.path={tmp_path / 'no-model'}",
        f"data.dir={star_images}",
        f"output.dir={tmp_path / 'out'}",
    )
    _assert_one_line_error(proc, "no-model")
    assert not (tmp_path / "out").exists(), "a failed model load left a run folder behind"


def test_generate_with_missing_adapter(tmp_path, tiny_sd1_dir):
    proc = run_cli(
        "generate",
        "--model",
        str(tiny_sd1_dir),
        "--prompt",
        "x",
        "--lora",
        str(tmp_path / "missing.safetensors"),
    )
    _assert_one_line_error(proc, "missing.safetensors", "does not exist")


def test_train_help_lists_options():
    proc = run_cli("train", "--help")
    assert proc.returncode == 0
    for key in ("model.path", "data.dir", "lora.rank", "train.max_steps", "output.dir"):
        assert key in proc.stdout


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("a.safetensors", ("a.safetensors", 1.0)),
        ("a.safetensors:0.5", ("a.safetensors", 0.5)),
        ("C:\\x\\a.safetensors", ("C:\\x\\a.safetensors", 1.0)),
    ],
)
def test_lora_weight_syntax(spec, expected):
    from sdtune.cli.generate import parse_lora

    assert parse_lora(spec) == expected
