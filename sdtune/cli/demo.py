"""`sdtune demo [--out DIR] [--concept ring|star]`: teach the toy model a new shape with a LoRA."""

from __future__ import annotations

import argparse

from sdtune.demo import DemoSettings
from sdtune.toy.world import UNSEEN_SHAPES

_DEFAULTS = DemoSettings()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", default="outputs/demo", help="folder for everything the demo makes"
    )
    parser.add_argument(
        "--concept",
        choices=UNSEEN_SHAPES,
        default=_DEFAULTS.concept,
        help="the held-out shape to teach (the star is the harder one)",
    )
    parser.add_argument("--steps", type=int, default=_DEFAULTS.max_steps, help="training steps")
    parser.add_argument(
        "--images", type=int, default=_DEFAULTS.num_images, help="rendered training images"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=_DEFAULTS.seed,
        help="seed of the rendered image sets, the training run and the samples",
    )
    parser.add_argument(
        "--seeds-per-prompt",
        type=int,
        default=_DEFAULTS.seeds_per_prompt,
        help="seeds per prompt of the before/after measurement",
    )


def run(args: argparse.Namespace) -> int:
    from sdtune.cli.main import quiet_progress_bars
    from sdtune.demo import run_demo
    from sdtune.errors import SdtuneError

    for name in ("steps", "images", "seeds_per_prompt"):
        if getattr(args, name) < 1:
            raise SdtuneError(f"--{name.replace('_', '-')} must be at least 1")
    quiet_progress_bars()
    settings = DemoSettings(
        max_steps=args.steps,
        num_images=args.images,
        seeds_per_prompt=args.seeds_per_prompt,
        seed=args.seed,
        concept=args.concept,
    )
    print(run_demo(args.out, settings).summary())
    return 0
