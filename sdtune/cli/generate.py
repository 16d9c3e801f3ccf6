"""`sdtune generate --prompt ... [--model BASE] [--lora FILE[:WEIGHT] ...]`"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", required=True, help="what to draw")
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
    parser.add_argument("--num-images", type=int, default=1, help="images to make")
    parser.add_argument("--steps", type=int, default=25, help="denoising steps")
    parser.add_argument(
        "--guidance", type=float, default=7.5, help="classifier-free guidance scale"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the first image")
    parser.add_argument("--width", type=int, default=None, help="width in px (multiple of 8)")
    parser.add_argument("--height", type=int, default=None, help="height in px (multiple of 8)")
    parser.add_argument("--out", default="outputs/images", help="folder for the PNGs")
    parser.add_argument("--device", default=None, help="cpu, cuda, ...; automatic if unset")


def parse_lora(spec: str) -> tuple[str, float]:
    """`path` or `path:weight` (a Windows drive letter is not mistaken for a weight)."""
    path, sep, weight = spec.rpartition(":")
    if sep and path:
        try:
            return path, float(weight)
        except ValueError:
            pass
    return spec, 1.0


def run(args: argparse.Namespace) -> int:
    from sdtune.cli.main import quiet_progress_bars
    from sdtune.generate.run import generate_to_folder

    quiet_progress_bars()

    paths = generate_to_folder(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        model=args.model,
        family=args.family,
        adapters=[parse_lora(spec) for spec in args.lora],
        fuse=args.fuse,
        num_images=args.num_images,
        steps=args.steps,
        guidance_scale=args.guidance,
        seed=args.seed,
        width=args.width,
        height=args.height,
        out_dir=args.out,
        device=args.device,
    )
    for path in paths:
        print(path)
    return 0
