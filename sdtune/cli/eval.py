"""`sdtune eval [--adapter PATH]`: concept rate and retention of the toy model, on many seeds."""

from __future__ import annotations

import argparse

from sdtune.toy.world import HELD_OUT_SHAPE, UNSEEN_SHAPES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=None, help="a toy-world model folder (default: the shipped toy base)"
    )
    parser.add_argument("--adapter", default=None, help="LoRA to measure, fused into the model")
    parser.add_argument("--trigger", default="sks", help="trigger word of the taught concept")
    parser.add_argument(
        "--concept",
        choices=UNSEEN_SHAPES,
        default=HELD_OUT_SHAPE,
        help="the held-out shape the adapter teaches",
    )
    parser.add_argument("--seeds-per-prompt", type=int, default=4, help="seeds per prompt")
    parser.add_argument("--steps", type=int, default=25, help="denoising steps")
    parser.add_argument("--guidance", type=float, default=7.5, help="guidance scale")
    parser.add_argument("--json", default=None, help="also write the numbers to this JSON file")


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from sdtune.errors import SdtuneError

    if args.seeds_per_prompt < 1 or args.steps < 1:
        raise SdtuneError("--seeds-per-prompt and --steps must be at least 1")

    from sdtune.cli.main import quiet_progress_bars
    from sdtune.generate.run import load_base
    from sdtune.toy import TOY_BASE_DIR
    from sdtune.toy.eval import format_scores, score_toy_model

    quiet_progress_bars()
    model = args.model or str(TOY_BASE_DIR)
    options = dict(
        trigger=args.trigger,
        seeds_per_prompt=args.seeds_per_prompt,
        steps=args.steps,
        guidance_scale=args.guidance,
        concept=args.concept,
    )
    results = {"base": score_toy_model(load_base(model), **options)}
    print(format_scores("base", results["base"]))
    if args.adapter:
        tuned = load_base(model, adapters=[(args.adapter, 1.0)], fuse=True)
        results["adapter"] = score_toy_model(tuned, **options)
        print(format_scores("adapter", results["adapter"]))
        base, after = results["base"], results["adapter"]
        print(
            f"retention drop: shape {100 * (base.shape_rate - after.shape_rate):+.1f} points, "
            f"colour {100 * (base.colour_rate - after.colour_rate):+.1f} points"
        )
    if args.json:
        payload = {k: v.as_dict() for k, v in results.items()}
        payload["settings"] = {"model": model, "adapter": args.adapter, **options}
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return 0
