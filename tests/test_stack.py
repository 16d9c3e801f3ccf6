"""The installed-stack check: a combination that cannot work stops a command in one line.

Faked the way a real install would look: a `transformers-5.24.0.dist-info` folder first on the
path makes `importlib.metadata` report that version, while the code imported stays the real one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement

from sdtune.stack import find_stack_problems

REPO = Path(__file__).resolve().parents[1]


def versions(**pins):
    return lambda name: pins.get(name.replace("-", "_"))


def test_transformers_5_24_with_peft_0_21_is_one_problem_naming_both():
    reqs = [Requirement("transformers>=4.45,<5.24"), Requirement("peft>=0.17")]
    problems = find_stack_problems(versions(transformers="5.24.0", peft="0.21.2"), reqs)
    assert len(problems) == 1
    [line] = problems
    assert "transformers 5.24.0" in line and "peft 0.21.2" in line and "peft>=0.22" in line
    assert 'fix: pip install "transformers<5.24"' in line


def test_a_working_set_has_no_problem_and_a_newer_peft_lifts_the_conflict():
    reqs = [Requirement("transformers>=4.45"), Requirement("peft>=0.17")]
    assert find_stack_problems(versions(transformers="5.23.0", peft="0.21.2"), reqs) == []
    assert find_stack_problems(versions(transformers="5.24.0", peft="0.22.0"), reqs) == []


def test_out_of_range_and_missing_packages_are_named_with_the_fix():
    reqs = [Requirement("diffusers>=0.35"), Requirement("peft>=0.17")]
    problems = find_stack_problems(versions(diffusers="0.30.0"), reqs)
    assert problems == [
        'diffusers 0.30.0 is outside the range sdtune works with (>=0.35); fix: pip install "diffusers>=0.35"',
        'peft is not installed; fix: pip install "peft>=0.17"',
    ]


def test_the_installed_test_environment_passes_the_check():
    assert find_stack_problems() == []


PROBE = """
import contextlib, io, json, sys
from sdtune.cli.main import main
err = io.StringIO()
with contextlib.redirect_stderr(err):
    code = main(json.loads(sys.argv[1]))
heavy = sorted(m for m in ("torch", "diffusers", "transformers", "peft") if m in sys.modules)
print(json.dumps({"code": code, "stderr": err.getvalue(), "heavy": heavy}))
"""


def fake_distribution(root: Path, name: str, version: str) -> None:
    info = root / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


def test_sdtune_train_with_a_faked_transformers_5_24_exits_2_before_any_model_loads(tmp_path):
    fake = tmp_path / "fake-site"
    fake_distribution(fake, "transformers", "5.24.0")
    fake_distribution(fake, "peft", "0.21.2")
    out = tmp_path / "run"
    argv = ["train", str(REPO / "recipes" / "sd15-lora.yaml"), f"output.dir={out}"]
    env = {**os.environ, "PYTHONPATH": str(fake)}
    env.pop("SDTUNE_SKIP_STACK_CHECK", None)
    done = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(argv)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["code"] == 2
    lines = report["stderr"].strip().splitlines()
    assert len(lines) == 1, report["stderr"]
    assert lines[0].startswith("sdtune train: error: transformers 5.24.0 needs peft>=0.22")
    assert "peft 0.21.2 is installed" in lines[0] and "fix: pip install" in lines[0]
    assert report["heavy"] == []  # stopped before torch or any model library was imported
    assert not out.exists()
