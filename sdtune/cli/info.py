"""`sdtune info MODEL`: parameters per component and per layer type."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model", help="a model (folder, .safetensors, hub id) or a family name such as sd1"
    )
    parser.add_argument("--family", default=None, help="model family, if detection needs help")


def run(args: argparse.Namespace) -> int:
    from sdtune.cli.main import quiet_progress_bars
    from sdtune.generate.info import count_parameters, format_info_table, load_for_info
    from sdtune.generate.modes import modes_of_family
    from sdtune.models.families import detect_family

    quiet_progress_bars()
    pipe, title = load_for_info(args.model, args.family)
    family = detect_family(pipe).name
    print(format_info_table(count_parameters(pipe), title=f"{title}: family {family}"))
    print(f"modes: {', '.join(modes_of_family(family)) or 'none'}")
    return 0
