"""The forms' declared options and their checks, as the CLI declares and checks them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdtune.runs.workspace import Workspace
from sdtune.ui.recipes import PATH_KEYS, is_hub_id


def config_form() -> list[dict[str, Any]]:
    from sdtune.config_form import config_form as declared

    return declared()


def config_messages(ws: Workspace, recipe: str | None, overrides: dict[str, str]) -> dict[str, str]:
    """{key: message} of every problem of a training form; paths are read from the workspace."""
    from sdtune.config_form import check_config_values

    here = dict(overrides)
    for key in PATH_KEYS:
        value = here.get(key)
        if (
            value
            and not Path(value).is_absolute()
            and not (key == "model.path" and is_hub_id(ws, value))
        ):
            here[key] = str(ws.root / value)
    if recipe and not Path(recipe).is_absolute():
        recipe = str(ws.root / recipe)
    return check_config_values(recipe, here)
