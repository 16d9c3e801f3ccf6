"""`sdtune data inspect RECIPE [section.key=value ...]`: a dry run of the data, no model loaded."""

from __future__ import annotations

import argparse

from sdtune.config import load_config, split_command_items


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["inspect"], help="inspect: report and exit")
    parser.add_argument(
        "items",
        nargs="*",
        metavar="RECIPE|KEY=VALUE",
        help="the training recipe and overrides, as for `sdtune train`",
    )


def run(args: argparse.Namespace) -> int:
    recipe, overrides = split_command_items(args.items)
    # The data report loads no model: only the data section is checked (before heavy imports).
    cfg = load_config(recipe, overrides, sections=("data",))

    from sdtune.data.report import describe_data

    print(describe_data(cfg))
    return 0
