"""Commands that load no model start without importing the heavy libraries.

Importing torch, diffusers and transformers takes seconds; `sdtune --help` and the help of every
subcommand must not pay for it. Checked in a fresh interpreter, by what it has imported.
"""

from __future__ import annotations

import json
import subprocess
import sys

from sdtune.cli.main import SUBCOMMANDS

HEAVY = ("torch", "diffusers", "transformers", "peft", "accelerate", "bitsandbytes", "datasets")

# Runs each command line in turn and reports, after each, which heavy modules are loaded.
PROBE = """
import contextlib, io, json, sys
from sdtune.cli.main import main
report = []
for argv in json.loads(sys.argv[1]):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            main(argv)
        except SystemExit:
            pass
    report.append([argv, sorted(m for m in {heavy} if m in sys.modules)])
print(json.dumps(report))
"""


def heavy_modules_after(*command_lines: list[str]) -> list[tuple[list[str], list[str]]]:
    """For each command line, run in one fresh interpreter, the heavy modules loaded so far."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=HEAVY), json.dumps(command_lines)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_help_of_every_command_imports_no_heavy_library():
    lines = [["--help"], ["--version"]] + [[name, "--help"] for name in SUBCOMMANDS]
    for argv, heavy in heavy_modules_after(*lines):
        assert heavy == [], f"`sdtune {' '.join(argv)}` imported {', '.join(heavy)}"


def test_a_config_error_is_reported_before_any_heavy_import():
    # A typo in an override fails at once, before the model stack is imported.
    [(_, heavy)] = heavy_modules_after(["estimate", "model.family=sd1", "train.batch_sise=2"])
    assert heavy == []


def test_data_generate_and_convert_errors_come_before_any_heavy_import(tmp_path):
    missing = str(tmp_path / "missing.safetensors")
    lines = [
        ["data", "inspect", "data.dir=d", "data.caption_ext=.png"],
        ["generate", "--prompt", "x", "--guidance", "nan"],
        ["generate", "--prompt", "x", "--seeds", "1,,2"],
        ["generate", "--prompt", "x", "--lora", f"{missing}:nan"],
        ["generate", "--prompt", "x", "--lora", missing],
        ["generate", "--prompt", "x", "--family", "sd9"],
        ["convert", missing, "--to", "kohya", "--out", str(tmp_path / "o.safetensors")],
        ["convert", __file__, "--to", "kohya", "--out", __file__],
        ["convert", __file__, "--to", "kohya", "--out", "o.safetensors", "--family", "sd9"],
    ]
    for argv, heavy in heavy_modules_after(*lines):
        assert heavy == [], f"`sdtune {' '.join(argv)}` imported {', '.join(heavy)}"
