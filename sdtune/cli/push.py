"""`sdtune push FOLDER --repo USER/NAME`: upload a run folder (adapter + card) to the Hub."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", help="the run folder: adapter, README.md, config")
    parser.add_argument("--repo", required=True, help="Hub model repo id, e.g. user/my-lora")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument(
        "--token", default=None, help="Hub token (default: HF_TOKEN / hf auth login)"
    )


def run(args: argparse.Namespace) -> int:
    from sdtune.adapters.push import push_folder

    print(push_folder(args.folder, args.repo, private=args.private, token=args.token))
    return 0
