"""Training speed and memory: sdtune's own loop against a textbook LoRA loop, in one run.

    .venv/bin/python scripts/bench_train.py                    # tiny SD 1 on the CPU, 64 px
    .venv/bin/python scripts/bench_train.py --cached           # latents (and text) cached
    .venv/bin/python scripts/bench_train.py --full --device cuda --precision bf16 \\
        --resolution 512 --batch-size 8 --cached               # full-size SD 1.5 on a GPU
    .venv/bin/python scripts/bench_train.py --full --count-only   # FLOPs of a full-size step,
                                                                  # counted on the meta device

First the device's own dense matmul rate is measured (fp32 on a CPU, the run's half precision
on a GPU). Then each loop trains for --warmup + --steps steps on a rendered image set: sdtune's
loop (`sdtune.train.loop.run_steps`, with the run's caches, fused optimizer and so on) and a
textbook loop written below (VAE encode and text encode every step, fp32 adapters under autocast,
a plain AdamW, the loss read back every step). The FLOPs of one step of each are counted with
`torch.utils.flop_counter.FlopCounterMode`, never typed in, so achieved TFLOP/s and the fraction
of the measured matmul rate follow. Weights are random: speed does not depend on their values.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

PRECISIONS = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
LORA_RANK = 16


# ---- the device ------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_matmul_rate(device: torch.device, dtype: torch.dtype, seconds: float = 2.0) -> float:
    """Dense matmul FLOP/s of this device, best of several timed batches of square products."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    best, spent = 0.0, 0.0
    while spent < seconds:
        reps = 10 if device.type == "cuda" else 2
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        elapsed = time.perf_counter() - start
        spent += elapsed
        best = max(best, 2 * n**3 * reps / elapsed)
    return best


class PeakMemory:
    """Peak accelerator memory (CUDA allocator) or, on a CPU, the process's peak resident set
    (VmHWM, reset through /proc/self/clear_refs): a proxy that includes Python and libraries."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.label = "peak GPU mem" if device.type == "cuda" else "peak RSS*"

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass  # the peak then covers the whole process lifetime

    def read(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated()
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def register_cpu_attention_flops() -> None:
    """Count the CPU flash-attention kernel like the GPU ones (torch counts only the latter)."""
    from torch.utils import flop_counter

    aten, registry = torch.ops.aten, flop_counter.flop_registry
    registry.setdefault(
        aten._scaled_dot_product_flash_attention_for_cpu,
        registry[aten._scaled_dot_product_flash_attention],
    )
    registry.setdefault(
        aten._scaled_dot_product_flash_attention_for_cpu_backward,
        registry[aten._scaled_dot_product_flash_attention_backward],
    )


# ---- models and data -------------------------------------------------------------------------


def build_base(family: str, full: bool, empty: bool = False):
    """The family's full-size architecture or its tiny version, random weights (seeded)."""
    from sdtune.models.build import build_pipeline
    from sdtune.models.families import build_pipeline_from_config, get_family
    from sdtune.models.tiny import tiny_family_configs

    if full:
        pipe = build_pipeline_from_config(family, empty=empty)
    else:
        pipe = build_pipeline(get_family(family), tiny_family_configs(family), empty=empty)
    if empty:
        pipe.to("meta")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_config(args, folder: Path, round_: int):
    """The run's config: the same options a user would pass to `sdtune train`."""
    from sdtune.config import iter_options, load_config

    options = {k for k, _, _ in iter_options()}
    overrides = {
        "model.path": "(built in memory)",
        "model.family": args.family,
        "data.dir": str(folder / "images"),
        "data.resolution": str(args.resolution),
        "data.cache_latents": str(args.cached).lower(),
        "data.cache_dir": str(folder / f"cache{round_}"),
        "train.batch_size": str(args.batch_size),
        "train.mixed_precision": PRECISIONS[args.precision],
        "train.gradient_checkpointing": str(args.gradient_checkpointing).lower(),
        "train.optimizer": args.optimizer,
        "train.num_workers": str(args.num_workers),
        "train.max_steps": str(args.warmup + args.steps),
        "train.log_every_n_steps": "1000000",
        "lora.rank": str(LORA_RANK),
        "lora.alpha": str(LORA_RANK),
        "output.dir": str(folder / f"run{round_}"),
        "output.log_with": "none",
    }
    if "data.cache_text_embeddings" in options:
        overrides["data.cache_text_embeddings"] = str(args.cached).lower()
    if "output.sample_prompts" in options:
        overrides["output.sample_prompts"] = ""
    return load_config(None, overrides)


