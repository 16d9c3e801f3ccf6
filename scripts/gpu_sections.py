"""The measurements of the GPU report, one generator of rows per section.

Each section yields `Row`s as it measures, so a section that fails half-way keeps what it
measured; `gpu_report.py` runs the sections under time budgets and writes the report. The
training and inference work reuses `bench_train.py` and `bench_generate.py`: the same loops and
timings as those scripts, so the report and the scripts cannot disagree.
"""

from __future__ import annotations

import argparse
import math
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

GIB = 2**30
# Per-image FLOP floors of the full-size models (published counts; BENCHMARKS.md compares them
# with FlopCounterMode's): SD 1.5 LoRA step with latents cached, the same with gradient
# checkpointing, the VAE encoder at 512 px, the SD 2 768-v step.
FLOOR_SD15_STEP = 1.714e12
FLOOR_SD15_CHECKPOINTED = 2.303e12
FLOOR_SD15_VAE_ENCODE = 1.117e12
FLOOR_SD2V_STEP = 4.89e12
PUBLISHED_H100_EAGER_IT_S = 54.5  # SD 1.5, 512 px, fp16, guidance
MODES = {  # mode -> the family whose tiny model runs it
    "txt2img": "sd1",
    "img2img": "sd1",
    "inpaint": "sd1-inpaint",
    "depth2img": "sd2-depth",
    "upscale": "sd2-upscale",
}

# key -> (target as scripts/BENCHMARKS.md states it, the check of a measured value)
TARGETS: dict[str, tuple[str, Callable[[float], bool]]] = {
    "train.cached.fraction": (">= 40% of the dense bf16 rate", lambda v: v >= 0.40),
    "textbook.ratio_cached": (">= 1.3x the textbook loop", lambda v: v >= 1.3),
    "train.cached.estimate_ratio": ("within 15% of the peak", lambda v: abs(v - 1) <= 0.15),
    "memory.peak": ("<= 4 GB", lambda v: v <= 4e9),
    "memory.estimate_ratio": ("within 15% of the peak", lambda v: abs(v - 1) <= 0.15),
    "sdxl.peak": ("<= 10 GB", lambda v: v <= 10e9),
    "sdxl.estimate_ratio": ("within 15% of the peak", lambda v: abs(v - 1) <= 0.15),
    "inference.live_ratio": ("within 10% of base", lambda v: v <= 1.10),
    "inference.fused_ratio": ("within 2% of base", lambda v: v <= 1.02),
}


class OutOfTime(Exception):
    """A section ran past its time budget."""


def one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


@dataclass
class Row:
    key: str
    name: str
    value: float | None
    unit: str  # TFLOP/s | img/s | fraction | x | bytes | s | ms | steps | it/s
    note: str = ""
    status: str = "ok"  # ok | error | skipped (out of time) | left out (by the run's options)
    target: str = ""
    met: bool | None = None

    def __post_init__(self) -> None:
        if self.key in TARGETS and self.status == "ok" and self.value is not None:
            self.target, check = TARGETS[self.key]
            self.met = bool(check(self.value))


@dataclass
class Settings:
    """What each section runs: the GPU workloads of BENCHMARKS.md, or tiny ones for --smoke."""

    device: torch.device
    full: bool  # full-size architectures with random weights, else the tiny test models
    precision: str = "bf16"  # training
    resolution: int = 512
    batch_size: int = 8
    steps: int = 16  # timed training steps per run
    warmup: int = 4
    num_workers: int = 4
    sd2_resolution: int = 768
    sd2_batch_size: int = 4
    sd2_total_steps: int = 20
    sdxl_resolution: int = 1024
    infer_size: int = 512
    infer_steps: int = 50
    infer_repeats: int = 2
    compile_backend: str = "inductor"
    matmul_seconds: float = 2.0

    @classmethod
    def smoke(cls) -> Settings:
        """Tiny models on the CPU, fp32, a few steps each: the same code in well under a minute."""
        return cls(
            torch.device("cpu"),
            full=False,
            precision="fp32",
            resolution=64,
            batch_size=2,
            steps=2,
            warmup=1,
            num_workers=1,
            sd2_resolution=64,
            sd2_batch_size=1,
            sd2_total_steps=4,
            sdxl_resolution=64,
            infer_size=64,
            infer_steps=4,
            infer_repeats=1,
            compile_backend="eager",
            matmul_seconds=0.3,
        )


