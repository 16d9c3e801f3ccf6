"""Range and consistency checks of a loaded RunConfig: each failure names the key, what it
got and what would be right. Kept apart from sdtune.config, which declares the options."""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

from sdtune.config import SECTIONS, DataConfig, RunConfig, SourceConfig, iter_options
from sdtune.errors import SdtuneError, quote

# accelerate's set_seed seeds numpy too, which takes 0 <= seed < 2**32
MAX_SEED = 2**32 - 1

# What a training run must be given; a command that reads no images or loads no model names
# the sections it uses (validate_config's `sections`) and these are required only within them.
REQUIRED_KEYS = ("model.path", "data.dir", "output.dir")


def validate_config(
    cfg: RunConfig,
    sections: Iterable[str] | None = None,
    required: Iterable[str] | None = None,
) -> None:
    """Range checks that need no model: the first failure, naming the key and the valid range,
    is raised. Only the checks of `sections` apply (all when None); `required` names the keys
    that must be set (default: those of REQUIRED_KEYS in `sections`)."""
    problems = find_config_problems(cfg, sections, required)
    if problems:
        raise SdtuneError(next(iter(problems.values())))


def pick_sections(sections: Iterable[str] | None) -> tuple[str, ...]:
    """The named sections (all when None); an unknown name is an error listing the valid ones."""
    if sections is None:
        return tuple(SECTIONS)
    picked = tuple(sections)
    for name in picked:
        if name not in SECTIONS:
            raise SdtuneError(f"unknown config section {quote(name)}; valid: {', '.join(SECTIONS)}")
    return picked


def find_config_problems(
    cfg: RunConfig,
    sections: Iterable[str] | None = None,
    required: Iterable[str] | None = None,
) -> dict[str, str]:
    """Every problem of `cfg` as {key: the one-line message}, in the order validate_config
    reports them. A check runs only when every section it reads is among `sections`."""
    picked = pick_sections(sections)
    needed = [k for k in REQUIRED_KEYS if k.split(".")[0] in picked]
    needed = needed if required is None else list(required)
    problems: dict[str, str] = {}
    for key, reads, test in _checks(cfg, needed):
        if all(read.split(".")[0] in picked for read in reads):
            try:
                test()
            except SdtuneError as exc:
                problems.setdefault(key, str(exc))
    return problems


def _rule(ok: bool, key: str, rule: str, cfg: RunConfig) -> Callable[[], None]:
    def test() -> None:
        if not ok:
            raise SdtuneError(f"{key} {rule}; got {_current(cfg, key)!r}")

    return test


Check = tuple[str, tuple[str, ...], Callable[[], None]]  # (key, keys it reads, raises on failure)


def _checks(cfg: RunConfig, required: list[str]) -> list[Check]:
    """Every check of `cfg`, in the order they are reported. A key named in `required` is
    required whatever the sections; every other check reads the key it reports."""
    requirements = {
        "model.path": (cfg.model.path != "", "is required (a diffusers folder, hub id or file)"),
        "data.dir": (
            cfg.data.dir != "" or cfg.data.dataset != "" or bool(cfg.data.sources),
            "is required (a folder of images), or set data.dataset or data.sources",
        ),
        "output.dir": (cfg.output.dir != "", "is required"),
    }
    seeds = [
        (0 <= cfg.train.seed <= MAX_SEED, "train.seed", f"must be in [0, {MAX_SEED}]"),
        (
            0 <= cfg.output.sample_seed <= MAX_SEED,
            "output.sample_seed",
            f"must be in [0, {MAX_SEED}]",
        ),
    ]
    rules = [
        (
            not (cfg.data.sources and (cfg.data.dir or cfg.data.dataset)),
            "data.sources",
            "replaces data.dir and data.dataset; put each folder or dataset in the list",
        ),
        *_value_rules(cfg),
    ]
    found: list[Check] = [(key, (key,), test) for key, test in _range_checks(cfg)]
    found += [(key, (key,), _rule(ok, key, rule, cfg)) for ok, key, rule in seeds]
    found += [
        (key, (), _rule(ok, key, rule, cfg))
        for key, (ok, rule) in requirements.items()
        if key in required
    ]
    found += [(key, (key,), _rule(ok, key, rule, cfg)) for ok, key, rule in rules]
    found.append(("lora.unet_targets", ("lora.unet_targets",), partial(_check_unet, cfg)))
    found.append(
        (
            "lora.text_encoder_targets",
            ("lora.text_encoder_targets",),
            partial(_check_text_encoder, cfg),
        )
    )
    for i, source in enumerate(cfg.data.sources):
        where = f"data.sources[{i}]"
        found.append((where, ("data.sources",), partial(_validate_source, source, where)))
    found += [(key, (key,), test) for key, test in _caption_checks(cfg)]
    if cfg.data.dataset_streaming:
        found += [(k, ("data.dataset_streaming", k), t) for k, t in _streaming_checks(cfg.data)]
    return found