@dataclass
class Result:
    name: str
    images_per_s: float
    step_s: float
    peak_bytes: int
    flops_per_image: float


# ---- sdtune's loop -------------------------------------------------------------------------------


def run_sdtune(
    args, device: torch.device, folder: Path, round_: int, memory: PeakMemory, pipe=None
):
    """sdtune's own loop (prepare_run + run_steps), timed after --warmup steps; `pipe` is a
    freshly built base (the run adds its adapter to it), built here when not given."""
    from accelerate import Accelerator

    from sdtune.models.families import get_family
    from sdtune.train import loop
    from sdtune.train.setup import check_inputs

    cfg = make_config(args, folder, round_)
    pipe = pipe if pipe is not None else build_base(args.family, args.full)
    loop._forget_earlier_runs()
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=cfg.train.mixed_precision)
    report = check_inputs(cfg)
    run = loop.prepare_run(
        cfg, accelerator, pipe, get_family(args.family), Path(cfg.output.dir), report
    )
    cfg.train.max_steps = args.warmup  # warm-up: kernels, allocator, a cold cache filled
    loop.run_steps(run)
    cfg.train.max_steps += 1
    with FlopCounterMode(display=False) as counter:
        loop.run_steps(run)
    flops = counter.get_total_flops() / args.batch_size
    memory.reset()
    short = short_steps(args)
    if short:
        # Each run_steps call is a new pass over the loader, whose workers start again; in a
        # real run that happens once an epoch. Two timed calls of different lengths give the
        # time of a step without that start-up: (long - short) / (its extra steps).
        short_s = timed_steps(run, short, device)
        step_s = (timed_steps(run, args.steps, device) - short_s) / (args.steps - short)
    else:
        step_s = timed_steps(run, args.steps, device) / args.steps
    peak = memory.read()
    del run, pipe
    return Result("sdtune", args.batch_size / step_s, step_s, peak, flops)


def timed_steps(run, steps: int, device: torch.device) -> float:
    """Seconds for `steps` more steps of sdtune's loop, the device synchronised at both ends."""
    from sdtune.train import loop

    sync(device)
    start = time.perf_counter()
    run.cfg.train.max_steps += steps
    loop.run_steps(run)
    sync(device)
    return time.perf_counter() - start


# ---- the textbook loop ---------------------------------------------------------------------------