@dataclass
class Bench:
    """The state sections share: settings, a scratch folder, earlier results, kept pipelines."""

    settings: Settings
    folder: Path
    values: dict[str, float] = field(default_factory=dict)
    kept: dict[str, object] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # said once in the report's header
    runs: int = 0

    def row(self, key: str, name: str, value: float, unit: str, note: str = "") -> Row:
        self.values[key] = value
        return Row(key, name, value, unit, note)

    def model(self, family: str) -> str:
        """How the rows name a family's model: full-size, or the tiny stand-in of --smoke."""
        name = {"sd1": "SD 1.5", "sd2-v": "SD 2 768-v", "sdxl": "SDXL 1.0"}[family]
        return name if self.settings.full else f"tiny {name}"

    def need(self, key: str) -> float:
        if key not in self.values:
            raise RuntimeError(f"needs {key}, which an earlier section did not measure")
        return self.values[key]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build_on_device(family: str, full: bool, device: torch.device):
    """A base pipeline (random weights) built directly on `device`: initialising a full-size
    model on a GPU takes a second where the CPU takes tens. Falls back to a CPU build."""
    from bench_train import build_base

    try:
        with torch.device(device):
            pipe = build_base(family, full)
    except Exception:  # a part that cannot be built on that device: build on the CPU
        pipe = build_base(family, full)
    return pipe


# ---- matmul ------------------------------------------------------------------------------------


def section_matmul(bench: Bench) -> Iterator[Row]:
    from bench_train import measure_matmul_rate

    s = bench.settings
    for use, half in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        dtype = half if s.device.type == "cuda" else torch.float32  # CPU: fp32 for both uses
        rate = measure_matmul_rate(s.device, dtype, s.matmul_seconds)
        kind = str(dtype).removeprefix("torch.")
        name = f"dense {kind} matmul rate, for {'training' if use == 'bf16' else 'inference'}"
        note = f"{'8192' if s.device.type == 'cuda' else '1024'}^3 products, best batch of {s.matmul_seconds:g} s"  # fmt: skip
        yield bench.row(f"matmul.{use}", name, rate / 1e12, "TFLOP/s", note)


# ---- training ----------------------------------------------------------------------------------


def train_args(s: Settings, **changes) -> argparse.Namespace:
    """The options of bench_train.py for one run."""
    values = dict(
        family="sd1",
        full=s.full,
        resolution=s.resolution,
        batch_size=s.batch_size,
        precision=s.precision,
        gradient_checkpointing=False,
        cached=True,
        optimizer="adamw",
        steps=s.steps,
        warmup=s.warmup,
        num_workers=s.num_workers,
    )
    values.update(changes)
    return argparse.Namespace(**values)


def image_folder(bench: Bench, args: argparse.Namespace) -> Path:
    """Rendered images with captions for one run: all its steps in one epoch."""
    from bench_train import images_needed

    from sdtune.data.synthetic import write_shape_dataset

    count = images_needed(args)
    folder = bench.folder / f"data{args.resolution}-{count}"
    if not (folder / "images").exists():
        write_shape_dataset(folder / "images", count=count, size=args.resolution, trigger="sks")
    return folder


