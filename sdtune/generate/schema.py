"""The generation options as data: declared once, read by the CLI, a form and their checks.

The options are the fields of `GenerationRequest` (what to draw), `GenerationJob` (the model,
adapters and output folder) and `SpeedOptions` (how the model runs), each declared in
sdtune.generate.request with `sdtune.config.option` (default, help, valid range, section). From these declarations come
`sdtune generate`'s flags and help, the range checks, the form of the web app
(`generation_form`), the check of a form's values (`check_generation_values`) and the command
line for them (`generation_argv`). Nothing here imports torch or loads a model.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdtune.errors import SdtuneError, quote
from sdtune.generate.modes import check_mode_fits, get_mode
from sdtune.generate.request import DTYPE_NAMES, GenerationJob, GenerationRequest, SpeedOptions
from sdtune.models.families import FAMILIES

SECTIONS = ("prompt", "mode", "sampling", "sdxl", "model", "adapters", "output", "speed")


@dataclass(frozen=True)
class GenerationOption:
    """One declared option: where it lives (request, job or speed) and how it is spelled."""

    name: str
    owner: str
    field: dataclasses.Field
    hint: Any

    @property
    def meta(self) -> typing.Mapping[str, Any]:
        return self.field.metadata

    @property
    def flag(self) -> str:
        return self.meta.get("flag") or "--" + self.name.replace("_", "-")

    @property
    def default(self) -> Any:
        f = self.field
        return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default

    @property
    def nullable(self) -> bool:
        return type(None) in typing.get_args(self.hint)

    @property
    def kind(self) -> str:
        """str, int, float, bool, path, list[int], list[float] or lora (FILE[:WEIGHT] list)."""
        hint = self.hint
        if typing.get_origin(hint) is list:
            (item,) = typing.get_args(hint)
            return "lora" if typing.get_origin(item) is tuple else f"list[{item.__name__}]"
        args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        if Path in args:
            return "path"
        return args[0].__name__


@functools.cache
def generation_options() -> tuple[GenerationOption, ...]:
    """Every generation option, by section (SECTIONS), in declaration order within each."""
    found = []
    for owner, cls in (
        ("request", GenerationRequest),
        ("job", GenerationJob),
        ("speed", SpeedOptions),
    ):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if "help" in f.metadata:
                found.append(GenerationOption(f.name, owner, f, hints[f.name]))
    return tuple(sorted(found, key=lambda o: SECTIONS.index(o.meta["section"])))


def _options_by_name() -> dict[str, GenerationOption]:
    return {o.name: o for o in generation_options()}


# ---- values: from text or typed, checked --------------------------------------------------


def parse_lora(spec: str) -> tuple[str, float]:
    """`path` or `path:weight` (a Windows drive letter is not mistaken for a weight). A weight
    that is not a finite number (nan, inf) is refused: it would only draw a black image."""
    path, sep, weight = spec.rpartition(":")
    if sep and path:
        try:
            value = float(weight)
        except ValueError:
            return spec, 1.0
        if not math.isfinite(value):
            raise SdtuneError(
                f"--lora {quote(spec)}: the weight must be a finite number, e.g. {path}:0.8"
            )
        return path, value
    return spec, 1.0


def parse_numbers(text: str | None, kind: type, flag: str) -> list:
    """A comma-separated list of finite numbers, or a one-line error naming the flag."""
    if not text:
        return []
    example = "1,7,42" if kind is int else "0.25,0.5"
    parts = text.split(",")
    try:
        values = [kind(part) for part in parts if part.strip()]
    except ValueError:
        values = None
    if values is None or len(values) != len(parts) or not all(math.isfinite(v) for v in values):
        raise SdtuneError(
            f"{flag} takes comma-separated finite numbers, e.g. {example}; got {quote(text)}"
        )
    return values


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _coerce_scalar(opt: GenerationOption, kind: str, value: Any) -> Any:
    flag = opt.flag
    if kind == "bool":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
        raise SdtuneError(f"{flag} must be true or false, got {quote(value)}")
    if kind in ("int", "float"):
        number = int if kind == "int" else float
        try:
            if isinstance(value, bool) or (kind == "int" and isinstance(value, float)):
                raise ValueError
            return number(value.strip() if isinstance(value, str) else value)
        except (TypeError, ValueError):
            what = "an integer" if kind == "int" else "a number"
            raise SdtuneError(f"{flag} must be {what}, got {quote(value)}") from None
    if kind == "path" and not isinstance(value, str):
        return value  # an image or array already in memory
    if isinstance(value, (dict, list, tuple)):
        raise SdtuneError(f"{flag} must be text, got {quote(value)}")
    return str(value)


def _coerce_lora(opt: GenerationOption, value: Any) -> list[tuple[str, float]]:
    items = (
        [line for line in value.splitlines() if line.strip()] if isinstance(value, str) else value
    )
    adapters = []
    for item in items:
        if isinstance(item, str):
            adapters.append(parse_lora(item.strip()))
            continue
        path, weight = item
        weight = _coerce_scalar(opt, "float", weight)
        if not math.isfinite(weight):
            raise SdtuneError(
                f"--lora '{path}:{weight}': the weight must be a finite number, e.g. {path}:0.8"
            )
        adapters.append((str(path), weight))
    return adapters


def coerce_value(opt: GenerationOption, value: Any) -> Any:
    """`value` (form text or a typed value) as the option's type; None, and "" for anything but
    text, mean the default. A bad value is a one-line error naming the flag."""
    kind = opt.kind
    if value is None or (value == "" and (kind != "str" or opt.nullable)):
        return opt.default
    if kind == "lora":
        return _coerce_lora(opt, value)
    if kind.startswith("list["):
        number = int if kind == "list[int]" else float
        if isinstance(value, str):
            return parse_numbers(value.strip(), number, opt.flag)
        items = [_coerce_scalar(opt, number.__name__, v) for v in value]
        if not all(math.isfinite(v) for v in items):
            text = ",".join(map(str, items))
            return parse_numbers(text, number, opt.flag)  # raises, with the command's message
        return items
    if opt.nullable and isinstance(value, str) and value.strip().lower() in ("none", "null"):
        return None
    return _coerce_scalar(opt, kind, value)


def _join(values: tuple) -> str:
    words = [str(v) for v in values]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def check_value(opt: GenerationOption, value: Any) -> str | None:
    """The problem with a typed value of `opt`, as the one-line message the command prints."""
    if value is None:
        return None
    choices, valid, check = opt.meta.get("choices"), opt.meta.get("valid"), opt.meta.get("check")
    # Text choices with a check of their own (scheduler aliases, modes) are left to the check.
    if choices and (opt.kind == "int" or check is None) and value not in choices:
        return f"{opt.flag} must be {_join(choices)}, got {value}"
    if valid is not None:
        label = opt.meta.get("label") or opt.flag
        for item in value if isinstance(value, list) else [value]:
            if not valid.contains(item):
                return f"{label} {valid.rule(integer=opt.kind.endswith('int'))}, got {item}"
    if check is not None:
        try:
            check(value, opt.flag)
        except SdtuneError as exc:
            return str(exc)
    return None


def _cross_problems(typed: dict[str, Any]) -> dict[str, str]:
    """Checks of several options together: a mode's required inputs, the mode on the family,
    a refiner on the family and mode."""
    problems = _refiner_problems(typed)
    mode = typed.get("mode")
    if mode is None:
        return problems
    try:
        spec = get_mode(mode)
    except SdtuneError:
        return problems  # reported for the mode itself
    for name in spec.required:
        if typed.get(name) is None:
            problems.setdefault("mode", f"mode '{spec.name}' needs --{name.replace('_', '-')}")
    if typed.get("family") in FAMILIES:
        try:
            check_mode_fits(spec, typed["family"])
        except SdtuneError as exc:
            problems.setdefault("mode", str(exc))
    return problems


def _refiner_problems(typed: dict[str, Any]) -> dict[str, str]:
    """A refiner needs an SDXL base (when the family is given) and a mode with two stages."""
    from sdtune.generate.refiner import check_refiner_families, check_refiner_mode

    if not typed.get("refiner"):
        return {}
    try:
        check_refiner_mode(typed.get("mode"))
        if typed.get("family") in FAMILIES:
            check_refiner_families(typed["family"], None)
    except SdtuneError as exc:
        return {"refiner": str(exc)}
    return {}


def _typed_values(
    values: dict[str, Any], check: bool = True
) -> tuple[dict[str, Any], dict[str, str]]:
    """(every option's typed value, the problems found) for form `values` keyed by name;
    without `check`, only the values that cannot be read (unknown names, wrong types)."""
    options = _options_by_name()
    problems = {}
    for name in values:
        if name not in options:
            match = difflib.get_close_matches(str(name), list(options), n=1, cutoff=0.5)
            hint = f"; did you mean '{match[0]}'?" if match else ""
            problems[name] = f"unknown generation option {quote(name)}{hint}"
    typed = {}
    for name, opt in options.items():
        try:
            typed[name] = coerce_value(opt, values.get(name))
        except SdtuneError as exc:
            problems[name] = str(exc)
            typed[name] = opt.default
            continue
        message = check_value(opt, typed[name]) if check else None
        if message:
            problems[name] = message
    for name, message in _cross_problems(typed).items() if check else ():
        problems.setdefault(name, message)
    return typed, problems


def check_generation_values(values: dict[str, Any]) -> dict[str, str]:
    """Every problem of a form's `values` (keyed by option name, text or typed), as
    {name: the one-line message `sdtune generate` prints}; {} when all are fine."""
    return _typed_values(values)[1]


def read_generation_values(values: dict[str, Any]) -> dict[str, Any]:
    """Every option's typed value for `values` (keyed by name, text or typed; missing ones get
    their defaults). A value that cannot be read raises the command's one-line error; ranges
    and files are not checked here (see check_generation_values)."""
    typed, problems = _typed_values(values, check=False)
    if problems:
        raise SdtuneError(next(iter(problems.values())))
    return typed


def check_request(req: GenerationRequest) -> dict[str, str]:
    """The problems of a request's own options ({} when fine), as check_generation_values."""
    problems = {}
    for opt in generation_options():
        if opt.owner == "request":
            message = check_value(opt, getattr(req, opt.name))
            if message:
                problems[opt.name] = message
    return problems