def _value_rules(cfg: RunConfig) -> list[tuple[bool, str, str]]:
    """(ok, key, rule) for the values that interval notation cannot say."""
    return [
        (
            cfg.data.resolution >= 8 and cfg.data.resolution % 8 == 0,
            "data.resolution",
            "must be a positive multiple of 8",
        ),
        (cfg.data.repeats >= 1, "data.repeats", "must be at least 1"),
        (cfg.data.image_column != "", "data.image_column", "must name a column"),
        (cfg.data.caption_column != "", "data.caption_column", "must name a column"),
        (cfg.data.keep_tags >= 0, "data.keep_tags", "must be 0 or more"),
        (cfg.data.tag_separator != "", "data.tag_separator", "must not be empty"),
        (
            cfg.data.max_token_length in (75, 150, 225),
            "data.max_token_length",
            "must be 75, 150 or 225 (1, 2 or 3 windows of 75 tokens)",
        ),
        (cfg.lora.rank >= 1, "lora.rank", "must be at least 1"),
        (
            cfg.lora.text_encoder_rank is None or cfg.lora.text_encoder_rank >= 1,
            "lora.text_encoder_rank",
            "must be at least 1",
        ),
        (
            cfg.lora.text_encoder_2_rank is None or cfg.lora.text_encoder_2_rank >= 1,
            "lora.text_encoder_2_rank",
            "must be at least 1",
        ),
        (cfg.train.max_steps >= 1, "train.max_steps", "must be at least 1"),
        (cfg.train.batch_size >= 1, "train.batch_size", "must be at least 1"),
        (
            cfg.train.gradient_accumulation_steps >= 1,
            "train.gradient_accumulation_steps",
            "must be at least 1",
        ),
        (cfg.train.warmup_steps >= 0, "train.warmup_steps", "must be 0 or more"),
        (cfg.train.num_workers >= 0, "train.num_workers", "must be 0 or more"),
        (cfg.train.log_every_n_steps >= 1, "train.log_every_n_steps", "must be at least 1"),
        (
            cfg.train.checkpoint_every_n_steps >= 0,
            "train.checkpoint_every_n_steps",
            "must be 0 or more",
        ),
        (cfg.train.keep_checkpoints >= 0, "train.keep_checkpoints", "must be 0 or more"),
        (cfg.train.lr_cycles >= 1, "train.lr_cycles", "must be at least 1"),
        (
            not cfg.data.class_dir or cfg.data.class_prompt != "",
            "data.class_prompt",
            "is required with data.class_dir (the caption of the class images)",
        ),
        (cfg.data.num_class_images >= 0, "data.num_class_images", "must be 0 or more"),
        (
            cfg.data.bucket_step >= 8 and cfg.data.bucket_step % 8 == 0,
            "data.bucket_step",
            "must be a positive multiple of 8",
        ),
        (
            not cfg.data.bucketing or cfg.data.bucket_step <= cfg.data.resolution,
            "data.bucket_step",
            f"must be at most data.resolution ({cfg.data.resolution}) with data.bucketing=true, "
            "or no bucket fits",
        ),
        (
            cfg.output.validation_every_n_steps >= 0,
            "output.validation_every_n_steps",
            "must be 0 or more",
        ),
        (cfg.output.sample_every_n_steps >= 0, "output.sample_every_n_steps", "must be 0 or more"),
        (cfg.output.sample_steps >= 1, "output.sample_steps", "must be at least 1"),
        (cfg.data.shuffle_buffer >= 1, "data.shuffle_buffer", "must be at least 1"),
    ]


def _check_unet(cfg: RunConfig) -> None:
    """Target specs that cannot match anything (empty, a broken regex) fail before loading;
    names that no module has are found once the model is there."""
    from sdtune.adapters.lora import resolve_unet_targets

    resolve_unet_targets(cfg.lora.unet_targets)


def _check_text_encoder(cfg: RunConfig) -> None:
    from sdtune.adapters.lora import resolve_text_encoder_targets

    if cfg.lora.train_text_encoder or cfg.lora.train_text_encoder_2:
        resolve_text_encoder_targets(cfg.lora.text_encoder_targets)


def check_declared_ranges(cfg: RunConfig) -> None:
    """Every number option's own range (declared once, with `option(valid=...)`), for the
    sections and for each of `data.sources`; NaN and infinities are never in range."""
    for _, test in _range_checks(cfg):
        test()


def _range_checks(cfg: RunConfig) -> list[tuple[str, Callable[[], None]]]:
    """(key, check) of each declared range, the sources' keys under data.sources[i]."""
    checks = []
    for key, f, _ in iter_options():
        section, name = key.split(".")
        checks.append((key, partial(_check_range, key, f, getattr(getattr(cfg, section), name))))
    fields = {f.name: f for f in dataclasses.fields(SourceConfig)}
    for i, source in enumerate(cfg.data.sources):
        for name, f in fields.items():
            where = f"data.sources[{i}].{name}"
            checks.append((where, partial(_check_range, where, f, getattr(source, name))))
    return checks


