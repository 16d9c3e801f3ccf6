"""The training options as data for a form, and a check of a form's values that reports every
problem at once, with the messages `sdtune train` prints. No model is loaded, nothing written."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

from sdtune.config import iter_options, read_config, type_name
from sdtune.errors import SdtuneError


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _kind(tp: Any) -> str:
    """str, int, float, bool, list[str], or list (a list of tables such as data.sources)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    base = args[0] if args and typing.get_origin(tp) is not list else tp
    if typing.get_origin(base) is list:
        (item,) = typing.get_args(base)
        return "list" if dataclasses.is_dataclass(item) else f"list[{item.__name__}]"
    return base.__name__


def config_form() -> list[dict[str, Any]]:
    """One dict per training option, in declaration order: key, section, type, default, help,
    choices (a list or None), valid (interval text or None), nullable. JSON-serialisable;
    data.sources (a list of tables) is type "list" with its default []."""
    form = []
    for key, f, tp in iter_options():
        choices, valid = f.metadata.get("choices"), f.metadata.get("valid")
        form.append(
            {
                "key": key,
                "section": key.split(".")[0],
                "type": _kind(tp),
                "default": _default(f),
                "help": f.metadata["help"],
                "choices": list(choices) if choices else None,
                "valid": valid.text if valid else None,
                "nullable": type(None) in typing.get_args(tp),
            }
        )
    return form


def check_config_values(
    recipe: str | Path | None,
    overrides: dict[str, str],
    sections: typing.Iterable[str] | None = None,
) -> dict[str, str]:
    """Every problem of a recipe (optional) with `overrides` (section.key -> text), as
    {key: the one-line message `sdtune train` prints for it}; {} when all is fine.

    Unknown keys (with the closest key), values of the wrong type, declared ranges and the
    consistency checks are all reported, each once. Only the checks of `sections` apply (all
    when None), as for `load_config`. A recipe that cannot be read at all is {"recipe": ...}."""
    from sdtune.config_checks import find_config_problems

    problems: dict[str, str] = {}
    try:
        cfg = read_config(recipe, overrides, problems)
        found = find_config_problems(cfg, sections)
    except SdtuneError as exc:  # the recipe file itself, or an unknown section name
        return {**problems, "recipe": str(exc)}
    for key, message in found.items():
        problems.setdefault(key, message)
    return problems


def format_options() -> str:
    """The option table shown by `sdtune train --help`."""
    lines = []
    for key, f, tp in iter_options():
        choices, valid = f.metadata.get("choices"), f.metadata.get("valid")
        extra = f" [{'|'.join(choices)}]" if choices else (f" in {valid.text}" if valid else "")
        lines.append(f"  {key:<38} {type_name(tp):<14} default {_default(f)!r}{extra}")
        lines.append(f"      {f.metadata['help']}")
    return "\n".join(lines)
