"""`sdtune estimate [RECIPE] [section.key=value ...]`: predicted peak GPU memory of a run."""

from __future__ import annotations

import argparse

from sdtune.config import load_config, split_command_items
from sdtune.config_checks import validate_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "items",
        nargs="*",
        metavar="RECIPE|KEY=VALUE",
        help="the training recipe and overrides, as for `sdtune train` (data is not read)",
    )
    parser.add_argument(
        "--device",
        default=None,
        choices=("cuda", "cpu"),
        help="where the run will train (default: this machine's GPU, else a CUDA GPU with bf16)",
    )
    parser.add_argument(
        "--gpu", default=None, metavar="SIZE", help="the target GPU's memory, e.g. 24GB"
    )


def run(args: argparse.Namespace) -> int:
    recipe, overrides = split_command_items(args.items)
    # The estimate reads no images and no weights: data.dir is never needed, and model.path
    # only when model.family does not fix the architecture.
    cfg = load_config(recipe, overrides, required=())
    if not cfg.model.family:
        validate_config(cfg, required=("model.path",))

    from sdtune.cli.main import quiet_progress_bars
    from sdtune.train.estimate import (
        device_memory_line,
        estimate_memory,
        format_estimate,
        precision_on,
        resolve_family_name,
        resolve_target,
    )

    target = resolve_target(args.device, args.gpu)
    asked = cfg.train.mixed_precision
    cfg.train.mixed_precision = precision_on(asked, target)
    resolved = f" -> {cfg.train.mixed_precision}" if asked == "auto" else ""
    print(f"assuming {target.description}: train.mixed_precision={asked}{resolved}")
    quiet_progress_bars()
    family = resolve_family_name(cfg)
    # CUDA autocast keeps normalisations in fp32; CPU autocast runs them in half precision.
    estimate = estimate_memory(cfg, fp32_norms=target.kind == "cuda")
    t, d = cfg.train, cfg.data
    title = (
        f"{family}, {d.resolution} px, batch {t.batch_size}, {t.mixed_precision}, "
        f"optimizer {t.optimizer}, gradient checkpointing {'on' if t.gradient_checkpointing else 'off'}"
        f", latents {'cached' if d.cache_latents else 'encoded each step'}"
    )
    print(format_estimate(estimate, title))
    line, _ = device_memory_line(estimate, target)
    print(line)
    return 0