def build_generation_job(values: dict[str, Any]) -> GenerationJob:
    """The job for `values` (keyed by option name, text or typed); the first problem found is
    raised as the command's one-line error, before any model loads."""
    typed, problems = _typed_values(values)
    if problems:
        raise SdtuneError(next(iter(problems.values())))
    owned: dict[str, dict[str, Any]] = {"request": {}, "job": {}, "speed": {}}
    for opt in generation_options():
        owned[opt.owner][opt.name] = typed[opt.name]
    return GenerationJob(
        request=GenerationRequest(**owned["request"]),
        speed=SpeedOptions(**owned["speed"]),
        **owned["job"],
    )


def generation_values(job: GenerationJob) -> dict[str, Any]:
    """Every option's value in `job`, keyed by name (the inverse of build_generation_job)."""
    holders = {"request": job.request, "job": job, "speed": job.speed}
    return {o.name: getattr(holders[o.owner], o.name) for o in generation_options()}


# ---- the command line and the form ---------------------------------------------------------


def _help_text(opt: GenerationOption) -> str:
    """The help line with the option's choices or range and its default, as `sdtune train
    --help` shows them."""
    choices, valid, default = opt.meta.get("choices"), opt.meta.get("valid"), opt.default
    notes = [f"one of {', '.join(map(str, choices))}"] if choices else []
    if valid is not None:
        notes.append("a finite number" if valid.low == -math.inf else f"in {valid.text}")
    if "default" not in opt.meta["help"] and default not in (None, [], False, ""):
        notes.append(f"default {default!r}")
    text = opt.meta["help"] + (f" ({'; '.join(notes)})" if notes else "")
    return text.replace("%", "%%")


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    """`sdtune generate`'s flags, one per option, grouped by section. Values arrive as text
    and are coerced and checked by build_generation_job; a flag not given is absent from the
    parsed namespace (its default is the declaration's)."""
    groups = {s: parser.add_argument_group(f"{s} options") for s in SECTIONS}
    for opt in generation_options():
        kwargs: dict[str, Any] = {"dest": opt.name, "default": argparse.SUPPRESS}
        kwargs["help"] = _help_text(opt)
        if opt.kind == "bool" and opt.nullable:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif opt.kind == "bool":
            kwargs["action"] = "store_true"
        elif opt.kind == "lora":
            kwargs.update(action="append", metavar=opt.meta.get("metavar"))
        elif opt.meta.get("metavar"):
            kwargs["metavar"] = opt.meta["metavar"]
        groups[opt.meta["section"]].add_argument(opt.flag, **kwargs)


