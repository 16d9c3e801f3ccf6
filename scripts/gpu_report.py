"""Every GPU figure of scripts/BENCHMARKS.md in one run, compared with its target.

    bash scripts/gpu_report.sh --wheels gpu-wheels --out DIR    # on the GPU machine, ~4-5 min
    python scripts/gpu_report.py --smoke --out DIR              # tiny models on the CPU, < 1 min

First the carried wheels (`make gpu-wheels`: diffusers and bitsandbytes) are installed into a
folder of their own, never torch, and put first on the path. Then, in this one process:
the dense bf16 and fp16 matmul rates; SD 1.5 LoRA training at 512 px, batch 8, bf16 (latents
and text cached, uncached, cached with gradient checkpointing) as images/s and the fraction of
the bf16 rate; the textbook loop on the same work; the peak at batch 1 with checkpointing and
8-bit AdamW next to `sdtune estimate`'s; SD 2 768-v for 20 steps; inference latency of base,
live and fused LoRA (and torch.compile if time is left); every generation mode once. Models are
the full-size architectures built from the shipped configs with random weights.

Each section has a time budget; a section that fails or runs out of time becomes error rows
and the run goes on. The report is written as gpu-report.md and gpu-report.json in --out, and
appended (device, versions, commit) to a copy of BENCHMARKS.md there and, unless --smoke or
--no-append, to scripts/BENCHMARKS.md itself.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
BENCHMARKS = SCRIPTS / "BENCHMARKS.md"
PACKAGES = ("torch", "diffusers", "transformers", "peft", "accelerate", "bitsandbytes")
PACKAGES += ("safetensors", "huggingface_hub", "numpy", "pillow")


@contextmanager
def time_limit(seconds: float):
    """Raise OutOfTime in this (main) thread once `seconds` have passed."""

    from gpu_sections import OutOfTime

    def on_alarm(_signum, _frame):
        raise OutOfTime(f"over its {seconds:.0f} s budget")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def default_wheels() -> Path | None:
    for folder in (REPO / "gpu-wheels", REPO.parent / "gpu-wheels"):
        if folder.is_dir():
            return folder
    return None


def install_step(args) -> list[str]:
    """Install the carried wheels (before diffusers is first imported); one line per wheel."""
    from gpu_wheels import WheelError, install_wheels

    folder = args.wheels or default_wheels()
    if folder is None or args.no_install:
        return ["no wheel folder: the machine's own packages are used"]
    try:
        lines = install_wheels(folder, args.site)
    except (WheelError, subprocess.CalledProcessError) as exc:
        return [f"INSTALL FAILED ({exc}); the machine's own packages are used"]
    manifest = folder / "manifest.json"
    if manifest.exists():
        for entry in json.loads(manifest.read_text())["wheels"]:
            if "removed" in entry:
                kept = ", ".join(entry.get("kept_cuda_libraries", []))
                lines.append(
                    f"{entry['name']} wheel slimmed to fit: {entry['bytes'] / 2**20:.1f} MiB of "
                    f"{entry['full_bytes'] / 2**20:.1f} MiB, CUDA libraries kept: {kept}"
                )
    return lines


def versions(site: Path) -> dict[str, str]:
    """Version of each package in use, and where it came from (carried or the machine's)."""
    import importlib.metadata

    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "missing"
            continue
        carried = str(dist.locate_file("")).startswith(str(site))
        found[name] = dist.version + (" (carried)" if carried else "")
    import torch

    found["torch"] = torch.__version__  # with its build, e.g. 2.11.0+cu130
    if torch.cuda.is_available():
        found["torch"] += f", CUDA {torch.version.cuda}"
    return found


def describe_device(device) -> str:
    import torch

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs"  # fmt: skip
    threads = torch.get_num_threads()
    return f"CPU ({platform.machine()}), {threads} thread{'s' if threads > 1 else ''}"


def read_commit(given: str | None) -> str:
    if given:
        return given
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, check=True
        ).stdout.decode()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git here; pass --commit)"
    return head.strip() + (" (with uncommitted changes)" if dirty else "")


