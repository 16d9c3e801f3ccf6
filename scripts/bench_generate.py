"""Per-step generation latency: base model, base + live LoRA, base + fused LoRA.

    .venv/bin/python scripts/bench_generate.py            # tiny SD 1 on the CPU, 64 px
    .venv/bin/python scripts/bench_generate.py --device cuda   # full-size SD 1.5, fp16, 512 px
    .venv/bin/python scripts/bench_generate.py --full --count-only   # FLOPs only, on meta

A live adapter adds two small matmuls beside every targeted layer; fusing adds them into the
weights, so a fused model should cost what the base costs. Ratios are taken against the base
measured in the same run (same process, device and settings), never against stored numbers.
Weights are random: speed does not depend on their values, and nothing is downloaded.

The device's dense matmul rate is measured first, and the FLOPs of a denoising step (U-Net with
guidance) and of a whole 50-step run (text encoder, 50 steps, VAE decode) are counted with
`FlopCounterMode` on the meta device, so each row also shows achieved TFLOP/s and its fraction
of that measured rate.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from bench_train import measure_matmul_rate  # scripts/ is on the path when run as a script
from torch.utils.flop_counter import FlopCounterMode

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]


def build(device: torch.device, full: bool, dtype: torch.dtype):
    """Full-size SD 1.5 (random weights) or the tiny SD 1, placed for inference."""
    from sdtune.generate.device import place_pipeline

    if full:
        from sdtune.models.families import build_pipeline_from_config

        pipe = build_pipeline_from_config("sd1")
    else:
        from sdtune.models.tiny import build_tiny_pipeline

        pipe = build_tiny_pipeline("sd1")
    pipe.set_progress_bar_config(disable=True)
    return place_pipeline(pipe, device, dtype)


def write_adapter(pipe, folder: str, rank: int) -> str:
    """A random LoRA on the attention layers, saved as training saves it, then removed."""
    from sdtune.adapters.io import save_adapter
    from sdtune.adapters.lora import build_lora_config

    pipe.unet.add_adapter(build_lora_config(rank, rank, 0.0, ATTENTION))
    with torch.no_grad():
        for name, param in pipe.unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.01)
    path = save_adapter(folder, pipe.unet, info={"family": "sd1"})
    pipe.unet.delete_adapters("default")
    return str(path)


def step_times(pipe, steps: int, size: int, device: torch.device) -> list[float]:
    """Seconds per denoising step (U-Net with guidance + scheduler), from step-end callbacks."""
    stamps: list[float] = []

    def on_step_end(_pipe, _step, _t, _kwargs):
        if device.type == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        return {}

    with torch.no_grad():
        pipe(
            "a photo of a cat",
            num_inference_steps=steps,
            width=size,
            height=size,
            generator=torch.Generator("cpu").manual_seed(0),
            output_type="latent",
            callback_on_step_end=on_step_end,
        )
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]  # the first is warm-up


def measure(pipe, args, device) -> float:
    step_times(pipe, 2, args.size, device)  # warm-up: allocator, kernels, caches
    times = []
    for _ in range(args.repeats):
        times.extend(step_times(pipe, args.steps, args.size, device))
    return statistics.median(times)


def count_flops(full: bool, size: int, steps: int = 50) -> tuple[int, int]:
    """(FLOPs of one denoising step with guidance, FLOPs of a whole `steps`-step run), counted
    on the meta device: text encoder (prompt and empty prompt), U-Net at batch 2, VAE decode."""
    from sdtune.models.build import build_pipeline
    from sdtune.models.families import build_pipeline_from_config, get_family
    from sdtune.models.tiny import tiny_family_configs

    if full:
        pipe = build_pipeline_from_config("sd1", empty=True)
    else:
        pipe = build_pipeline(get_family("sd1"), tiny_family_configs("sd1"), empty=True)
    pipe.to("meta")
    side = size // pipe.vae_scale_factor
    width = pipe.text_encoder.config.hidden_size
    latents = torch.empty(2, pipe.unet.config.in_channels, side, side, device="meta")
    text = torch.empty(2, 77, width, device="meta")
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            pipe.text_encoder(torch.zeros(2, 77, dtype=torch.long, device="meta"))
        encode = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            pipe.unet(latents, torch.zeros(2, dtype=torch.long, device="meta"), text)
        step = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            pipe.vae.decode(latents[:1])
        decode = counter.get_total_flops()
    return step, encode + steps * step + decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--full", action="store_true", help="full-size SD 1.5 even on the CPU")
    parser.add_argument("--steps", type=int, default=None, help="steps per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per setting")
    parser.add_argument("--size", type=int, default=None, help="image side in px")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    parser.add_argument("--count-only", action="store_true", help="count FLOPs on meta and stop")
    args = parser.parse_args()

    from sdtune.cli.main import quiet_libraries

    quiet_libraries()  # before diffusers is imported: it reads its verbosity then
    from sdtune.generate.adapters import fuse_adapters
    from sdtune.generate.device import pick_device, pick_dtype
    from sdtune.generate.txt2img import load_adapters

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    full = args.full or device.type == "cuda"
    args.size = args.size or (512 if full else 64)
    args.steps = args.steps or (20 if full else 10)
    step_flops, run_flops = count_flops(full, args.size)
    model = "SD 1.5 full-size" if full else "tiny SD 1"
    print(f"{model}, {args.size} px: {step_flops / 1e12:.4f} TFLOP per step with guidance, "
          f"{run_flops / 1e12:.4f} TFLOP per 50-step run (FlopCounterMode, meta device)")  # fmt: skip
    if args.count_only:
        return
    dtype = pick_dtype(device)
    peak = measure_matmul_rate(device, dtype if device.type == "cuda" else torch.float32)
    pipe = build(device, full, dtype)
    rows = [("base", measure(pipe, args, device))]
    with tempfile.TemporaryDirectory() as folder:
        load_adapters(pipe, [(write_adapter(pipe, folder, args.rank), 1.0)])
        rows.append((f"base + live LoRA r{args.rank}", measure(pipe, args, device)))
        fuse_adapters(pipe)
        rows.append((f"base + fused LoRA r{args.rank}", measure(pipe, args, device)))
    print(f"{model}, {args.size} px, {str(dtype).removeprefix('torch.')}, {device}, "
          f"median of {args.repeats}x{args.steps - 1} steps; dense matmul "
          f"{peak / 1e12:.3f} TFLOP/s measured")  # fmt: skip
    print(f"{'setting':<28}{'ms/step':>10}{'ratio':>8}{'TFLOP/s':>9}{'% peak':>8}{'50-step s':>11}")
    for name, seconds in rows:
        achieved = step_flops / seconds
        print(f"{name:<28}{seconds * 1e3:>10.2f}{seconds / rows[0][1]:>8.2f}"
              f"{achieved / 1e12:>9.4f}{achieved / peak:>8.1%}{50 * seconds:>11.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
