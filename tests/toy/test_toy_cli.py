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