def run_textbook(
    args, device: torch.device, folder: Path, round_: int, memory: PeakMemory, pipe=None
):
    """The loop of the common LoRA training scripts: every step encodes the images with the VAE
    and the captions with the text encoder; the frozen base is in the run's precision, the
    adapter in fp32 under autocast; plain AdamW; the loss is read back each step for logging."""
    from diffusers import DDPMScheduler

    from sdtune.adapters.lora import build_lora_config, resolve_unet_targets
    from sdtune.data.sources import scan_data_config
    from sdtune.train.setup import build_dataloader

    cfg = make_config(args, folder, round_)
    half = HALF.get(args.precision)
    pipe = pipe if pipe is not None else build_base(args.family, args.full)
    pipe.to(device, dtype=half or torch.float32)
    unet, vae, text_encoder = pipe.unet, pipe.vae, pipe.text_encoder
    for part in (unet, vae, text_encoder):
        part.requires_grad_(False)
    unet.add_adapter(build_lora_config(LORA_RANK, LORA_RANK, 0.0, resolve_unet_targets("attn")))
    lora = [p for p in unet.parameters() if p.requires_grad]
    for p in lora:
        p.data = p.data.float()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if args.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(lora, lr=1e-4, weight_decay=1e-2)
    else:
        optimizer = torch.optim.AdamW(lora, lr=1e-4, weight_decay=1e-2)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    loader, _ = build_dataloader(scan_data_config(cfg.data).samples, cfg, pipe.tokenizer)
    unet.train()

    def step(batch) -> float:
        pixels = batch["pixel_values"].to(device, dtype=half or torch.float32)
        ids = batch["input_ids"].to(device)
        with torch.autocast(device.type, dtype=half or torch.float32, enabled=half is not None):
            with torch.no_grad():
                latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
                text = text_encoder(ids)[0]
            noise = torch.randn_like(latents)
            steps = scheduler.config.num_train_timesteps
            t = torch.randint(0, steps, (len(latents),), device=device)
            noisy = scheduler.add_noise(latents, noise, t)
            if scheduler.config.prediction_type == "v_prediction":
                target = scheduler.get_velocity(latents, noise, t)
            else:
                target = noise
            prediction = unet(noisy, t, text).sample
            loss = torch.nn.functional.mse_loss(prediction.float(), target.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lora, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        return loss.item()

    def batches():
        while True:
            yield from loader

    stream = batches()
    for _ in range(args.warmup):
        step(next(stream))
    with FlopCounterMode(display=False) as counter:
        step(next(stream))
    flops = counter.get_total_flops() / args.batch_size
    sync(device)
    memory.reset()
    start = time.perf_counter()
    for _ in range(args.steps):
        step(next(stream))
    sync(device)
    elapsed = time.perf_counter() - start
    peak = memory.read()
    return Result(
        "textbook", args.steps * args.batch_size / elapsed, elapsed / args.steps, peak, flops
    )


# ---- FLOPs of a full-size step, on the meta device ------------------------------------------------


def count_step_flops(args) -> None:
    """Per-image TFLOP of one LoRA step of the full-size (or tiny) model, counted on meta:
    U-Net forward and backward, VAE encoder, text encoder; with and without checkpointing."""
    from sdtune.models.families import detect_family
    from sdtune.train.estimate import simulate_step
    from sdtune.train.setup import add_lora_adapters, enable_gradient_checkpointing

    dtype, batch = HALF.get(args.precision, torch.float32), args.batch_size
    print(f"{'full-size' if args.full else 'tiny'} {args.family}, {args.resolution} px, "
          f"LoRA rank {LORA_RANK} on attention; FlopCounterMode on the meta device, per image")  # fmt: skip
    rows = []
    for checkpointing in (False, True):
        args.gradient_checkpointing = checkpointing
        with tempfile.TemporaryDirectory() as tmp:
            cfg = make_config(args, Path(tmp), 0)
        cfg.data.cache_latents = True  # the VAE encoder is counted on its own below
        pipe = build_base(args.family, args.full, empty=True)
        pipe.to(dtype=dtype)
        add_lora_adapters(pipe, cfg)
        if checkpointing:
            enable_gradient_checkpointing(pipe, [])
        for p in pipe.unet.parameters():
            p.data = p.data.to(dtype)
        parts = count_parts(pipe, cfg, dtype)
        with FlopCounterMode(display=False) as counter:
            simulate_step(pipe, cfg, dtype, detect_family(pipe).extra_in_channels)
        step = counter.get_total_flops() - parts["text encoder"]
        if not checkpointing:
            forward = parts["U-Net forward"]
            rows += [
                ("U-Net forward", forward),
                (f"U-Net backward ({(step - forward) / forward:.2f}x forward)", step - forward),
                ("VAE encoder", parts["VAE encoder"]),
                ("text encoder", parts["text encoder"]),
            ]
        rows.append(
            (f"LoRA step, latents cached, checkpointing {'on' if checkpointing else 'off'}", step)
        )
    for name, flops in rows:
        print(f"  {name:<50}{flops / batch / 1e12:8.3f} TFLOP")


def count_parts(pipe, cfg, dtype) -> dict[str, int]:
    """FLOPs of the U-Net forward, the VAE encoder and the text encoder, each alone."""
    side = cfg.data.resolution // pipe.vae_scale_factor
    batch, meta = cfg.train.batch_size, "meta"
    width = pipe.text_encoder.config.hidden_size
    noisy = torch.empty(batch, pipe.unet.config.in_channels, side, side, device=meta, dtype=dtype)
    text = torch.empty(batch, 77, width, device=meta, dtype=dtype)
    pixels = torch.empty(
        batch, 3, cfg.data.resolution, cfg.data.resolution, device=meta, dtype=dtype
    )
    calls = {
        "U-Net forward": lambda: pipe.unet(
            noisy, torch.zeros(batch, dtype=torch.long, device=meta), text
        ),
        "VAE encoder": lambda: pipe.vae.encode(pixels),
        "text encoder": lambda: pipe.text_encoder(
            torch.zeros(batch, 77, dtype=torch.long, device=meta)
        ),
    }
    counts = {}
    for name, call in calls.items():
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            call()
        counts[name] = counter.get_total_flops()
    return counts


# ---- report ----------------------------------------------------------------------------------


def report(results: list[Result], peak_rate: float, predicted: int | None, label: str) -> None:
    print(f"{'loop':<10}{'img/s':>9}{'ms/step':>10}{'TFLOP/img':>11}{'TFLOP/s':>9}"
          f"{'% peak':>8}{label:>15}")  # fmt: skip
    for r in results:
        achieved = r.flops_per_image * r.images_per_s
        print(f"{r.name:<10}{r.images_per_s:>9.2f}{r.step_s * 1e3:>10.1f}"
              f"{r.flops_per_image / 1e12:>11.4f}{achieved / 1e12:>9.4f}"
              f"{achieved / peak_rate:>8.1%}{r.peak_bytes / 2**30:>12.2f} GiB")  # fmt: skip
    if predicted is not None:
        print(f"sdtune estimate of the peak: {predicted / 2**30:.2f} GiB")
    if len(results) == 2:
        ratio = results[0].images_per_s / results[1].images_per_s
        print(f"sdtune / textbook: {ratio:.2f}x images/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="sd1", help="sd1, sd2-base, sd2-v, ...")
    parser.add_argument("--full", action="store_true", help="full-size architecture (else tiny)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--resolution", type=int, default=None, help="image side in px")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default=None)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--cached", action="store_true", help="latents and text embeddings cached")
    parser.add_argument("--optimizer", choices=("adamw", "adamw8bit"), default="adamw")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per loop")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=1, help="repeat both loops; median kept")
    parser.add_argument("--num-workers", type=int, default=0, help="data-loader workers")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    parser.add_argument("--only", choices=("sdtune", "textbook"), default=None)
    parser.add_argument("--count-only", action="store_true", help="count FLOPs on meta and stop")
    args = parser.parse_args()

    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sdtune.cli.main import quiet_libraries

    quiet_libraries()
    register_cpu_attention_flops()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    args.resolution = args.resolution or (512 if args.full else 64)
    if args.count_only:
        count_step_flops(args)
        return
    rate_dtype = HALF.get(args.precision, torch.float32) if device.type == "cuda" else torch.float32
    peak_rate = measure_matmul_rate(device, rate_dtype)
    name = (
        torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"cpu, {torch.get_num_threads()} threads"
    )  # noqa: E501
    print(f"device: {name}; dense {str(rate_dtype).removeprefix('torch.')} matmul "
          f"{peak_rate / 1e12:.3f} TFLOP/s measured")  # fmt: skip
    print(f"{'full-size' if args.full else 'tiny'} {args.family}, {args.resolution} px, "
          f"batch {args.batch_size}, {args.precision}, {args.optimizer}, checkpointing "
          f"{'on' if args.gradient_checkpointing else 'off'}, latents+text "
          f"{'cached' if args.cached else 'encoded every step'} (sdtune loop)")  # fmt: skip

    memory = PeakMemory(device)
    runs: dict[str, list[Result]] = {"sdtune": [], "textbook": []}
    with tempfile.TemporaryDirectory(prefix="sdtune-bench-") as tmp:
        from sdtune.data.synthetic import write_shape_dataset

        folder = Path(tmp)
        count = images_needed(args)
        write_shape_dataset(folder / "images", count=count, size=args.resolution, trigger="sks")
        for round_ in range(args.rounds):
            for name_, runner in (("sdtune", run_sdtune), ("textbook", run_textbook)):
                if args.only in (None, name_):
                    runs[name_].append(runner(args, device, folder, round_, memory))
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
        predicted = None
        if args.only in (None, "sdtune"):
            from sdtune.train.estimate import estimate_memory

            pipe = build_base(args.family, args.full, empty=True)
            predicted = estimate_memory(make_config(args, folder, 0), pipe).total
    results = [median_result(rs) for rs in runs.values() if rs]
    report(results, peak_rate, predicted, memory.label)
    if device.type == "cpu":
        print("* CPU proxy: the process's peak resident set, Python and libraries included")


def short_steps(args) -> int:
    """Steps of the shorter timed call of sdtune's loop (0: one timed call, no data workers)."""
    return max(1, args.steps // 4) if args.num_workers and args.steps > 1 else 0


def steps_in_run(args) -> int:
    """Every step a run of sdtune's loop trains: warm-up, the counted one, the timed ones."""
    return args.warmup + 1 + short_steps(args) + args.steps


def images_needed(args) -> int:
    """Enough images for every step of a run in one epoch (a new epoch restarts the loader's
    workers, which a short benchmark would otherwise count several times)."""
    return max(args.batch_size * steps_in_run(args), 8)


def median_result(results: list[Result]) -> Result:
    best = sorted(results, key=lambda r: r.images_per_s)[len(results) // 2]
    return Result(
        best.name,
        statistics.median(r.images_per_s for r in results),
        statistics.median(r.step_s for r in results),
        max(r.peak_bytes for r in results),
        best.flops_per_image,
    )


if __name__ == "__main__":
    main()