def train_once(bench: Bench, args: argparse.Namespace, loop: str = "sdtune"):
    """One bench_train run (sdtune's loop or the textbook one) on a freshly built base."""
    import gc

    from bench_train import PeakMemory, run_sdtune, run_textbook

    device = bench.settings.device
    folder = image_folder(bench, args)
    bench.runs += 1
    before = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    pipe = build_on_device(args.family, args.full, device)
    runner = run_sdtune if loop == "sdtune" else run_textbook
    result = runner(args, device, folder, bench.runs, PeakMemory(device), pipe=pipe)
    del pipe
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if before > 64 * 2**20:  # something of an earlier section is still on the device
        bench.notes.append(f"a {loop} run started with {before / GIB:.2f} GiB already allocated")
    return result


def estimate_peak(bench: Bench, args: argparse.Namespace):
    from bench_train import build_base, make_config

    from sdtune.train.estimate import estimate_memory

    folder = image_folder(bench, args)
    cfg = make_config(args, folder, 0)
    return estimate_memory(cfg, build_base(args.family, args.full, empty=True))


def floor_flops(bench: Bench, variant: str, counted: float) -> tuple[float, str]:
    """The per-image FLOP floor of a full-size step at the floor's own resolution; tiny
    models and other resolutions use FlopCounterMode's count."""
    floor, resolution = {
        "cached": (FLOOR_SD15_STEP, 512),
        "checkpointing": (FLOOR_SD15_CHECKPOINTED, 512),
        "uncached": (FLOOR_SD15_STEP + FLOOR_SD15_VAE_ENCODE, 512),
        "sd2v": (FLOOR_SD2V_STEP, 768),
    }[variant]
    s = bench.settings
    if not s.full or resolution != (s.sd2_resolution if variant == "sd2v" else s.resolution):
        return counted, "FLOPs as counted (no published floor for this model and size)"
    return floor, f"floor {floor / 1e12:.3f} TFLOP/img, counted {counted / 1e12:.3f}"


def section_train(variant: str) -> Callable[[Bench], Iterator[Row]]:
    """SD 1.5 LoRA, sdtune's loop: cached latents + text, uncached, or cached + checkpointing."""

    def run(bench: Bench) -> Iterator[Row]:
        s = bench.settings
        args = train_args(
            s, cached=variant != "uncached", gradient_checkpointing=variant == "checkpointing"
        )
        result = train_once(bench, args)
        what = (
            f"{bench.model('sd1')} LoRA {s.resolution} px b{s.batch_size} {s.precision}, {variant}"
        )
        key = f"train.{variant}"
        yield bench.row(f"{key}.images_per_s", f"{what}: images/s", result.images_per_s, "img/s")
        floor, note = floor_flops(bench, variant, result.flops_per_image)
        rate = bench.need("matmul.bf16") * 1e12
        fraction = result.images_per_s * floor / rate
        yield bench.row(f"{key}.fraction", f"{what}: fraction of dense rate", fraction, "fraction", note)  # fmt: skip
        yield bench.row(f"{key}.peak", f"{what}: peak memory", result.peak_bytes, "bytes", memory_note(s))  # fmt: skip
        if variant == "cached":
            predicted = estimate_peak(bench, args).total
            yield bench.row(f"{key}.estimate", f"{what}: sdtune estimate", predicted, "bytes")
            ratio = predicted / result.peak_bytes
            yield bench.row(f"{key}.estimate_ratio", f"{what}: estimate / peak", ratio, "x")

    return run


def memory_note(s: Settings) -> str:
    if s.device.type == "cuda":
        return "torch.cuda.max_memory_allocated over the timed steps"
    return "CPU stand-in: the process's peak resident set"


def section_textbook(bench: Bench) -> Iterator[Row]:
    """The same workload (cached setting) through bench_train's textbook loop, same process."""
    s = bench.settings
    result = train_once(bench, train_args(s), loop="textbook")
    what = f"textbook loop {s.resolution} px b{s.batch_size} {s.precision}"
    yield bench.row("textbook.images_per_s", f"{what}: images/s", result.images_per_s, "img/s")
    cached = bench.need("train.cached.images_per_s")
    yield bench.row("textbook.ratio_cached", "sdtune cached / textbook: images/s", cached / result.images_per_s, "x")  # fmt: skip
    uncached = bench.need("train.uncached.images_per_s")
    note = "both encode every step: the loops' own cost"
    yield bench.row("textbook.ratio_uncached", "sdtune uncached / textbook: images/s", uncached / result.images_per_s, "x", note)  # fmt: skip