def run_sections(bench, args, deadline: float) -> list:
    """Run each chosen section under its budget; failures become error rows."""
    import gc

    import torch
    from gpu_sections import OPTIONAL, SECTIONS, Row, one_line

    rows, smoke = [], args.smoke
    for name in SECTIONS:
        if name in args.left_out:
            rows += [
                Row(k, k, None, "", args.left_out[name], "left out") for k in SECTIONS[name][2]
            ]
        if name not in args.sections:
            continue
        run, budget, keys = SECTIONS[name]
        left = deadline - time.monotonic()
        limit = min(budget * (4 if smoke else 1), left)  # a small shared CPU is slow
        if (name in OPTIONAL and left < budget * (0.2 if smoke else 1)) or left < 5:
            why = (
                f"skipped: {left:.0f} s left of the run's time, the section needs up to {budget} s"
            )
            rows += [Row(k, k, None, "", why, status="skipped") for k in keys]
            print(f"[{name}] {why}", flush=True)
            continue
        start, cpu, done = time.monotonic(), time.process_time(), []
        print(f"[{name}] up to {limit:.0f} s", flush=True)
        try:
            with time_limit(limit):
                for row in run(bench):
                    done.append(row)
                    print(f"  {row.name}: {format_value(row)}", flush=True)
        except Exception as exc:  # OutOfTime, CUDA out of memory, a library's error: go on
            message = one_line(exc)
            print(f"[{name}] FAILED {message}\n{traceback.format_exc()}", flush=True)
            measured = {r.key for r in done}
            done += [
                Row(k, k, None, "", message, status="error") for k in keys if k not in measured
            ]
        rows += done
        used = f"{time.monotonic() - start:.1f} s, CPU {time.process_time() - cpu:.1f} s"
        print(f"[{name}] {used}", flush=True)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


# ---- the report --------------------------------------------------------------------------------


def format_value(row) -> str:
    if row.value is None:
        return "-"
    v, unit = row.value, row.unit
    if unit == "bytes":
        return f"{v / 2**30:.2f} GiB"
    if unit == "fraction":
        return f"{v:.1%}"
    if unit == "x":
        return f"{v:.3f}x"
    if unit == "steps":
        return f"{v:.0f}"
    return f"{v:.2f} {unit}" if v >= 1 else f"{v:.4f} {unit}"


def verdict(row, smoke: bool) -> str:
    if row.status != "ok":
        return row.status.upper()
    if row.met is None:
        return ""
    if smoke:  # tiny models on a CPU: the comparison only shows the code works
        return "met" if row.met else "missed"
    return "met" if row.met else "**MISSED**"


def render_markdown(meta: dict, rows: list) -> str:
    lines = [f"## GPU report: {meta['device']}, commit {meta['commit']}", ""]
    lines.append(f"{meta['date']}; `{meta['command']}`; {meta['seconds']:.0f} s in all.")
    if meta["smoke"]:
        lines.append(
            "**Smoke run**: tiny models on a CPU, to check the report's code. These numbers say "
            "nothing about the GPU targets."
        )
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + "."]
    lines += ["", "Install:"] + [f"- {line}" for line in meta["install"]]
    lines += [f"- {note}" for note in meta["notes"]]
    lines += ["", "| figure | measured | target | verdict | note |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r.name} | {format_value(r)} | {r.target} | {verdict(r, meta['smoke'])} | {r.note} |"
        )
    missed = [r for r in rows if r.met is False]
    failed = [r for r in rows if r.status != "ok"]
    heading = (
        "Targets missed (smoke: tiny models, not the targets' work)"
        if meta["smoke"]
        else "Targets missed"
    )
    lines += ["", f"{heading}: " + ("none" if not missed else "")]
    lines += [f"- {r.name}: {format_value(r)} against {r.target}" for r in missed]
    if failed:
        lines += ["", "Not measured:"] + [f"- {r.key}: {r.note}" for r in failed]
    return "\n".join(lines) + "\n"


