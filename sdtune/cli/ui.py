"""`sdtune ui [--workspace DIR] [--host 127.0.0.1] [--port 7860] [--token TOKEN]`"""

from __future__ import annotations

import argparse
import os


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workspace",
        default="outputs",
        help="folder of the datasets, runs and images (default outputs)",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only; any other needs a token)",
    )
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument(
        "--token",
        default=os.environ.get("SDTUNE_UI_TOKEN"),
        help="the token a non-local page must give (default: a random one, printed); "
        "also read from SDTUNE_UI_TOKEN",
    )


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from sdtune.runs.jobs import ensure_runner
    from sdtune.runs.workspace import Workspace
    from sdtune.ui.app import create_app
    from sdtune.ui.recipes import ensure_toy_recipe
    from sdtune.ui.security import resolve_token

    token = resolve_token(args.host, args.token)
    ws = Workspace(args.workspace)
    ensure_toy_recipe(ws)
    ensure_runner(ws)  # jobs queued while no server was up
    app = create_app(ws.root, host=args.host, token=token)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"sdtune ui: http://{shown}:{args.port}/  (workspace {ws.root})", flush=True)
    if token is not None:
        print(f"token: {token}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
