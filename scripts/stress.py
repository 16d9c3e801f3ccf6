"""Fault and bad-input stress run: kill -9 at random points, resume, compare; then fuzz inputs.

    python scripts/stress.py --rounds 5 --seed 0

Builds a tiny SD 1 model and a small image set in a temporary folder, trains once without
interruption through the CLI, then for each round trains the same run again and kills it with
SIGKILL several times: at a random moment (during a step, a checkpoint, start-up), the moment a
checkpoint's temporary folder appears, or from inside the run: half-way through the state file,
half-way through deleting an old checkpoint (pruning), or half-way through moving the final
files into place. After each kill every checkpoint left must read back, none may have gone that
was there before (unless rotation replaced it with a newer one), no half-deleted or half-written
folder may count as complete, and the next start must leave no such folder; `train.resume=latest` then
continues, until the run completes, and its adapter must equal the uninterrupted one bit for
bit. Bad-input rounds feed random configs, images, captions and adapter files to the library
(anything other than an SdtuneError is a crash) and a random bad override to the CLI (exit 2,
one line, no traceback). The last line is the summary; the exit status is 1 if anything failed.
All training subprocesses run with OMP_NUM_THREADS=1, so their arithmetic is the same.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
ADAPTER = "pytorch_lora_weights.safetensors"

# Run the CLI patched to die (SIGKILL, no clean-up) from inside: `state` half-way through the
# state file of the checkpoint at step >= argv[2]; `prune` half-way through deleting an old
# checkpoint (its adapter gone, the rest there); `final` after the first of the final files
# was moved into place.
HOOK = """
import os, shutil, signal, sys
import sdtune.train.checkpoint as c
from sdtune.cli.main import main
mode, at = sys.argv[1], int(sys.argv[2])
real_save, real_rmtree, real_replace = c.torch.save, shutil.rmtree, os.replace
def die():
    os.kill(os.getpid(), signal.SIGKILL)
