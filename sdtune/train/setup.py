"""Everything the loop needs before its first step: checked inputs, the base model with LoRA
adapters, the data loader and the objective's settings."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from sdtune.adapters.lora import (
    TEXT_ENCODER_TARGET_PRESETS,
    UNET_TARGET_PRESETS,
    build_lora_config,
    check_targets_matched,
    resolve_text_encoder_targets,
    resolve_unet_targets,
)
from sdtune.config import RunConfig
from sdtune.data.buckets import BucketBatchSampler, assign_sample_buckets
from sdtune.data.cache import pixel_digest
from sdtune.data.captions import CaptionAugment, warn_long_captions
from sdtune.data.dataset import EpochShuffleSampler, ImageCaptionDataset, collate_sizes
from sdtune.data.dreambooth import PriorPreservationDataset, collate_pairs
from sdtune.data.multi import augments_per_sample, items_per_epoch, repeats_per_sample
from sdtune.data.prompts import tokenize_prompts
from sdtune.data.sources import ScanReport, scan_data_config
from sdtune.data.streaming import StreamingImageDataset, StreamLoader
from sdtune.errors import SdtuneError
from sdtune.models.components import Components
from sdtune.models.families import FAMILIES, INPAINT_INPUTS, Family, detect_family
from sdtune.train.checkpoint import CHECKPOINTS_DIR
from sdtune.train.objectives import compute_zero_terminal_snr
from sdtune.train.outputs import check_output_dir
from sdtune.train.parts import lora_targets_of, text_encoder_loras


def _loop_can_feed(family: Family) -> bool:
    """Whether the loop makes every U-Net input `family` takes: the latents alone, or with a
    mask and the masked image's latents (the loop draws masks), the text conditioning of its
    encoders and, for SDXL, the micro-conditioning from each item's sizes. Depth maps and the
    upscaler's low-res images it does not make yet; the SDXL refiner only generates."""
    return family.extra_inputs in ((), INPAINT_INPUTS) and family.trainable


TRAINABLE_FAMILIES = tuple(name for name, f in FAMILIES.items() if _loop_can_feed(f))


@dataclass(frozen=True)
class Objective:
    """The loss settings, resolved once: what the loop passes to the pure loss functions."""

    prediction_type: str
    alphas_cumprod: torch.Tensor
    noise_offset: float = 0.0
    input_perturbation: float = 0.0
    min_snr_gamma: float | None = None
    loss_type: str = "l2"
    huber_c: float = 0.1


def check_inputs(cfg: RunConfig) -> ScanReport:
    """Everything that can be checked before the (slow) model load: data, output folder, batch."""
    report = scan_data_config(cfg.data)
    trackers(cfg.output.log_with)
    if cfg.train.resume is None:
        check_output_dir(cfg.output.dir, cfg.output.overwrite)
    elif cfg.train.resume == "latest" and not (Path(cfg.output.dir) / CHECKPOINTS_DIR).is_dir():
        raise SdtuneError(
            f"train.resume=latest but output folder '{cfg.output.dir}' has no checkpoints; "
            "point output.dir at the run to resume, or drop train.resume"
        )
    check_attention(cfg.train.attention)
    check_distributed_type()
    images = items_per_epoch(report.samples, cfg.data)
    if images < cfg.train.batch_size and not cfg.data.dataset_streaming:  # a stream: unknown
        raise SdtuneError(
            f"train.batch_size is {cfg.train.batch_size} but the dataset has only {images} "
            "images (with repeats); lower train.batch_size or raise data.repeats"
        )
    return report


def check_attention(attention: str) -> None:
    """xformers needs the package and a CUDA device; say so before the model loads."""
    import importlib.util

    if attention != "xformers":
        return
    if importlib.util.find_spec("xformers") is None:
        raise SdtuneError(
            "train.attention=xformers but xformers is not installed; `pip install xformers` "
            "(the build matching your torch), or use train.attention=sdpa (as fast on torch 2)"
        )
    if not torch.cuda.is_available():
        raise SdtuneError(
            "train.attention=xformers needs a CUDA GPU and none was found; "
            "use train.attention=sdpa (the default)"
        )


def resolve_mixed_precision(value: str) -> str:
    """`auto`: bf16 where the GPU has it (fp16's range without its loss scaling), fp16 on older
    GPUs, and full precision on a CPU, where half precision is slower, not faster."""
    if value != "auto":
        return value
    if not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def check_distributed_type() -> None:
    """Refuse sharded launches (FSDP, DeepSpeed) before anything loads or is written.

    The loop shards the data, not the model: every process holds the frozen base and the
    whole adapter, which is what lets it save and resume the adapter exactly. Sharding the
    weights would need gathers the loop does not do, so such a launch fails here, not at save.
    """
    import os

    for variable, name in (
        ("ACCELERATE_USE_FSDP", "FSDP"),
        ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"),
    ):
        if os.environ.get(variable, "").lower() in ("1", "true", "yes"):
            raise SdtuneError(
                f"accelerate is set up for {name} ({variable}={os.environ[variable]}), which "
                "sdtune does not support: it trains data-parallel, each GPU holding the frozen "
                "base (SD 1.5 LoRA needs ~4 GB at 512 px, batch 1, gradient checkpointing); "
                "launch with recipes/accelerate/multi-gpu.yaml instead"
            )


