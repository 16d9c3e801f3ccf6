"""`sdtune generate --prompt ... [--mode MODE] [--model BASE] [--lora FILE[:WEIGHT] ...]`"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from sdtune.errors import SdtuneError, quote

MODES_HELP = "txt2img, img2img, inpaint, depth2img, upscale (default: the model's first)"
SCHEDULERS_HELP = "ddim, pndm, lms, euler, euler-a, dpm++2m, dpm++2m-karras, unipc"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", default="", help="what to draw")
    parser.add_argument("--negative-prompt", default="", help="what to steer away from")
    parser.add_argument(
        "--model",
        default=None,
        help="base model (folder, hub id or .safetensors); defaults to the adapter's base model",
    )
    parser.add_argument("--family", default=None, help="model family, if detection needs help")
    parser.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="FILE[:WEIGHT]",
        help="an adapter file or run folder, with an optional weight (repeatable)",
    )
    parser.add_argument("--fuse", action="store_true", help="fuse adapters into the weights")
    _add_mode_arguments(parser)
    parser.add_argument("--num-images", type=int, default=1, help="images to make")
    parser.add_argument("--steps", type=int, default=25, help="denoising steps")
    parser.add_argument(
        "--guidance", type=float, default=7.5, help="classifier-free guidance scale"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the first image")
    parser.add_argument("--seeds", default=None, help="explicit seeds, e.g. 1,7,42")
    parser.add_argument("--batch-size", type=int, default=None, help="images per forward pass")
    parser.add_argument("--width", type=int, default=None, help="width in px (multiple of 8)")
    parser.add_argument("--height", type=int, default=None, help="height in px (multiple of 8)")
    parser.add_argument("--out", default="outputs/images", help="folder for the PNGs")
    parser.add_argument(
        "--max-token-length",
        type=int,
        default=None,
        choices=(75, 150, 225),
        help="prompt tokens: 75, or 150/225 in windows (default: as the adapter was trained)",
    )
    parser.add_argument(
        "--zero-terminal-snr",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="sample for zero terminal SNR: rescaled schedule, trailing timesteps, guidance "
        "rescale (default: as the adapter was trained)",
    )
    parser.add_argument(
        "--guidance-rescale",
        type=float,
        default=None,
        help="rescale guidance by this phi in [0, 1] (default 0.7 with zero terminal SNR)",
    )
    _add_speed_arguments(parser)


def _add_mode_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", default=None, help=MODES_HELP)
    parser.add_argument("--image", default=None, help="input image (img2img, inpaint, ...)")
    parser.add_argument("--mask", default=None, help="inpaint mask: white = repaint")
    parser.add_argument("--depth-map", default=None, help="depth2img: greyscale, near = bright")
    parser.add_argument(
        "--strength", type=float, default=0.8, help="fraction of the run redone (0-1]"
    )
    parser.add_argument(
        "--noise-level", type=int, default=20, help="upscale: noise on the input (0-350)"
    )
    parser.add_argument("--scheduler", default=None, help=SCHEDULERS_HELP)
    parser.add_argument(
        "--snapshots", default=None, help="fractions of the run to save as a strip: 0.25,0.5,0.75"
    )


def _add_speed_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cpu, cuda, ...; automatic if unset")
    parser.add_argument("--dtype", default=None, help="fp32, fp16, bf16 (default fp16 on CUDA)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the U-Net")
    parser.add_argument("--cpu-offload", action="store_true", help="model CPU offload (CUDA)")
    parser.add_argument("--channels-last", action="store_true", help="channels-last memory format")


def parse_lora(spec: str) -> tuple[str, float]:
    """`path` or `path:weight` (a Windows drive letter is not mistaken for a weight). A weight
    that is not a finite number (nan, inf) is refused: it would only draw a black image."""
    path, sep, weight = spec.rpartition(":")
    if sep and path:
        try:
            value = float(weight)
        except ValueError:
            return spec, 1.0
        if not math.isfinite(value):
            raise SdtuneError(
                f"--lora {quote(spec)}: the weight must be a finite number, e.g. {path}:0.8"
            )
        return path, value
    return spec, 1.0


def parse_numbers(text: str | None, kind: type, flag: str) -> list:
    """A comma-separated list of finite numbers, or a one-line error naming the flag."""
    if not text:
        return []
    example = "1,7,42" if kind is int else "0.25,0.5"
    parts = text.split(",")
    try:
        values = [kind(part) for part in parts if part.strip()]
    except ValueError:
        values = None
    if values is None or len(values) != len(parts) or not all(math.isfinite(v) for v in values):
        raise SdtuneError(
            f"{flag} takes comma-separated finite numbers, e.g. {example}; got {quote(text)}"
        )
    return values


def check_arguments(args: argparse.Namespace) -> None:
    """What can be checked before torch is imported: numbers, files, family and mode names."""
    for flag, value in (("--guidance", args.guidance), ("--strength", args.strength)):
        if not math.isfinite(value):
            raise SdtuneError(f"{flag} must be a finite number; got {value}")
    for spec in args.lora:
        path = Path(parse_lora(spec)[0])
        if not path.exists():
            raise SdtuneError(f"--lora: adapter '{path}' does not exist")
    for flag, value in (("--image", args.image), ("--mask", args.mask)):
        if value is not None and not Path(value).is_file():
            raise SdtuneError(f"{flag} '{value}' does not exist")
    if args.depth_map is not None and not Path(args.depth_map).is_file():
        raise SdtuneError(f"--depth-map '{args.depth_map}' does not exist")
    if args.family is not None:
        from sdtune.models.families import get_family

        get_family(args.family)
    if args.mode is not None:
        from sdtune.generate.modes import get_mode

        get_mode(args.mode)


def run(args: argparse.Namespace) -> int:
    adapters = [parse_lora(spec) for spec in args.lora]
    seeds = parse_numbers(args.seeds, int, "--seeds")
    snapshots = parse_numbers(args.snapshots, float, "--snapshots")
    check_arguments(args)

    from sdtune.cli.main import quiet_progress_bars
    from sdtune.generate.run import SpeedOptions, generate_to_folder

    quiet_progress_bars()

    paths = generate_to_folder(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        model=args.model,
        family=args.family,
        adapters=adapters,
        fuse=args.fuse,
        num_images=args.num_images,
        steps=args.steps,
        guidance_scale=args.guidance,
        seed=args.seed,
        width=args.width,
        height=args.height,
        out_dir=args.out,
        device=args.device,
        mode=args.mode,
        seeds=seeds,
        batch_size=args.batch_size,
        speed=SpeedOptions(
            dtype=args.dtype,
            channels_last=args.channels_last,
            compile=args.compile,
            cpu_offload=args.cpu_offload,
        ),
        image=args.image,
        mask=args.mask,
        depth_map=args.depth_map,
        strength=args.strength,
        noise_level=args.noise_level,
        scheduler=args.scheduler,
        snapshots=snapshots,
        max_token_length=args.max_token_length,
        zero_terminal_snr=args.zero_terminal_snr,
        guidance_rescale=args.guidance_rescale,
    )
    for path in paths:
        print(path)
    return 0