def eight_bit_available(device: torch.device) -> str | None:
    """None if bitsandbytes' AdamW8bit steps a tensor on `device`, else why not."""
    try:
        import bitsandbytes as bnb

        param = torch.nn.Parameter(torch.zeros(8192, device=device))
        param.grad = torch.ones_like(param)
        bnb.optim.AdamW8bit([param]).step()
        sync(device)
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


def section_memory(bench: Bench, family: str = "sd1") -> Iterator[Row]:
    """Peak at batch 1, gradient checkpointing, 8-bit AdamW, latents and text cached, next to
    sdtune estimate's: SD 1.5 at 512 px, or SDXL at 1024 px (`recipes/sdxl-lora.yaml`)."""
    s = bench.settings
    key = "memory" if family == "sd1" else family
    resolution = s.resolution if family == "sd1" else s.sdxl_resolution
    args = train_args(
        s,
        family=family,
        resolution=resolution,
        batch_size=1,
        gradient_checkpointing=True,
        optimizer="adamw8bit",
    )
    args.steps, args.warmup = 3, 2
    why_not = eight_bit_available(s.device)
    estimate = estimate_peak(bench, args)
    note = "AdamW8bit (bitsandbytes)"
    if why_not is not None:  # the named fallback: fp32 AdamW state, the 8-bit state estimated
        args.optimizer = "adamw"
        full_state = estimate_peak(bench, args).optimizer
        note = (
            f"FALLBACK: bitsandbytes unusable ({why_not}); measured with torch AdamW, minus "
            f"the estimated state difference {(full_state - estimate.optimizer) / GIB:.3f} GiB"
        )
        bench.notes.append(f"8-bit rows: {note}")
    result = train_once(bench, args)
    peak = result.peak_bytes
    if why_not is not None:
        peak -= full_state - estimate.optimizer
    what = f"{bench.model(family)} {resolution} px b1, checkpointing, 8-bit AdamW"
    yield bench.row(f"{key}.peak", f"{what}: peak memory", peak, "bytes", note)
    yield bench.row(f"{key}.estimate", f"{what}: sdtune estimate", estimate.total, "bytes")
    ratio = estimate.total / peak
    yield bench.row(f"{key}.estimate_ratio", f"{what}: estimate / peak", ratio, "x")


def section_sdxl(bench: Bench) -> Iterator[Row]:
    """SDXL's memory target: the settings of recipes/sdxl-lora.yaml at batch 1."""
    yield from section_memory(bench, "sdxl")


def section_sd2v(bench: Bench) -> Iterator[Row]:
    """SD 2 768-v, bf16: every one of the run's steps with a finite loss and gradient norm
    (sdtune's loop checks both each step and stops at the first that is not)."""
    from bench_train import steps_in_run

    from sdtune.errors import SdtuneError

    s = bench.settings
    args = train_args(s, family="sd2-v", resolution=s.sd2_resolution, batch_size=s.sd2_batch_size)
    args.warmup = min(3, s.sd2_total_steps - 2)
    for args.steps in range(s.sd2_total_steps, 0, -1):  # the most timed steps that fit
        if steps_in_run(args) <= s.sd2_total_steps:
            break
    total = steps_in_run(args)
    what = f"{bench.model('sd2-v')} {s.sd2_resolution} px b{s.sd2_batch_size} {s.precision}"
    try:
        result = train_once(bench, args)
    except SdtuneError as exc:
        match = re.search(r"non-finite .* at step (\d+)", str(exc))
        if not match:
            raise
        yield bench.row("sd2v.finite_steps", f"{what}: finite steps", int(match[1]) - 1, "steps", str(exc))  # fmt: skip
        return
    row = bench.row("sd2v.finite_steps", f"{what}: finite steps of {total}", total, "steps")
    row.target, row.met = f"all {total} finite", True
    yield row
    yield bench.row("sd2v.images_per_s", f"{what}: images/s", result.images_per_s, "img/s")
    floor, note = floor_flops(bench, "sd2v", result.flops_per_image)
    fraction = result.images_per_s * floor / (bench.need("matmul.bf16") * 1e12)
    yield bench.row("sd2v.fraction", f"{what}: fraction of dense rate", fraction, "fraction", note)  # fmt: skip
    yield bench.row("sd2v.peak", f"{what}: peak memory", result.peak_bytes, "bytes", memory_note(s))  # fmt: skip