def set_attention(pipe, attention: str) -> None:
    """Route the U-Net's attention through xformers when asked; SDPA is diffusers' default."""
    if attention == "xformers":
        pipe.unet.enable_xformers_memory_efficient_attention()


def trackers(log_with: str) -> list[str]:
    """The accelerate trackers for `output.log_with`; W&B only when it is installed."""
    import importlib.util

    wanted = {"all": ["tensorboard", "wandb"], "none": []}.get(log_with, [log_with])
    if "wandb" in wanted and importlib.util.find_spec("wandb") is None:
        raise SdtuneError(
            "output.log_with=wandb but wandb is not installed; `pip install wandb` (and "
            "`wandb login`), or use output.log_with=tensorboard"
        )
    return wanted


def load_base(cfg: RunConfig):
    """The base pipeline and its family; only families whose inputs the loop makes train."""
    from sdtune.models.families import detect_family
    from sdtune.models.loading import load_pipeline

    pipe = load_pipeline(cfg.model.path, family=cfg.model.family, config_dir=cfg.model.config_dir)
    family = detect_family(pipe)
    if family.name not in TRAINABLE_FAMILIES:
        raise SdtuneError(
            f"training a LoRA on the '{family.name}' family is not supported yet; "
            f"supported: {', '.join(TRAINABLE_FAMILIES)}"
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe, family


def check_model_fits(pipe, cfg: RunConfig) -> None:
    """What needs the loaded model, checked before the run folder is made: every LoRA target
    names modules the model has, and zero terminal SNR comes with v-prediction."""
    prediction_type = cfg.train.prediction_type or pipe.scheduler.config.prediction_type
    if cfg.train.zero_terminal_snr and prediction_type == "epsilon":
        raise SdtuneError(
            "train.zero_terminal_snr=true needs v-prediction (at SNR 0 the noise is the input, "
            "so an epsilon model learns nothing it can sample from; Lin et al. 2023): set "
            "train.prediction_type=v_prediction or use a v-prediction model such as sd2-v"
        )
    lora = cfg.lora
    unet_targets = resolve_unet_targets(lora.unet_targets)
    check_targets_matched(pipe.unet, unet_targets, "U-Net", UNET_TARGET_PRESETS)
    family = detect_family(pipe)
    te_targets = resolve_text_encoder_targets(lora.text_encoder_targets)
    for part in text_encoder_loras(cfg, family):
        check_targets_matched(
            getattr(pipe, part.part),
            te_targets,
            _part_label(part.part),
            TEXT_ENCODER_TARGET_PRESETS,
        )


def _part_label(part: str) -> str:
    return "text-encoder" if part == "text_encoder" else part.replace("_", " ")


def add_lora_adapters(pipe, cfg: RunConfig, family: Family | None = None) -> list[dict]:
    """Freeze the base, add LoRA to the U-Net (and the text encoders that train); return the
    optimizer's param groups, one per part, each with its learning rate."""
    family = family or detect_family(pipe)
    for part in Components.of(pipe, family).models:
        part.requires_grad_(False)
    lora = cfg.lora
    unet_targets = resolve_unet_targets(lora.unet_targets)
    check_targets_matched(pipe.unet, unet_targets, "U-Net", UNET_TARGET_PRESETS)
    pipe.unet.add_adapter(
        build_lora_config(
            lora.rank, lora.alpha, lora.dropout, unet_targets, lora.use_dora, lora.init
        )
    )
    groups = [{"params": _trainable(pipe.unet), "lr": cfg.train.learning_rate}]
    te_targets = resolve_text_encoder_targets(lora.text_encoder_targets)
    for part in text_encoder_loras(cfg, family):
        encoder = getattr(pipe, part.part)
        check_targets_matched(
            encoder, te_targets, _part_label(part.part), TEXT_ENCODER_TARGET_PRESETS
        )
        targets = lora_targets_of(encoder, te_targets, family, part.part)
        encoder.add_adapter(
            build_lora_config(
                part.rank, part.alpha, lora.dropout, targets, lora.use_dora, lora.init
            )
        )
        groups.append({"params": _trainable(encoder), "lr": part.learning_rate})
    return groups


def _trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # adapter weights train in fp32 even when the base runs in half precision
        p.data = p.data.float()
    return params


def enable_gradient_checkpointing(pipe, text_encoders: list[str]) -> None:
    """Recompute activations in the backward pass instead of storing them (the U-Net and the
    text encoders that train, by part name)."""
    pipe.unet.enable_gradient_checkpointing()
    for name in text_encoders:
        # Non-reentrant: the frozen embeddings need no grad, yet the LoRA inside must get one.
        getattr(pipe, name).gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )


