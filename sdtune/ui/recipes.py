"""Recipes the New run page starts from, and the `sdtune train` command a form stands for.

A recipe is one of the workspace's `recipes/*.yaml` or one shipped beside sdtune (its source
checkout's `recipes/`). The workspace always holds `recipes/toy-lora.yaml`: a run on the shipped
toy model that trains in about a minute on a CPU, written the first time the app starts.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import yaml

from sdtune.config import load_yaml
from sdtune.errors import SdtuneError, quote
from sdtune.runs.workspace import Workspace

SHIPPED_DIR = Path(__file__).resolve().parents[2] / "recipes"
TOY_RECIPE = "recipes/toy-lora.yaml"
TOY_DATASET = "datasets/toy-rings"
# option keys whose values name files; the form's values for them must stay in the workspace
PATH_KEYS = ("model.path", "model.config_dir", "data.dir", "data.class_dir", "data.cache_dir")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def toy_recipe_text() -> str:
    from sdtune.toy import TOY_BASE_DIR

    values = {
        "model": {"path": str(TOY_BASE_DIR)},
        "data": {"dir": TOY_DATASET, "trigger": "sks", "resolution": 64},
        "lora": {"rank": 8, "alpha": 8, "unet_targets": "attn-ff"},
        "train": {
            "max_steps": 20,
            "batch_size": 4,
            "learning_rate": 0.002,
            "log_every_n_steps": 1,
            "checkpoint_every_n_steps": 5,
        },
        "output": {
            "sample_prompts": ["a photo of a red sks ring on a white background"],
            "sample_every_n_steps": 10,
            "sample_steps": 10,
            "export_kohya": False,
        },
    }
    head = "# Toy: a LoRA on sdtune's shipped 64 px toy model; about a minute on a CPU.\n"
    return head + yaml.safe_dump(values, sort_keys=False)


def ensure_toy_recipe(ws: Workspace) -> None:
    path = ws.root / TOY_RECIPE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(toy_recipe_text(), encoding="utf-8")


def _describe(path: Path) -> str:
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
        if line.strip():
            break
    return ""


def flatten(data: Any) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for section, options in (data or {}).items():
        if isinstance(options, dict):
            for key, value in options.items():
                values[f"{section}.{key}"] = value
    return values


def list_recipes(ws: Workspace) -> list[dict[str, Any]]:
    """{id, name, description, values} of each recipe; `id` is what a run request names."""
    ensure_toy_recipe(ws)
    found = [
        (f"workspace:{ws.relative(p)}", p) for p in sorted((ws.root / "recipes").glob("*.yaml"))
    ]
    if SHIPPED_DIR.is_dir():
        found += [(f"shipped:{p.name}", p) for p in sorted(SHIPPED_DIR.glob("*.yaml"))]
    recipes = []
    for recipe_id, path in found:
        try:
            values = flatten(load_yaml(path.read_text(encoding="utf-8"), str(path)))
        except (SdtuneError, OSError):
            continue  # a broken recipe is the CLI's to report, when someone runs it
        recipes.append(
            {"id": recipe_id, "name": path.stem, "description": _describe(path), "values": values}
        )
    return recipes


def recipe_argument(ws: Workspace, recipe_id: str | None) -> str | None:
    """The recipe as `sdtune train` names it (run from the workspace folder)."""
    if not recipe_id:
        return None
    kind, _, name = recipe_id.partition(":")
    if kind == "workspace":
        path = ws.resolve(name, must_exist=True)
        return ws.relative(path)
    if kind == "shipped" and "/" not in name and (SHIPPED_DIR / name).is_file():
        return str(SHIPPED_DIR / name)
    raise SdtuneError(f"no recipe {quote(recipe_id)}; pick one the recipe list shows")


def is_hub_id(ws: Workspace, value: str) -> bool:
    """`org/name` that names no file of the workspace: a model on the hub, not a path."""
    return bool(HUB_ID.match(value)) and not (ws.root / value).exists()


def check_paths(ws: Workspace, overrides: dict[str, str]) -> None:
    """Path options of a form stay inside the workspace (a hub id is not a path)."""
    if "output.dir" in overrides:
        raise SdtuneError("output.dir is chosen by the app (runs/<name>); give the run a name")
    for key in PATH_KEYS:
        value = overrides.get(key, "")
        if not value or (key == "model.path" and is_hub_id(ws, value)):
            continue
        ws.resolve(value)


def run_folder_for(ws: Workspace, name: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-")[:60] or "run"
    for n in range(1, 1000):
        folder = f"runs/{stem}" if n == 1 else f"runs/{stem}-{n}"
        if not (ws.root / folder).exists():
            return folder
    raise SdtuneError(f"no free run folder name for '{stem}'")


def train_argv(recipe: str | None, overrides: dict[str, str], folder: str) -> list[str]:
    items = [f"{k}={v}" for k, v in overrides.items()]
    return ["train", *([recipe] if recipe else []), *items, f"output.dir={folder}"]


def command_line(ws: Workspace, argv: list[str]) -> str:
    """The shell line that runs the same as the app: from the workspace folder."""
    return f"cd {shlex.quote(str(ws.root))} && sdtune {shlex.join(argv)}"