def dying_save(obj, path, *a, **k):
    if mode == "state" and obj["progress"]["step"] >= at:
        real_save(obj, path, *a, **k)
        size = os.path.getsize(path)
        with open(path, "r+b") as f:
            f.truncate(size // 2)
        die()
    return real_save(obj, path, *a, **k)
def dying_rmtree(path, *a, **k):
    adapter = os.path.join(path, "pytorch_lora_weights.safetensors")
    if mode == "prune" and os.path.basename(path).startswith(".pruning-") and os.path.exists(adapter):
        os.unlink(adapter)  # (a leftover of an earlier kill, its adapter gone, is cleaned up)
        die()
    return real_rmtree(path, *a, **k)
moved = []
def dying_replace(src, dst):
    if mode == "final" and "/.final-tmp/" in str(src) and "/.final-tmp/" not in str(dst):
        if moved:
            die()
        moved.append(dst)
    return real_replace(src, dst)
c.torch.save, shutil.rmtree, os.replace = dying_save, dying_rmtree, dying_replace
sys.exit(main(sys.argv[3:]))
"""
LEFTOVER_PREFIXES = (".tmp-", ".pruning-")  # a torn write, a half-done delete


@dataclass
class Tally:
    runs: int = 0
    kill_points: int = 0
    during_write: int = 0
    equal: int = 0
    compared: int = 0
    files_lost: int = 0
    during_prune: int = 0
    during_final: int = 0
    half_deleted_left: int = 0  # leftovers of a kill still there after the next run
    counted_complete: int = 0  # torn or half-deleted folders that a lister took as complete
    crashes: int = 0
    bad_inputs: int = 0


def train_args(model: Path, data: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return [
        "train",
        f"model.path={model}",
        f"data.dir={data}",
        "data.resolution=64",
        "data.random_flip=true",
        "train.batch_size=2",
        f"train.max_steps={steps}",
        "train.learning_rate=1e-3",
        "train.checkpoint_every_n_steps=3",
        "train.keep_checkpoints=2",
        "train.log_every_n_steps=1",
        "lora.rank=4",
        "output.log_with=none",
        f"output.dir={out}",
        *extra,
    ]


def cli(args: list[str], hook: tuple[str, int] | None = None) -> list[str]:
    if hook is None:
        return [sys.executable, "-m", "sdtune.cli.main", *args]
    return [sys.executable, "-c", HOOK, hook[0], str(hook[1]), *args]


def torn_folders(out: Path) -> int:
    """Folders a kill left that the next run must clean up: torn writes, half-done deletes,
    `step-*` folders missing a file, staged final files."""
    from sdtune.train.checkpoint import is_complete
    from sdtune.train.outputs import FINAL_STAGING

    folder = out / "checkpoints"
    names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
    left = sum(n.startswith(LEFTOVER_PREFIXES) for n in names) + (out / FINAL_STAGING).exists()
    return left + sum(n.startswith("step-") and not is_complete(folder / n) for n in names)


def checkpoint_state(out: Path) -> dict[int, bool]:
    """step -> whether the complete checkpoint reads back (state and adapter)."""
    from safetensors.torch import load_file

    from sdtune.errors import SdtuneError
    from sdtune.train.checkpoint import list_checkpoints, load_training_state

    found = {}
    for folder in list_checkpoints(out):
        step = int(folder.name.split("-")[1])
        try:
            load_training_state(folder)
            load_file(str(folder / ADAPTER))
            found[step] = True
        except (SdtuneError, OSError, RuntimeError):
            found[step] = False
    return found


def start_args(out: Path, base: list[str]) -> list[str]:
    """Resume if a complete checkpoint exists; else start afresh over what a kill left."""
    from sdtune.train.checkpoint import list_checkpoints

    if list_checkpoints(out):
        return [*base, "train.resume=latest"]
    return [*base, "output.overwrite=true"] if out.exists() else base


KILL_MODES = ("time", "write", "state", "prune", "final")


def kill_once(
    out: Path, base: list[str], rng: random.Random, timing, tally: Tally, mode: str
) -> bool:
    """Start the run and kill it (`mode`: where); True if it finished before the kill came."""
    args = start_args(out, base)
    hook = None
    if mode in ("state", "prune", "final"):
        hook = (mode, rng.randint(1, timing["steps"] - 1))
    proc = subprocess.Popen(
        cli(args, hook), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    tally.runs += 1
    before = checkpoint_state(out)
    started = time.monotonic()
    wait = rng.uniform(timing["first_step"] * 0.7, timing["total"])
    tmp_seen = False
    while proc.poll() is None:
        elapsed = time.monotonic() - started
        if mode == "write":
            tmp_seen = any((out / "checkpoints").glob(".tmp-*"))
            if tmp_seen or elapsed > timing["total"] * 3:
                break
        elif mode == "time" and elapsed >= wait:
            break
        time.sleep(0.0005 if mode == "write" else 0.005)
    if proc.poll() is None:
        tmp_seen = tmp_seen or any((out / "checkpoints").glob(".tmp-*"))
        proc.send_signal(signal.SIGKILL)
    rc = proc.wait()
    stderr = proc.stderr.read().decode(errors="replace")
    if rc == 0:
        return True
    if rc != -signal.SIGKILL:
        print(f"  run failed with status {rc}: {stderr.strip()[-500:]}", file=sys.stderr)
        tally.files_lost += 1
        return False
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tally.kill_points += 1
    tally.during_write += tmp_seen or mode == "state"
    tally.during_prune += mode == "prune"
    tally.during_final += mode == "final"
    after = checkpoint_state(out)
    tally.counted_complete += sum(not ok for ok in after.values())  # listed, but torn
    newest_before = max((s for s, ok in before.items() if ok), default=0)
    lost = sum(not ok for ok in after.values())
    if max((s for s, ok in after.items() if ok), default=0) < newest_before:
        lost += 1  # the newest good checkpoint vanished and nothing newer replaced it
    if (out / ADAPTER).exists():  # killed after the final save: that file must be whole
        try:
            load_file(str(out / ADAPTER))
        except (OSError, RuntimeError, SafetensorError):
            lost += 1
    tally.files_lost += lost
    if lost:
        print(
            f"  files lost after a kill ({mode}): before {before}, after {after}", file=sys.stderr
        )
    return False


def training_rounds(args, model: Path, data: Path, work: Path, rng: random.Random, tally: Tally):
    from safetensors.torch import load_file

    ref_out = work / "uninterrupted"
    started = time.monotonic()
    proc = subprocess.Popen(
        cli(train_args(model, data, ref_out, args.steps)),
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    first_step = None
    for line in proc.stdout:
        if first_step is None and line.startswith("step 1/"):
            first_step = time.monotonic() - started
    if proc.wait() != 0:
        sys.exit(f"the uninterrupted run failed: {proc.stderr.read()[-2000:]}")
    tally.runs += 1
    timing = {"first_step": first_step, "total": time.monotonic() - started, "steps": args.steps}
    print(f"uninterrupted run: {timing['total']:.1f} s, first step at {first_step:.1f} s")
    reference = load_file(str(ref_out / ADAPTER))
    import torch

    for round_index in range(args.rounds):
        out = work / f"round-{round_index}"
        base = train_args(model, data, out, args.steps)
        finished = False
        # Each kind of kill once per five kills; the final write's last (a run killed there
        # has no checkpoint left to write, so no other kind could follow it).
        modes = [*rng.sample(KILL_MODES[:-1], len(KILL_MODES) - 1), KILL_MODES[-1]]
        for i in range(args.kills):
            if kill_once(out, base, rng, timing, tally, modes[i % len(modes)]):
                finished = True
                break
        for _ in range(10):  # resume until done (a resume may itself be the one that finishes)
            if finished:
                break
            done = subprocess.run(
                cli(start_args(out, base)), env=ENV, capture_output=True, text=True
            )
            tally.runs += 1
            finished = done.returncode == 0
            if not finished:
                print(f"  resume failed: {done.stderr.strip()[-500:]}", file=sys.stderr)
        tally.compared += 1
        tally.half_deleted_left += torn_folders(out)
        if finished and (out / ADAPTER).is_file():
            got = load_file(str(out / ADAPTER))
            same = got.keys() == reference.keys() and all(
                torch.equal(got[k], reference[k]) for k in got
            )
            tally.equal += same
        print(f"round {round_index}: {tally.kill_points} kill points so far, equal {tally.equal}")
        shutil.rmtree(out, ignore_errors=True)


def bad_input_round(work: Path, data: Path, adapter: Path, rng: random.Random, tally: Tally):
    """Random configs, images, captions and adapter files; only SdtuneError may come out."""
    from sdtune.adapters.inspect import inspect_adapter
    from sdtune.config import iter_options, load_config
    from sdtune.data.sources import scan_image_folder
    from sdtune.errors import SdtuneError

    keys = [k for k, _, _ in iter_options()]
    values = [0, -1, 1.5, "nan", "-inf", "", "none", "x" * 300, "1e400", True, [1], {"a": 1}]
    folder = work / "bad-data"

    def attempt(what: str, fn) -> None:
        tally.bad_inputs += 1
        try:
            fn()
        except SdtuneError as exc:
            if "\n" in str(exc):
                tally.crashes += 1
                print(f"  {what}: a multi-line error: {exc!r}", file=sys.stderr)
        except Exception as exc:  # noqa: BLE001 - counting them is the point
            tally.crashes += 1
            print(f"  {what}: {type(exc).__name__}: {exc}", file=sys.stderr)

    for _ in range(20):
        key = rng.choice(keys + ["lora.rnak", "train", "x.y.z", "data.dir\n"])
        value = rng.choice(values)
        attempt(
            f"config {key}={value!r}",
            lambda k=key, v=value: load_config(None, {"model.path": "m", k: v}),
        )

    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(data, folder)
    images = sorted(folder.glob("*.png"))
    for path in images[: len(images) // 2]:
        raw = path.read_bytes()
        kind = rng.choice(["truncate", "noise", "flip", "empty"])
        if kind == "truncate":
            raw = raw[: rng.randrange(len(raw))]
        elif kind == "noise":
            raw = rng.randbytes(rng.randrange(1, 2000))
        elif kind == "flip":
            raw = bytearray(raw)
            for _ in range(8):
                raw[rng.randrange(len(raw))] = rng.randrange(256)
            raw = bytes(raw)
        else:
            raw = b""
        path.write_bytes(raw)
        path.with_suffix(".txt").write_bytes(rng.randbytes(rng.randrange(0, 300)))
    attempt("image folder", lambda: scan_image_folder(folder))

    raw = adapter.read_bytes()
    for _ in range(10):
        torn = work / "torn.safetensors"
        torn.write_bytes(raw[: rng.randrange(len(raw))])
        attempt("torn adapter", lambda p=torn: inspect_adapter(p))

    key = rng.choice(["lora.rank=0", "train.learning_rate=-1", "data.resolution=100", "zz=1"])
    proc = subprocess.run(
        cli(["train", "model.path=m", "data.dir=d", key]), env=ENV, capture_output=True, text=True
    )
    tally.bad_inputs += 1
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    if proc.returncode != 2 or "Traceback" in proc.stderr or len(lines) != 1:
        tally.crashes += 1
        print(f"  CLI {key}: status {proc.returncode}: {proc.stderr[-500:]}", file=sys.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rounds", type=int, default=5, help="training rounds (and bad-input ones)"
    )
    parser.add_argument("--kills", type=int, default=3, help="kills per training round")
    parser.add_argument("--steps", type=int, default=18, help="optimizer steps per run")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    tally = Tally()
    work = Path(tempfile.mkdtemp(prefix="sdtune-stress-"))
    try:
        from sdtune.data.synthetic import write_shape_dataset
        from sdtune.models.tiny import build_tiny_pipeline

        model, data = work / "model", work / "data"
        build_tiny_pipeline("sd1", seed=0).save_pretrained(model)
        write_shape_dataset(data, shape="star", count=8, size=64, trigger="sks", seed=0)
        training_rounds(args, model, data, work, rng, tally)
        adapter = work / "uninterrupted" / ADAPTER
        for _ in range(args.rounds):
            bad_input_round(work, data, adapter, rng, tally)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(
        f"({tally.during_write} of the kills during a checkpoint write, {tally.during_prune} "
        f"during pruning, {tally.during_final} during the final write; "
        f"{tally.bad_inputs} bad inputs tried)"
    )
    print(
        f"runs {tally.runs}, kill points {tally.kill_points}, resumed equal to uninterrupted "
        f"{tally.equal}/{tally.compared}, files lost {tally.files_lost}, half-deleted folders "
        f"left {tally.half_deleted_left}, counted complete {tally.counted_complete}, "
        f"crashes on bad input {tally.crashes}"
    )
    ok = tally.equal == tally.compared and not tally.files_lost and not tally.crashes
    ok = ok and not tally.half_deleted_left and not tally.counted_complete
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