def build_dataloader(
    samples, cfg: RunConfig, tokenizer, rank: int = 0, world_size: int = 1, class_samples=None
) -> tuple[DataLoader, EpochShuffleSampler]:
    """The loader over this process's shard, and its sampler (which knows epoch and position).

    With `class_samples` (DreamBooth prior preservation) each batch holds the instance images
    and then as many class images, and `batch["prior"]` marks the class half.
    """
    d = cfg.data
    if d.dataset_streaming:  # rows come as they are read; the stream is its own sampler
        stream = StreamingImageDataset(d, cfg.train.seed, cfg.train.batch_size, rank, world_size)
        loader = StreamLoader(
            stream,
            batch_size=cfg.train.batch_size,
            collate_fn=make_collate(tokenizer, False, d.max_token_length),
            num_workers=cfg.train.num_workers,
            pin_memory=torch.cuda.is_available(),
        )
        return loader, stream

    def dataset_of(items, repeats, augment):
        return ImageCaptionDataset(
            items,
            d.resolution,
            d.center_crop,
            d.random_flip,
            repeats,
            cfg.train.seed,
            augment=augment,
        )

    if d.sources:  # each sample weighted and captioned by its own source
        instances = dataset_of(
            samples, repeats_per_sample(samples, d), augments_per_sample(samples, d)
        )
    else:
        instances = dataset_of(samples, d.repeats, CaptionAugment.from_config(d))
    if d.bucketing:
        instances.buckets = assign_buckets(samples, cfg)
        instances.crop = "pad" if d.pad else ("center" if d.center_crop else "random")
    dataset = instances
    if class_samples:  # class images are fitted to their instance's bucket, the same way
        classes = dataset_of(class_samples, d.repeats, CaptionAugment())
        classes.crop = instances.crop
        dataset = PriorPreservationDataset(instances, classes)
    first_tokenizer = next(iter(tokenizer.values())) if isinstance(tokenizer, dict) else tokenizer
    warn_long_captions(
        [s.caption for s in samples],
        [s.image_path for s in samples],
        first_tokenizer,
        d.max_token_length,
    )

    collate = make_collate(tokenizer, bool(class_samples), d.max_token_length, d.cache_latents)
    if d.bucketing:
        per_index = [instances.size_of(i) for i in range(len(instances))]
        sampler = BucketBatchSampler(
            per_index,
            cfg.train.batch_size,
            cfg.train.seed,
            rank,
            world_size,
            cfg.train.gradient_accumulation_steps,
        )
        batching = {"batch_sampler": sampler}
    else:
        sampler = EpochShuffleSampler(len(dataset), cfg.train.seed, rank, world_size)
        batching = {"batch_size": cfg.train.batch_size, "sampler": sampler}
    loader = DataLoader(
        dataset,
        **batching,
        collate_fn=collate,
        num_workers=cfg.train.num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,  # workers must see the sampler's epoch each pass
    )
    return loader, sampler


def assign_buckets(samples, cfg: RunConfig) -> list[tuple[int, int]]:
    """The (width, height) bucket of each sample; a sample of unknown size gets the square."""
    return assign_sample_buckets(samples, cfg.data)


def make_collate(
    tokenizer, paired: bool = False, max_token_length: int = 75, pixel_keys: bool = False
):
    """Batch items: stacked pixels, the captions and their token ids (in windows of 77, see
    sdtune.data.prompts), the items' draw numbers and sizes ((batch, 2) tensors of original
    size, crop top-left and target size); with `pixel_keys`, each image's latent cache key,
    computed here so that loader workers do the hashing, not the training step.

    `tokenizer` is one tokenizer (its ids under "input_ids") or a dict of batch key ->
    tokenizer (SDXL: "input_ids" and "input_ids_2"; see `Components.tokenize`)."""
    tokenizers = tokenizer if isinstance(tokenizer, dict) else {"input_ids": tokenizer}

    def collate(items: list[dict]) -> dict:
        if paired:
            batch = collate_pairs(items)
        else:
            batch = {
                "pixel_values": torch.stack([i["pixel_values"] for i in items]),
                "captions": [i["caption"] for i in items],
                "draws": [i["draw"] for i in items],
                **collate_sizes(items),
            }
        for key, one in tokenizers.items():
            batch[key] = tokenize_prompts(one, batch["captions"], max_token_length)
        if pixel_keys:
            batch["pixel_keys"] = [pixel_digest(p) for p in batch["pixel_values"]]
        return batch

    return collate


def build_objective(cfg: RunConfig, scheduler) -> Objective:
    """The objective from the config and the model's own noise schedule."""
    from diffusers import DDPMScheduler

    # The training noise schedule is DDPM's, whatever sampler the model ships with.
    alphas_cumprod = DDPMScheduler.from_config(scheduler.config).alphas_cumprod.float()
    if cfg.train.zero_terminal_snr:
        alphas_cumprod = compute_zero_terminal_snr(alphas_cumprod)
    t = cfg.train
    prediction_type = t.prediction_type or scheduler.config.prediction_type
    return Objective(
        prediction_type=prediction_type,
        alphas_cumprod=alphas_cumprod,
        noise_offset=t.noise_offset,
        input_perturbation=t.input_perturbation,
        min_snr_gamma=t.min_snr_gamma,
        loss_type=t.loss_type,
        huber_c=t.huber_c,
    )