# ---- inference ---------------------------------------------------------------------------------


def section_inference(bench: Bench) -> Iterator[Row]:
    """Per-step latency with guidance: base, live LoRA, fused LoRA, as ratios in one run."""
    from bench_generate import count_flops, measure, write_adapter

    from sdtune.generate.adapters import fuse_adapters
    from sdtune.generate.device import pick_dtype, place_pipeline
    from sdtune.generate.txt2img import load_adapters

    s = bench.settings
    dtype = pick_dtype(s.device)  # fp16 on CUDA (VAE kept in fp32), fp32 on a CPU
    pipe = build_on_device("sd1", s.full, s.device)
    pipe.set_progress_bar_config(disable=True)
    place_pipeline(pipe, s.device, dtype)
    args = argparse.Namespace(steps=s.infer_steps, repeats=s.infer_repeats, size=s.infer_size)
    step_flops, _ = count_flops(s.full, s.infer_size)
    what = f"{bench.model('sd1')} {s.infer_size} px {str(dtype).removeprefix('torch.')}, guidance"
    base = measure(pipe, args, s.device)
    rate = bench.need("matmul.fp16") * 1e12
    note = f"{PUBLISHED_H100_EAGER_IT_S} it/s published for an H100, eager; {step_flops / base / rate:.1%} of the dense rate"  # fmt: skip
    yield bench.row("inference.base_ms", f"{what}: base ms/step", base * 1e3, "ms")
    yield bench.row("inference.base_it_s", f"{what}: base it/s", 1 / base, "it/s", note)
    yield bench.row("inference.run_s", f"{what}: {s.infer_steps}-step run, U-Net steps only", base * s.infer_steps, "s")  # fmt: skip
    load_adapters(pipe, [(write_adapter(pipe, str(bench.folder), 16), 1.0)])
    live = measure(pipe, args, s.device)
    yield bench.row("inference.live_ratio", f"{what}: live LoRA r16 / base", live / base, "x")
    fuse_adapters(pipe)
    fused = measure(pipe, args, s.device)
    yield bench.row("inference.fused_ratio", f"{what}: fused LoRA r16 / base", fused / base, "x")
    bench.kept["inference"] = (pipe, args, base)


def section_compile(bench: Bench) -> Iterator[Row]:
    """torch.compile of the fused U-Net: compile time, then latency against the eager base."""
    from bench_generate import measure, step_times

    if "inference" not in bench.kept:
        raise RuntimeError("needs the inference section's pipeline")
    pipe, args, base = bench.kept.pop("inference")
    s = bench.settings
    pipe.unet = torch.compile(pipe.unet, backend=s.compile_backend)
    start = time.perf_counter()
    step_times(pipe, 2, args.size, s.device)  # compiles
    first = time.perf_counter() - start
    compiled = measure(pipe, args, s.device)
    note = f"backend {s.compile_backend}; the first run compiles"
    yield bench.row("compile.first_run_s", "compiled fused U-Net: first runs incl. compile", first, "s", note)  # fmt: skip
    yield bench.row("compile.ratio", "compiled fused LoRA / eager base", compiled / base, "x", note)  # fmt: skip
    del pipe


