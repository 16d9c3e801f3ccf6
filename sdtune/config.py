"""The typed run configuration: every option declared once, with its default and one line of help.

A recipe is a YAML file with one mapping per section (`model`, `data`, `lora`, `train`, `output`).
Command-line overrides are `section.key=value`. Both go through one strict path: an unknown key is an
error that names it and suggests the closest valid key, a value of the wrong type is an error that
names the key and the expected type, and range checks run before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sdtune.config_range import Range
from sdtune.errors import SdtuneError, quote


def option(
    default: Any,
    help: str,
    choices: tuple[Any, ...] | None = None,
    valid: str | None = None,
    **extra: Any,
) -> Any:
    """Declare one option: its default, its help line, (for strings) its allowed values and
    (for numbers) its valid range in interval notation, checked by sdtune.config_checks.

    `extra` is further metadata read by the code that turns declarations into command-line
    flags and forms (sdtune.generate.schema: section, flag, metavar, label, check)."""
    metadata = {"help": help, "choices": choices, "valid": Range.parse(valid) if valid else None}
    metadata.update({k: v for k, v in extra.items() if v is not None})
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class ModelConfig:
    path: str = option(
        "", "base model: a diffusers folder, a hub id, or one .safetensors/.ckpt file"
    )
    family: str | None = option(None, "model family (sd1, sd2-base, sd2-v, ...); detected if unset")
    config_dir: str | None = option(
        None, "diffusers config folder for a single-file checkpoint of a non-standard architecture"
    )


@dataclass
class SourceConfig:
    """One entry of `data.sources`: where the images are and how they are captioned and weighted.

    Every key but `dir`/`dataset` falls back to the `data.*` option of the same name when unset
    (None), so a source only states what makes it different.
    """

    dir: str | None = option(None, "folder of images (or set dataset)")
    dataset: str | None = option(None, "a Hugging Face dataset (or set dir)")
    dataset_split: str | None = option(None, "split of the dataset")
    image_column: str | None = option(None, "column naming or holding the image")
    caption_column: str | None = option(None, "column holding the caption")
    caption_ext: str | None = option(None, "extension of caption sidecar files")
    recursive: bool | None = option(None, "also read images in sub-folders")
    allow_outside_paths: bool | None = option(None, "let metadata name images outside dir")
    repeats: int | None = option(None, "times each image of this source is seen per epoch")
    trigger: str | None = option(None, "trigger word of this source's captions")
    caption_template: str | None = option(None, "caption of images without one")
    shuffle_tags: bool | None = option(None, "shuffle tags each epoch")
    keep_tags: int | None = option(None, "leading tags never shuffled or dropped")
    tag_separator: str | None = option(None, "what separates tags")
    tag_dropout: float | None = option(
        None, "chance of dropping each tag per epoch", valid="[0, 1]"
    )
    caption_dropout: float | None = option(
        None, "chance of an empty caption per item and epoch", valid="[0, 1]"
    )


@dataclass
class DataConfig:
    dir: str = option("", "folder of images, with a caption file beside each image")
    caption_ext: str = option(".txt", "extension of caption sidecar files")
    recursive: bool = option(True, "also read images in sub-folders")
    trigger: str = option("", "trigger word, put at the front of every caption that lacks it")
    caption_template: str = option(
        "{trigger}", "caption for images without a sidecar; {trigger} and {name} are filled in"
    )
    resolution: int = option(512, "training size in pixels (square); a multiple of 8")
    center_crop: bool = option(True, "crop the centre (true) or a random square (false)")
    random_flip: bool = option(False, "flip images left-right at random")
    bucketing: bool = option(
        False, "aspect-ratio buckets of about resolution² pixels instead of square crops"
    )
    bucket_step: int = option(64, "bucket sides are multiples of this many pixels")
    max_aspect: float = option(
        3.0, "most elongated bucket (long side / short side)", valid="[1, inf)"
    )
    upscale: bool = option(False, "blow small images up to their bucket (else smaller bucket)")
    pad: bool = option(False, "fit whole images into buckets and pad, instead of cropping")
    repeats: int = option(1, "times each image is seen per epoch")
    image_column: str = option("file_name", "metadata.jsonl/csv column naming the image file")
    caption_column: str = option("text", "metadata.jsonl/csv column holding the caption")
    allow_outside_paths: bool = option(
        False, "let metadata name images outside data.dir (../x.png or absolute paths)"
    )
    dataset: str = option(
        "", "a Hugging Face dataset (save_to_disk folder or cached name), used instead of dir"
    )
    dataset_split: str = option("train", "split of data.dataset to train on")
    dataset_streaming: bool = option(
        False, "stream data.dataset (hub name, files or folder) instead of scanning it first"
    )
    shuffle_buffer: int = option(1000, "rows in the seeded shuffle buffer of a streamed dataset")
    shuffle_tags: bool = option(False, "shuffle the caption's tags each epoch (after keep_tags)")
    keep_tags: int = option(0, "leading tags never shuffled or dropped (1 keeps the trigger)")
    tag_separator: str = option(",", "what separates tags in a caption")
    tag_dropout: float = option(
        0.0, "chance of dropping each tag after keep_tags, per epoch", valid="[0, 1]"
    )
    caption_dropout: float = option(
        0.0,
        "chance of an empty caption per item and epoch (trains the unconditional case)",
        valid="[0, 1]",
    )
    cache_latents: bool = option(
        False, "encode each image once and keep its VAE encoding on disk (keyed on its pixels)"
    )
    cache_dir: str = option(
        "", "latent cache folder, text embeddings in its text/ (default ~/.cache/sdtune/latents)"
    )
    cache_text_embeddings: bool = option(
        False, "keep each caption's text-encoder output on disk (off while the encoder trains)"
    )
    max_token_length: int = option(
        75, "caption tokens the text encoder sees: 75 (longer ones cut), or 150/225 in windows"
    )
    validation_split: float = option(
        0.0,
        "share of the images held out for a validation loss (seeded); 0 uses them all",
        valid="[0, 1)",
    )
    class_dir: str = option(
        "", "DreamBooth class images for prior preservation (missing ones are generated)"
    )
    class_prompt: str = option("", "caption of every class image, e.g. 'a photo of a dog'")
    num_class_images: int = option(100, "class images wanted; the base model draws the missing")
    sources: list[SourceConfig] = option(
        [],
        "several sources in one run: a list of tables, each with dir or dataset and its own "
        "repeats, trigger, caption and column keys (unset keys fall back to data.*)",
    )


@dataclass
class LoraConfig:
    rank: int = option(16, "LoRA rank (the width of the low-rank update)")
    alpha: float = option(
        16.0, "LoRA alpha; the update is scaled by alpha / rank", valid="(0, inf)"
    )
    dropout: float = option(0.0, "dropout on the LoRA branch", valid="[0, 1)")
    unet_targets: str = option(
        "attn",
        "U-Net modules: a preset (attn, cross-attn, attn-ff, locon), re:<regex>, or names a,b,c",
    )
    train_text_encoder: bool = option(
        False, "also train a LoRA on the text encoder (SDXL: the first, CLIP ViT-L)"
    )
    text_encoder_targets: str = option(
        "attn", "text-encoder modules: a preset (attn, attn-mlp), re:<regex>, or names a,b,c"
    )
    text_encoder_rank: int | None = option(None, "rank of the text-encoder LoRA; defaults to rank")
    text_encoder_alpha: float | None = option(
        None, "alpha of the text-encoder LoRA; defaults to alpha", valid="(0, inf)"
    )
    train_text_encoder_2: bool = option(
        False, "SDXL: also train a LoRA on the second text encoder (OpenCLIP ViT-bigG)"
    )
    text_encoder_2_rank: int | None = option(
        None, "rank of the second text encoder's LoRA; defaults to text_encoder_rank"
    )
    text_encoder_2_alpha: float | None = option(
        None,
        "alpha of the second text encoder's LoRA; defaults to text_encoder_alpha",
        valid="(0, inf)",
    )
    use_dora: bool = option(False, "weight-decomposed LoRA (DoRA, Liu et al. 2024)")
    init: str = option(
        "gaussian", "initialisation of the A matrix (B starts at zero)", ("gaussian", "kaiming")
    )


@dataclass
class TrainConfig:
    max_steps: int = option(500, "optimizer steps to train for")
    batch_size: int = option(1, "images per micro-batch on each process")
    gradient_accumulation_steps: int = option(1, "micro-batches summed before each optimizer step")
    learning_rate: float = option(1e-4, "learning rate of the U-Net LoRA", valid="(0, inf)")
    text_encoder_learning_rate: float | None = option(
        None, "learning rate of the text-encoder LoRA; defaults to learning_rate", valid="(0, inf)"
    )
    text_encoder_2_learning_rate: float | None = option(
        None,
        "SDXL: learning rate of the second text encoder's LoRA; defaults to "
        "text_encoder_learning_rate",
        valid="(0, inf)",
    )
    optimizer: str = option(
        "adamw",
        "optimizer (8-bit ones need bitsandbytes)",
        ("adamw", "adamw8bit", "lion8bit", "adafactor", "sgd"),
    )
    weight_decay: float = option(1e-2, "decoupled weight decay", valid="[0, inf)")
    lr_scheduler: str = option(
        "constant",
        "learning-rate schedule (all after warmup_steps of linear warm-up)",
        (
            "constant",
            "constant_with_warmup",
            "linear",
            "cosine",
            "cosine_with_restarts",
            "polynomial",
        ),
    )
    warmup_steps: int = option(0, "steps of linear warm-up at the start")
    lr_cycles: int = option(1, "restarts of cosine_with_restarts")
    lr_power: float = option(1.0, "power of the polynomial schedule", valid="(0, inf)")
    max_grad_norm: float = option(
        1.0, "clip gradients to this norm; 0 turns clipping off", valid="[0, inf)"
    )
    loss_type: str = option("l2", "l2, or pseudo-Huber (robust to outliers)", ("l2", "huber"))
    huber_c: float = option(
        0.1, "the Huber loss's c: where it turns from quadratic to linear", valid="(0, inf)"
    )
    min_snr_gamma: float | None = option(
        None,
        "min-SNR loss weighting with this gamma (Hang et al. 2023; 5 is usual); off if unset",
        valid="(0, inf)",
    )
    noise_offset: float = option(
        0.0, "offset-noise strength (0.05-0.1 helps very dark/bright)", valid="[0, inf)"
    )
    input_perturbation: float = option(
        0.0, "input perturbation of the noise (Ning et al. 2023)", valid="[0, inf)"
    )
    zero_terminal_snr: bool = option(
        False, "rescale the noise schedule to zero SNR at the last step (Lin et al. 2023)"
    )
    prediction_type: str | None = option(
        None,
        "objective override; read from the model's scheduler if unset",
        ("epsilon", "v_prediction"),
    )
    mixed_precision: str = option(
        "auto",
        "autocast precision; auto: bf16 on GPUs that have it, fp16 on older GPUs, off on a CPU",
        ("auto", "no", "fp16", "bf16"),
    )
    gradient_checkpointing: bool = option(False, "recompute activations: less memory, ~30% slower")
    tf32: bool = option(False, "allow TF32 matmuls on Ampere+ GPUs")
    compile: bool = option(
        False, "torch.compile the U-Net: slow first steps, then faster ones (mostly on GPUs)"
    )
    attention: str = option(
        "sdpa",
        "attention kernels: PyTorch's fused SDPA, or xformers (CUDA, must be installed)",
        ("sdpa", "xformers"),
    )
    prior_loss_weight: float = option(
        1.0, "weight of the class-image (prior) loss", valid="[0, inf)"
    )
    ema_decay: float = option(
        0.0, "EMA of the adapter weights with this decay; 0 turns it off", valid="[0, 1)"
    )
    on_nonfinite: str = option(
        "stop", "on a NaN/Inf loss or gradient: stop the run, or skip that step", ("stop", "skip")
    )
    seed: int = option(0, "seed of every random generator in the run")
    num_workers: int = option(0, "data-loader worker processes")
    log_every_n_steps: int = option(10, "steps between loss log lines")
    checkpoint_every_n_steps: int = option(
        0, "steps between resumable checkpoints; 0 saves only the final adapter"
    )
    keep_checkpoints: int = option(3, "newest checkpoints kept; 0 keeps all")
    resume: str | None = option(None, "resume from 'latest' or a checkpoint folder")


@dataclass
class OutputConfig:
    dir: str = option("outputs/lora", "folder for the adapter, config, logs and samples")
    overwrite: bool = option(False, "allow writing into a folder that already holds a run")
    export_kohya: bool = option(
        True,
        "also write <run folder name>.safetensors in the kohya layout, the file AUTOMATIC1111 "
        "and ComfyUI read (checked before writing)",
    )
    log_with: str = option(
        "tensorboard",
        "experiment tracker (wandb must be installed)",
        ("tensorboard", "wandb", "all", "none"),
    )
    validation_every_n_steps: int = option(
        0, "steps between validation losses (needs data.validation_split); also at the end"
    )
    sample_prompts: list[str] = option(
        [], "prompts of sample images during and after training (on the command line: a|b)"
    )
    sample_seed: int = option(0, "seed of the sample images (the same at every step)")
    sample_every_n_steps: int = option(0, "steps between sample images; 0: only at the end")
    sample_steps: int = option(25, "denoising steps of the sample images")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


SECTIONS: dict[str, type] = typing.get_type_hints(RunConfig)


def iter_options() -> typing.Iterator[tuple[str, dataclasses.Field, Any]]:
    """Yield (dotted key, field, resolved type) for every option, in declaration order."""
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            yield f"{section}.{f.name}", f, hints[f.name]


def _closest(name: str, candidates: list[str]) -> str:
    match = difflib.get_close_matches(name, candidates, n=1, cutoff=0.5)
    return f"; did you mean '{match[0]}'?" if match else ""


def type_name(tp: Any) -> str:
    """An option's type as messages and the option table name it: `int`, `float or null`."""
    if typing.get_origin(tp) is list:
        return f"list of {type_name(typing.get_args(tp)[0])}"
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    base = args[0] if args else tp
    name = getattr(base, "__name__", str(base))
    return f"{name} or null" if args else name


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Turn a YAML value or an override string into the declared type, or fail naming the key."""
    optional = isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union
    base = next((a for a in typing.get_args(tp) if a is not type(None)), tp) if optional else tp
    if value is None or (
        optional and isinstance(value, str) and value.lower() in ("none", "null", "~")
    ):
        if optional:
            return None
        raise SdtuneError(f"{key} cannot be empty; expected {type_name(tp)}")
    if typing.get_origin(base) is list and dataclasses.is_dataclass(typing.get_args(base)[0]):
        return _coerce_tables(key, value, typing.get_args(base)[0])
    if typing.get_origin(base) is list:
        # A YAML list, or on the command line one string with items separated by "|".
        items = value.split("|") if isinstance(value, str) else value
        if not isinstance(items, list):
            raise SdtuneError(f"{key} must be a list (YAML list, or a|b|c), got {quote(value)}")
        return [_coerce(key, item, typing.get_args(base)[0]) for item in items if item != ""]
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("true", "yes", "on", "1"):
                return True
            if text in ("false", "no", "off", "0"):
                return False
            raise ValueError
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value) if not isinstance(value, str) else int(value.strip())
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if base is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        raise SdtuneError(f"{key} must be {type_name(tp)}, got {quote(value)}") from None
    raise SdtuneError(f"{key}: unsupported option type {tp}")


def _coerce_tables(key: str, value: Any, cls: type) -> list:
    """A list of tables (data.sources): a YAML list, or on the command line one YAML string
    such as `[{dir: a, repeats: 2}, {dir: b}]`. Each table is as strict as a section."""
    if isinstance(value, str):
        value = _load_yaml_text(value, key)
    if not isinstance(value, list):
        raise SdtuneError(f"{key} must be a list of tables like [{{dir: a}}], got {quote(value)}")
    hints, tables = typing.get_type_hints(cls), []
    for i, table in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(table, dict):
            raise SdtuneError(f"{where} must be a table (key: value, ...), got {quote(table)}")
        for name in table:
            if name not in hints:
                raise SdtuneError(
                    f"unknown key {quote(name)} in {where}{_closest(str(name), list(hints))}"
                )
        tables.append(cls(**{n: _coerce(f"{where}.{n}", v, hints[n]) for n, v in table.items()}))
    return tables


def _set_option(cfg: RunConfig, key: str, value: Any) -> None:
    all_keys = [k for k, _, _ in iter_options()]
    parts = key.split(".")
    if len(parts) != 2 or parts[0] not in SECTIONS:
        raise SdtuneError(f"unknown config key {quote(key)}{_closest(key, all_keys)}")
    section, name = parts
    options = {f.name: (f, tp) for k, f, tp in iter_options() if k.startswith(section + ".")}
    if name not in options:
        raise SdtuneError(f"unknown config key {quote(key)}{_closest(key, all_keys)}")
    f, tp = options[name]
    coerced = _coerce(key, value, tp)
    choices = f.metadata.get("choices")
    if choices and coerced is not None and coerced not in choices:
        raise SdtuneError(f"{key} must be one of {', '.join(choices)}; got {quote(coerced)}")
    setattr(getattr(cfg, section), name, coerced)


def _load_yaml_text(text: str, where: str) -> Any:
    """Parse a recipe or a YAML override value; every way it can be unreadable is one line."""
    try:
        return load_yaml(text, where)  # the safe loader, refusing aliases
    except yaml.YAMLError as exc:
        raise SdtuneError(f"{where} is not valid YAML: {str(exc).splitlines()[0]}") from None
    except ValueError as exc:  # an integer of more digits than Python converts
        reason = str(exc).split(";")[0].splitlines()[0][:200]
        raise SdtuneError(f"{where} holds a number too long to read ({reason})") from None
    except RecursionError:
        raise SdtuneError(f"{where} nests lists or tables too deeply to read") from None


def _set_option_checked(cfg: RunConfig, key: str, value: Any) -> None:
    """`_set_option`, with a value nested too deeply to look at refused in one line."""
    try:
        _set_option(cfg, key, value)
    except RecursionError:
        raise SdtuneError(f"{key}: the value nests lists or tables too deeply") from None


def _flatten(data: Any, source: str) -> dict[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SdtuneError(f"{source}: expected a mapping of sections (model, data, ...)")
    flat: dict[str, Any] = {}
    for section, values in data.items():
        if not isinstance(values, dict):
            flat[str(section)] = values  # reported as an unknown key below
            continue
        for name, value in values.items():
            flat[f"{section}.{name}"] = value
    return flat


class _RecipeLoader(yaml.SafeLoader):
    """YAML without aliases: `*name` can repeat a value without bound ("billion laughs": a
    few hundred bytes that expand to gigabytes), and a recipe has no need for it."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise SdtuneError(
                f"{self.source}: YAML aliases (*name) are not allowed in recipes "
                f"(line {mark.line + 1}); write the value out in full"
            )
        return super().compose_node(parent, index)


