"""Does sdtune still work with the newest release of everything? A short smoke path that says.

`make test-latest` runs this in a throwaway venv (`.latest-venv`) without the lock:

    python scripts/smoke_latest.py --upgrade   # newest release of every dependency, then the smoke
    python scripts/smoke_latest.py             # the smoke only, on what is installed

`--upgrade` installs the newest release of each of sdtune's runtime and dev dependencies,
ignoring pyproject's upper bounds (torch excepted: it stays the build the venv was made with,
since a newer torch from the index is a multi-GB CUDA build). The smoke path then runs the
commands a user runs, each in its own process with the installed-stack check switched off
(so the real break shows, not sdtune's warning of it):

1. train 5 steps on the toy base (`sdtune train`), saving the adapter;
2. reload the adapter in plain diffusers (`load_lora_weights`) and draw one image;
3. `sdtune generate` one image with it;
4. `sdtune convert --to kohya`.

Each break is printed in one line with the versions of the stack; the exit status is 1 if
anything broke (or sdtune's own check names a conflict), else 0.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STACK = ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors")

RELOAD_IN_DIFFUSERS = """
import sys, numpy as np, torch
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1])
pipe.load_lora_weights(sys.argv[2])
image = pipe("a red sks ring on a white background", num_inference_steps=2,
             generator=torch.Generator().manual_seed(0), output_type="np").images[0]
assert np.isfinite(image).all(), "the image holds NaN"
"""


def dependency_names() -> list[str]:
    """sdtune's runtime and dev dependencies, by name, from its installed metadata."""
    from packaging.requirements import Requirement

    reqs = [Requirement(line) for line in metadata.requires("sdtune") or []]
    wanted = [r for r in reqs if r.marker is None or r.marker.evaluate({"extra": "dev"})]
    return [r.name for r in wanted if r.name != "torch"]


def upgrade_to_latest() -> None:
    names = dependency_names()
    print(f"installing the newest release of: {' '.join(names)}")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--upgrade", *names], check=True
    )


def stack_versions() -> str:
    found = []
    for name in STACK:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} (not installed)")
    return ", ".join(found)


def last_line(text: str) -> str:
    """The line that says what broke: the last non-empty line of a traceback or an error."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


def run_step(name: str, argv: list[str], env: dict[str, str]) -> bool:
    done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO)
    if done.returncode == 0:
        print(f"ok     {name}")
        return True
    print(f"BREAK  {name}: {last_line(done.stderr or done.stdout)} [{stack_versions()}]")
    return False


def smoke(work: Path) -> int:
    from sdtune.stack import find_stack_problems

    print(f"stack: {stack_versions()}")
    known = find_stack_problems()
    for line in known:
        print(f"BREAK  known conflict: {line}")
    env = {**os.environ, "SDTUNE_SKIP_STACK_CHECK": "1", "HF_HUB_OFFLINE": "1"}
    sdtune = [sys.executable, "-m", "sdtune.cli.main"]
    toy = subprocess.run(
        [sys.executable, "-m", "sdtune.toy"], capture_output=True, text=True, check=True
    ).stdout.strip()
    images, run = work / "rings", work / "run"
    render = "from sdtune.data.synthetic import write_shape_dataset as w; import sys; "
    render += "w(sys.argv[1], shape='ring', count=4, trigger='sks')"
    steps = [
        ("render the training images", [sys.executable, "-c", render, str(images)]),
        (
            "sdtune train (5 steps on the toy base)",
            sdtune
            + ["train", f"model.path={toy}", f"data.dir={images}", "data.resolution=64"]
            + ["data.trigger=sks", "train.max_steps=5", "lora.train_text_encoder=true"]
            + [f"output.dir={run}"],
        ),
        (
            "reload in plain diffusers (load_lora_weights) and draw",
            [sys.executable, "-c", RELOAD_IN_DIFFUSERS, toy, str(run)],
        ),
        (
            "sdtune generate with the adapter",
            sdtune
            + ["generate", "--lora", str(run), "--prompt", "a red sks ring", "--steps", "2"]
            + ["--out", str(work / "images")],
        ),
        (
            "sdtune convert --to kohya",
            sdtune
            + ["convert", str(run), "--to", "kohya", "--out", str(work / "kohya.safetensors")],
        ),
    ]
    broken = 0
    for name, argv in steps:
        if broken and name != steps[0][0]:
            print(f"skip   {name} (an earlier step broke)")
            continue
        broken += not run_step(name, argv, env)
    total = broken + len(known)
    print(f"{total} break(s)" if total else "all smoke steps passed")
    return 1 if total else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upgrade", action="store_true", help="install the newest releases first")
    args = parser.parse_args()
    if args.upgrade:
        upgrade_to_latest()
    with tempfile.TemporaryDirectory(prefix="sdtune-latest-") as work:
        return smoke(Path(work))


if __name__ == "__main__":
    sys.exit(main())
