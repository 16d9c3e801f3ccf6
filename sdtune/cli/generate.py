"""`sdtune generate --prompt ... [--mode MODE] [--model BASE] [--lora FILE[:WEIGHT] ...]`

The flags are made from the declared generation options (sdtune.generate.schema): each has
its default, range and help in one place, shared with the web app's form."""

from __future__ import annotations

import argparse

from sdtune.generate.schema import (
    add_generation_arguments,
    build_generation_job,
    parse_lora,
    values_from_args,
)

__all__ = ["add_arguments", "parse_lora", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_generation_arguments(parser)


def run(args: argparse.Namespace) -> int:
    job = build_generation_job(values_from_args(args))  # every check before torch is imported

    from sdtune.cli.main import quiet_progress_bars
    from sdtune.generate.run import generate_to_folder

    quiet_progress_bars()
    for path in generate_to_folder(job):
        print(path)
    return 0