def load_yaml(text: str, source: str) -> Any:
    """`text` read as YAML by the safe loader, refusing aliases; `source` names it in errors."""
    loader = _RecipeLoader(text)
    loader.source = source
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def parse_overrides(items: list[str]) -> dict[str, str]:
    """Parse `section.key=value` strings; the value stays a string until it is coerced."""
    parsed: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SdtuneError(f"override {quote(item)} is not of the form section.key=value")
        parsed[key.strip()] = value
    return parsed


def split_command_items(items: list[str]) -> tuple[str | None, dict[str, str]]:
    """`[RECIPE] key=value ...` from the command line: the recipe path (if any) and overrides."""
    items = list(items)
    recipe = items.pop(0) if items and "=" not in items[0] else None
    return recipe, parse_overrides(items)


def read_config(
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    problems: dict[str, str] | None = None,
) -> RunConfig:
    """A RunConfig from a recipe file (optional) and overrides, typed but not range-checked.

    An unreadable recipe raises. A bad key or value raises too, unless `problems` is given:
    then each is recorded there as {key: message} and the option keeps its default."""
    cfg = RunConfig()
    items: list[tuple[str, Any]] = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise SdtuneError(f"config file '{path}' does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise SdtuneError(
                f"{path} is not UTF-8 text (byte {exc.start}); save it as UTF-8"
            ) from None
        items += _flatten(_load_yaml_text(text, str(path)), str(path)).items()
    items += (overrides or {}).items()
    for key, value in items:
        try:
            _set_option_checked(cfg, key, value)
        except SdtuneError as exc:
            if problems is None:
                raise
            problems[key] = str(exc)
    return cfg


def load_config(
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    sections: typing.Iterable[str] | None = None,
    required: typing.Iterable[str] | None = None,
) -> RunConfig:
    """Build a validated RunConfig from a recipe file (optional) and overrides. Only the range
    and consistency checks of `sections` apply (all when None), and only their required keys
    (or those named in `required`): a command that reads no images names the sections it uses."""
    cfg = read_config(path, overrides)
    from sdtune.config_checks import validate_config

    validate_config(cfg, sections, required)
    return cfg


def config_to_dict(cfg: RunConfig) -> dict[str, dict[str, Any]]:
    return dataclasses.asdict(cfg)


def save_config(cfg: RunConfig, path: Path) -> None:
    """Write the resolved config as YAML (temporary name, then rename)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), encoding="utf-8")
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise SdtuneError(f"cannot write '{path}': {exc.strerror or exc}") from None