def values_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The options given on the command line, keyed by name (as parsed, not yet coerced)."""
    return {o.name: getattr(args, o.name) for o in generation_options() if hasattr(args, o.name)}


def _argv_text(opt: GenerationOption, value: Any) -> list[str]:
    if opt.kind == "bool":
        if opt.nullable and value is False:
            return ["--no-" + opt.flag.removeprefix("--")]
        return [opt.flag]
    if opt.kind == "lora":
        specs = [f"{path}:{weight!r}" for path, weight in value]
        return [t for spec in specs for t in _flag_and_text(opt.flag, spec)]
    if isinstance(value, list):
        text = ",".join(map(repr, value))
    elif not isinstance(value, (str, int, float)):
        raise SdtuneError(f"{opt.flag} holds {type(value).__name__}, not a value a command takes")
    else:
        text = repr(value) if isinstance(value, float) else str(value)
    return _flag_and_text(opt.flag, text)


def _flag_and_text(flag: str, text: str) -> list[str]:
    """`--flag text`, or `--flag=text` where the text would read as a flag (-1, -x)."""
    return [f"{flag}={text}"] if text.startswith("-") else [flag, text]


def generation_argv(values: dict[str, Any]) -> list[str]:
    """The `sdtune generate` arguments for `values` (keyed by option name), only those that
    differ from the defaults; parsing them gives back the same values. A value that cannot be
    read raises the command's one-line error (ranges and files are check_generation_values')."""
    typed = read_generation_values(values)
    argv = []
    for opt in generation_options():
        value = typed[opt.name]
        if value != opt.default:
            argv.extend(_argv_text(opt, value))
    return argv


def _json_default(value: Any) -> Any:
    return (
        [list(v) if isinstance(v, tuple) else v for v in value]
        if isinstance(value, list)
        else value
    )


def generation_form() -> list[dict[str, Any]]:
    """One dict per option, in sections, for a form: name, flag, section, type, default, help,
    choices (a list or None), valid (interval text or None), nullable. JSON-serialisable."""
    form = []
    for opt in generation_options():
        choices, valid = opt.meta.get("choices"), opt.meta.get("valid")
        form.append(
            {
                "name": opt.name,
                "flag": opt.flag,
                "section": opt.meta["section"],
                "type": opt.kind,
                "default": _json_default(opt.default),
                "help": opt.meta["help"],
                "choices": list(choices) if choices else None,
                "valid": valid.text if valid else None,
                "nullable": opt.nullable,
            }
        )
    return form


__all__ = [
    "DTYPE_NAMES",
    "GenerationJob",
    "SpeedOptions",
    "add_generation_arguments",
    "build_generation_job",
    "check_generation_values",
    "generation_argv",
    "generation_form",
    "generation_values",
    "read_generation_values",
    "values_from_args",
]
