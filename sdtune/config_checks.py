"""Range and consistency checks of a loaded RunConfig: each failure names the key, what it
got and what would be right. Kept apart from sdtune.config, which declares the options."""

from __future__ import annotations

import dataclasses
import string
from typing import Any

from sdtune.config import DataConfig, RunConfig, SourceConfig, iter_options
from sdtune.errors import SdtuneError, quote

# accelerate's set_seed seeds numpy too, which takes 0 <= seed < 2**32
MAX_SEED = 2**32 - 1


def validate_config(cfg: RunConfig) -> None:
    """Range checks that need no model: each failure names the key and the valid range."""
    check_declared_ranges(cfg)
    checks = [
        (0 <= cfg.train.seed <= MAX_SEED, "train.seed", f"must be in [0, {MAX_SEED}]"),
        (
            0 <= cfg.output.sample_seed <= MAX_SEED,
            "output.sample_seed",
            f"must be in [0, {MAX_SEED}]",
        ),
        (cfg.model.path != "", "model.path", "is required (a diffusers folder, hub id or file)"),
        (
            cfg.data.dir != "" or cfg.data.dataset != "" or bool(cfg.data.sources),
            "data.dir",
            "is required (a folder of images), or set data.dataset or data.sources",
        ),
        (
            not (cfg.data.sources and (cfg.data.dir or cfg.data.dataset)),
            "data.sources",
            "replaces data.dir and data.dataset; put each folder or dataset in the list",
        ),
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
            cfg.output.validation_every_n_steps >= 0,
            "output.validation_every_n_steps",
            "must be 0 or more",
        ),
        (cfg.output.sample_every_n_steps >= 0, "output.sample_every_n_steps", "must be 0 or more"),
        (cfg.output.dir != "", "output.dir", "is required"),
        (cfg.output.sample_steps >= 1, "output.sample_steps", "must be at least 1"),
    ]
    for ok, key, rule in checks:
        if not ok:
            raise SdtuneError(f"{key} {rule}; got {_current(cfg, key)!r}")
    _check_lora_targets(cfg)
    for i, source in enumerate(cfg.data.sources):
        _validate_source(source, f"data.sources[{i}]")
    check_caption_options(cfg)
    if cfg.data.shuffle_buffer < 1:
        raise SdtuneError(
            f"data.shuffle_buffer must be at least 1; got {cfg.data.shuffle_buffer!r}"
        )
    if cfg.data.dataset_streaming:
        _validate_streaming(cfg.data)


def _check_lora_targets(cfg: RunConfig) -> None:
    """Target specs that cannot match anything (empty, a broken regex) fail before loading;
    names that no module has are found once the model is there."""
    from sdtune.adapters.lora import resolve_text_encoder_targets, resolve_unet_targets

    resolve_unet_targets(cfg.lora.unet_targets)
    if cfg.lora.train_text_encoder:
        resolve_text_encoder_targets(cfg.lora.text_encoder_targets)


def check_declared_ranges(cfg: RunConfig) -> None:
    """Every number option's own range (declared once, with `option(valid=...)`), for the
    sections and for each of `data.sources`; NaN and infinities are never in range."""
    for key, f, _ in iter_options():
        section, name = key.split(".")
        _check_range(key, f, getattr(getattr(cfg, section), name))
    fields = {f.name: f for f in dataclasses.fields(SourceConfig)}
    for i, source in enumerate(cfg.data.sources):
        for name, f in fields.items():
            _check_range(f"data.sources[{i}].{name}", f, getattr(source, name))


def _check_range(key: str, f: dataclasses.Field, value: Any) -> None:
    valid = f.metadata.get("valid")
    if valid is not None and value is not None and not valid.contains(value):
        raise SdtuneError(f"{key} {valid.rule()}; got {value!r}")


def _validate_streaming(d: DataConfig) -> None:
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
    for bad, key, right in refused:
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
    tables = [("data", cfg.data)] + [
        (f"data.sources[{i}]", s) for i, s in enumerate(cfg.data.sources)
    ]
    for where, table in tables:
        if table.caption_ext is not None:
            check_caption_ext(table.caption_ext, f"{where}.caption_ext")
        if table.caption_template is not None:
            check_caption_template(table.caption_template, f"{where}.caption_template")


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