# ---- generation modes --------------------------------------------------------------------------


def section_modes(bench: Bench) -> Iterator[Row]:
    """Every generation mode once, on the report's device, with tiny models at 64 px."""
    import numpy as np
    from PIL import Image

    from sdtune.generate.device import pick_dtype, place_pipeline
    from sdtune.generate.run import GenerationRequest, generate
    from sdtune.models.tiny import build_tiny_pipeline

    s = bench.settings
    dtype = pick_dtype(s.device)
    rng = np.random.RandomState(0)
    image = Image.fromarray((rng.rand(64, 64, 3) * 255).astype("uint8"))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    for mode, family in MODES.items():
        name = f"{mode} ({family}, tiny): seconds"
        request = GenerationRequest(
            prompt="a red circle", mode=mode, steps=2, output_type="np", seeds=[0]
        )
        if mode != "txt2img":
            request.image = image.resize((32, 32)) if mode == "upscale" else image
        if mode == "inpaint":
            request.mask = mask
        try:
            pipe = build_tiny_pipeline(family, seed=0)
            pipe.set_progress_bar_config(disable=True)
            place_pipeline(pipe, s.device, dtype)
            start = time.perf_counter()
            out = generate(pipe, request).images[0]
            sync(s.device)
        except OutOfTime:
            raise
        except Exception as exc:  # one mode failing leaves the others to run
            yield Row(f"modes.{mode}", name, None, "s", one_line(exc), status="error")
            continue
        row = bench.row(f"modes.{mode}", name, time.perf_counter() - start, "s")
        row.note = f"{s.device.type} {str(dtype).removeprefix('torch.')}, output {out.shape}"
        row.target, row.met = "runs, finite image", bool(np.isfinite(out).all())
        yield row


SECTIONS: dict[str, tuple[Callable[[Bench], Iterator[Row]], float, tuple[str, ...]]] = {
    # name -> (generator, time budget on an H100/H200 in seconds, the keys of its rows)
    "matmul": (section_matmul, 20, ("matmul.bf16", "matmul.fp16")),
    # first of the training runs, so that nothing an earlier run left can sit in its peak
    "memory": (section_memory, 40, ("memory.peak", "memory.estimate", "memory.estimate_ratio")),
    "sdxl": (section_sdxl, 60, ("sdxl.peak", "sdxl.estimate", "sdxl.estimate_ratio")),
    "train-cached": (
        section_train("cached"),
        60,
        tuple(
            f"train.cached.{k}"
            for k in ("images_per_s", "fraction", "peak", "estimate", "estimate_ratio")
        ),
    ),  # fmt: skip
    "train-uncached": (
        section_train("uncached"),
        45,
        tuple(f"train.uncached.{k}" for k in ("images_per_s", "fraction", "peak")),
    ),  # fmt: skip
    "train-checkpointing": (
        section_train("checkpointing"),
        45,
        tuple(f"train.checkpointing.{k}" for k in ("images_per_s", "fraction", "peak")),
    ),  # fmt: skip
    "textbook": (
        section_textbook,
        45,
        ("textbook.images_per_s", "textbook.ratio_cached", "textbook.ratio_uncached"),
    ),  # fmt: skip
    "sd2v": (
        section_sd2v,
        60,
        ("sd2v.finite_steps", "sd2v.images_per_s", "sd2v.fraction", "sd2v.peak"),
    ),  # fmt: skip
    "inference": (
        section_inference,
        60,
        (
            "inference.base_ms",
            "inference.base_it_s",
            "inference.run_s",
            "inference.live_ratio",
            "inference.fused_ratio",
        ),
    ),  # fmt: skip
    "modes": (section_modes, 45, tuple(f"modes.{m}" for m in MODES)),
    "compile": (section_compile, 150, ("compile.first_run_s", "compile.ratio")),
}
OPTIONAL = {"compile"}  # run only when its whole budget is left


def finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)
