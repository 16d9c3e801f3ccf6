"""Commands that load no model start without importing the heavy libraries.

Importing torch, diffusers and transformers takes seconds; `sdtune --help` and the help of every
subcommand must not pay for it. Checked in a fresh interpreter, by what it has imported.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "diffusers", "transformers", "peft", "accelerate", "bitsandbytes", "datasets")

PROBE = """
import json, sys
from sdtune.cli.main import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(json.dumps(sorted(m for m in {heavy} if m in sys.modules)), file=sys.stderr)
"""


def heavy_modules_after(*argv: str) -> list[str]:
    probe = PROBE.format(heavy=HEAVY)
    done = subprocess.run(
        [sys.executable, "-c", probe, *argv], capture_output=True, text=True, timeout=120
    )
    return json.loads(done.stderr.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "argv",
    [("--help",), ("train", "--help"), ("estimate", "--help"), ("data", "--help"), ("--version",)],
    ids=lambda argv: " ".join(argv),
)
def test_help_imports_no_heavy_library(argv):
    assert heavy_modules_after(*argv) == []


def test_a_config_error_is_reported_before_any_heavy_import():
    # A typo in an override fails at once, before the model stack is imported.
    assert heavy_modules_after("estimate", "train.batch_sise=2") == []