def write_reports(out: Path, meta: dict, rows: list, append_to_checkout: bool) -> None:
    """gpu-report.md, gpu-report.json and BENCHMARKS.md (the checkout's, report appended) in
    `out`; each written under a temporary name and renamed into place."""
    from dataclasses import asdict

    markdown = render_markdown(meta, rows)
    payload = {**meta, "rows": [asdict(r) for r in rows]}
    appended = BENCHMARKS.read_text() + "\n" + markdown
    files = {"gpu-report.md": markdown, "gpu-report.json": json.dumps(payload, indent=2) + "\n"}
    files["BENCHMARKS.md"] = appended
    out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)
    if append_to_checkout:
        tmp = BENCHMARKS.with_suffix(".tmp")
        tmp.write_text(appended)
        tmp.replace(BENCHMARKS)


def parse_args(argv=None):
    from gpu_sections import SECTIONS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the report files")
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU")
    parser.add_argument("--wheels", type=Path, default=None, help="folder of carried wheels (default: gpu-wheels/ in or beside the checkout)")  # fmt: skip
    parser.add_argument("--no-install", action="store_true", help="use the machine's packages")
    parser.add_argument("--site", type=Path, default=Path(tempfile.gettempdir()) / "sdtune-site", help="where the wheels are installed")  # fmt: skip
    parser.add_argument("--max-seconds", type=float, default=None, help="whole run (default 330; --smoke 600)")  # fmt: skip
    parser.add_argument("--only", default="", help=f"comma list of sections: {','.join(SECTIONS)}")
    parser.add_argument("--skip", default="", help="comma list of sections to leave out")
    parser.add_argument("--commit", default=None, help="commit to report where git is absent")
    parser.add_argument("--no-append", action="store_true", help="leave scripts/BENCHMARKS.md as it is")  # fmt: skip
    args = parser.parse_args(argv)
    chosen = [s for s in (args.only.split(",") if args.only else SECTIONS) if s]
    unknown = [s for s in chosen + args.skip.split(",") if s and s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    args.sections = [s for s in chosen if s not in args.skip.split(",")]
    args.left_out = {}
    if args.smoke and not args.only and "compile" in args.sections:
        args.sections.remove("compile")
        args.left_out["compile"] = (
            "--smoke leaves torch.compile out (~40 s on a small CPU); "
            "--smoke --only matmul,inference,compile runs it"
        )
    args.max_seconds = args.max_seconds or (600 if args.smoke else 330)
    return args


def main(argv=None) -> int:
    started = time.monotonic()
    sys.path.insert(1, str(REPO))  # sdtune from this checkout, whether installed or not
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    install = install_step(args)  # before anything imports diffusers
    import torch
    from gpu_sections import Bench, Settings

    from sdtune.cli.main import quiet_libraries

    quiet_libraries()
    if args.smoke:
        settings = Settings.smoke()
        torch.set_num_threads(1)  # tiny models: one thread is fastest on a shared small CPU
    elif torch.cuda.is_available():
        settings = Settings(torch.device("cuda"), full=True)
    else:
        print("error: no CUDA device; run with --smoke on a CPU", file=sys.stderr)
        return 2
    from bench_train import register_cpu_attention_flops

    register_cpu_attention_flops()
    meta = {
        "device": describe_device(settings.device),
        "commit": read_commit(args.commit),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python scripts/gpu_report.py "
        + " ".join(sys.argv[1:] if argv is None else argv),  # fmt: skip
        "smoke": args.smoke,
        "versions": versions(args.site),
        "install": install,
    }
    print("\n".join([meta["device"], *install, json.dumps(meta["versions"])]), flush=True)
    with tempfile.TemporaryDirectory(prefix="sdtune-gpu-report-") as tmp:
        bench = Bench(settings, Path(tmp))
        deadline = started + args.max_seconds
        rows = run_sections(bench, args, deadline)
    meta["notes"] = bench.notes
    meta["seconds"] = time.monotonic() - started
    write_reports(args.out, meta, rows, not (args.smoke or args.no_append))
    print(render_markdown(meta, rows), flush=True)
    return 0 if all(r.status in ("ok", "left out") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