def _check_range(key: str, f: dataclasses.Field, value: Any) -> None:
    valid = f.metadata.get("valid")
    if valid is not None and value is not None and not valid.contains(value):
        raise SdtuneError(f"{key} {valid.rule()}; got {value!r}")


def _streaming_checks(d: DataConfig) -> list[tuple[str, Callable[[], None]]]:
    """What a stream cannot do: it has no list of images to sort into buckets, hold out, pair
    with class images, cache in a first pass or repeat within an epoch."""
    refused = [
        (not d.dataset or d.sources, "data.dataset", "set (one dataset, not data.sources)"),
        (d.bucketing, "data.bucketing", "false (streamed images get square crops)"),
        (d.validation_split > 0, "data.validation_split", "0 (hold out a separate split)"),
        (d.class_dir, "data.class_dir", "empty (no prior preservation)"),
        (d.cache_latents, "data.cache_latents", "false (a stream is not pre-encoded)"),
        (
            d.cache_text_embeddings,
            "data.cache_text_embeddings",
            "false (a stream is not pre-encoded)",
        ),
        (d.repeats != 1, "data.repeats", "1 (an epoch is one pass over the stream)"),
    ]
    return [(key, partial(_refuse_streaming, bad, key, right, d)) for bad, key, right in refused]


def _refuse_streaming(bad: Any, key: str, right: str, d: DataConfig) -> None:
    if bad:
        raise SdtuneError(
            f"data.dataset_streaming=true needs {key} {right}; got {_current_data(d, key)!r}"
        )


def _current_data(d: DataConfig, key: str) -> Any:
    return getattr(d, key.split(".")[1])


def _validate_source(source: SourceConfig, where: str) -> None:
    """The data.* range rules, for the keys a source sets itself (the rest were checked above)."""
    if bool(source.dir) == bool(source.dataset):
        raise SdtuneError(
            f"{where} needs exactly one of dir or dataset; "
            f"got dir={source.dir!r}, dataset={source.dataset!r}"
        )
    checks = [
        ("repeats", lambda v: v >= 1, "must be at least 1"),
        ("keep_tags", lambda v: v >= 0, "must be 0 or more"),
        ("tag_separator", lambda v: v != "", "must not be empty"),
        ("image_column", lambda v: v != "", "must name a column"),
        ("caption_column", lambda v: v != "", "must name a column"),
    ]
    for name, ok, rule in checks:
        value = getattr(source, name)
        if value is not None and not ok(value):
            raise SdtuneError(f"{where}.{name} {rule}; got {value!r}")


def _current(cfg: RunConfig, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


CAPTION_FIELDS = ("trigger", "name")  # what data.caption_template can fill in


def check_caption_options(cfg: RunConfig) -> None:
    """A caption extension that is not an image's, and templates with only known fields."""
    for _, test in _caption_checks(cfg):
        test()


def _caption_checks(cfg: RunConfig) -> list[tuple[str, Callable[[], None]]]:
    tables = [("data", cfg.data)] + [
        (f"data.sources[{i}]", s) for i, s in enumerate(cfg.data.sources)
    ]
    checks = []
    for where, table in tables:
        if table.caption_ext is not None:
            key = f"{where}.caption_ext"
            checks.append((key, partial(check_caption_ext, table.caption_ext, key)))
        if table.caption_template is not None:
            key = f"{where}.caption_template"
            checks.append((key, partial(check_caption_template, table.caption_template, key)))
    return checks


def check_caption_ext(ext: str, key: str) -> None:
    from sdtune.data.images import IMAGE_EXTENSIONS

    if not ext.startswith(".") or len(ext) < 2:
        raise SdtuneError(f"{key} must be an extension such as .txt; got {quote(ext)}")
    if ext.lower() in IMAGE_EXTENSIONS:
        raise SdtuneError(
            f"{key} is {quote(ext)}, an image extension: each image would be read as its own "
            "caption; use the captions' extension, such as .txt or .caption"
        )


def check_caption_template(template: str, key: str) -> None:
    """Only `{trigger}` and `{name}` (with an optional format spec) may appear."""
    known = " and ".join(f"{{{f}}}" for f in CAPTION_FIELDS)
    try:
        fields = [
            (name, conversion, spec)
            for _, name, spec, conversion in string.Formatter().parse(template)
            if name is not None
        ]
    except ValueError as exc:
        raise SdtuneError(
            f"{key} {quote(template)} is not a valid template ({exc}); only {known} are "
            "filled in, write {{ and }} for literal braces"
        ) from None
    for name, conversion, spec in fields:
        if name not in CAPTION_FIELDS or conversion or "{" in (spec or ""):
            shown = "{" + name + (f"!{conversion}" if conversion else "") + "}"
            raise SdtuneError(
                f"{key} {quote(template)} uses {quote(shown)[1:-1]}; only {known} are "
                "filled in, write {{ and }} for literal braces"
            )
