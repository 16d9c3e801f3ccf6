"""`sdtune eval` and `sdtune demo` refuse bad numbers with one line, before loading anything."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "argv",
    [
        ["eval", "--seeds-per-prompt", "0"],
        ["eval", "--steps", "0"],
        ["demo", "--steps", "0"],
        ["demo", "--images", "0"],
    ],
)
def test_bad_counts_are_one_line_errors(argv, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sdtune.cli.main",
            *argv,
            *(["--out", str(tmp_path / "d")] if argv[0] == "demo" else []),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "must be at least 1" in proc.stderr
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("command", ["eval", "demo"])
def test_a_shape_the_base_knows_is_refused_as_a_concept(command, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "sdtune.cli.main", command, "--concept", "circle"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    assert "invalid choice: 'circle'" in proc.stderr and "'ring', 'star'" in proc.stderr
    assert not (tmp_path / "outputs").exists()


def test_scoring_names_the_held_out_shapes_when_asked_for_another():
    from sdtune.errors import SdtuneError
    from sdtune.toy.eval import score_toy_model

    with pytest.raises(SdtuneError, match=r"'square' is not a held-out shape.*\['ring', 'star'\]"):
        score_toy_model(None, "sks", concept="square")
