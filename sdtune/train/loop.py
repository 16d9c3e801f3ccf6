"""The training loop: a folder of captioned images and a base model in, a LoRA adapter out.

Read it top to bottom: check the inputs, load the model, add the LoRA, then for each step
encode -> noise -> predict -> loss -> update, and finally save the adapter beside the config.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader

from sdtune.adapters.card import write_model_card
from sdtune.adapters.io import save_adapter
from sdtune.adapters.lora import (
    TEXT_ENCODER_TARGET_PRESETS,
    UNET_TARGET_PRESETS,
    build_lora_config,
    check_targets_matched,
    resolve_text_encoder_targets,
    resolve_unet_targets,
)
from sdtune.config import RunConfig, config_to_dict, save_config
from sdtune.data.captions import CaptionAugment, warn_long_captions
from sdtune.data.dataset import EpochShuffleSampler, ImageCaptionDataset
from sdtune.data.sources import ScanReport, scan_data_config
from sdtune.errors import SdtuneError
from sdtune.train.objectives import compute_loss, compute_noisy_latents, compute_target
from sdtune.train.outputs import check_output_dir, prepare_output_dir

logger = logging.getLogger("sdtune.train")

# Families whose U-Net takes only the noisy latents (4 channels); the others need extra inputs.
TRAINABLE_FAMILIES = ("sd1", "sd2-base", "sd2-v")
HALF_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class TrainResult:
    output_dir: Path
    adapter_path: Path
    steps: int
    last_loss: float
    pipeline: object  # the base pipeline with the trained adapter attached, ready to generate


def scan_dataset(cfg: RunConfig) -> ScanReport:
    return scan_data_config(cfg.data)


def add_lora_adapters(pipe, cfg: RunConfig) -> list[dict]:
    """Freeze the base, add LoRA to the U-Net (and text encoder); return optimizer param groups."""
    for part in (pipe.unet, pipe.vae, pipe.text_encoder):
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
    if lora.train_text_encoder:
        te_targets = resolve_text_encoder_targets(lora.text_encoder_targets)
        check_targets_matched(
            pipe.text_encoder, te_targets, "text-encoder", TEXT_ENCODER_TARGET_PRESETS
        )
        te_config = build_lora_config(
            lora.text_encoder_rank or lora.rank,
            lora.text_encoder_alpha or lora.alpha,
            lora.dropout,
            te_targets,
            lora.use_dora,
            lora.init,
        )
        pipe.text_encoder.add_adapter(te_config)
        te_lr = cfg.train.text_encoder_learning_rate or cfg.train.learning_rate
        groups.append({"params": _trainable(pipe.text_encoder), "lr": te_lr})
    return groups


def _trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # adapter weights train in fp32 even when the base runs in half precision
        p.data = p.data.float()
    return params


def build_dataloader(samples, cfg: RunConfig, tokenizer) -> DataLoader:
    d = cfg.data
    dataset = ImageCaptionDataset(
        samples,
        d.resolution,
        d.center_crop,
        d.random_flip,
        d.repeats,
        cfg.train.seed,
        augment=CaptionAugment.from_config(d),
    )
    warn_long_captions([s.caption for s in samples], [s.image_path for s in samples], tokenizer)

    def collate(items: list[dict]) -> dict[str, torch.Tensor]:
        captions = [item["caption"] for item in items]
        ids = tokenizer(
            captions,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return {"pixel_values": torch.stack([i["pixel_values"] for i in items]), "input_ids": ids}

    return DataLoader(
        dataset,
        batch_size=cfg.train.batch_size,
        sampler=EpochShuffleSampler(len(dataset), cfg.train.seed),
        collate_fn=collate,
        num_workers=cfg.train.num_workers,
    )


def training_step(batch, pipe, unet, text_encoder, alphas_cumprod, prediction_type, dtype):
    """One loss evaluation: encode, noise, predict, compare. Returns the scalar loss."""
    pixels = batch["pixel_values"].to(pipe.vae.device, dtype=dtype)
    with torch.no_grad():
        latents = pipe.vae.encode(pixels).latent_dist.sample() * pipe.vae.config.scaling_factor
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, len(alphas_cumprod), (latents.shape[0],), device=latents.device)
    noisy = compute_noisy_latents(latents, noise, timesteps, alphas_cumprod)
    text_embeddings = text_encoder(batch["input_ids"].to(latents.device))[0]
    prediction = unet(noisy, timesteps, text_embeddings.to(dtype)).sample
    target = compute_target(latents, noise, timesteps, alphas_cumprod, prediction_type)
    return compute_loss(prediction, target)


def check_inputs(cfg: RunConfig) -> ScanReport:
    """Everything that can be checked before the (slow) model load: data, output folder, batch."""
    report = scan_dataset(cfg)
    check_output_dir(cfg.output.dir, cfg.output.overwrite)
    images = len(report.samples) * cfg.data.repeats
    if images < cfg.train.batch_size:
        raise SdtuneError(
            f"train.batch_size is {cfg.train.batch_size} but the dataset has only {images} "
            "images (with repeats); lower train.batch_size or raise data.repeats"
        )
    return report


def load_base(cfg: RunConfig):
    """The base pipeline and its family; only families with plain 4-channel U-Nets train."""
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


def train(cfg: RunConfig) -> TrainResult:
    """Run the training described by `cfg` and save the adapter; see the module docstring."""
    from diffusers.optimization import get_scheduler

    # The run folder is made only after the model loaded, so a wrong model path leaves
    # nothing behind that would block the retry.
    report = check_inputs(cfg)
    pipe, family = load_base(cfg)
    out = prepare_output_dir(cfg.output.dir, cfg.output.overwrite)
    accelerator = Accelerator(
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        log_with="tensorboard",
        project_dir=str(out),
    )
    if accelerator.is_main_process:
        save_config(cfg, out / "config.yaml")
        logger.info("data: %s", report.summary())
    set_seed(cfg.train.seed)
    dtype = HALF_DTYPES.get(cfg.train.mixed_precision, torch.float32)
    pipe.to(accelerator.device)
    if dtype != torch.float32:  # frozen base in half precision; the LoRA weights stay fp32
        pipe.to(dtype=dtype)
    param_groups = add_lora_adapters(pipe, cfg)
    prediction_type = cfg.train.prediction_type or pipe.scheduler.config.prediction_type
    alphas_cumprod = _alphas_cumprod(pipe.scheduler).to(accelerator.device)

    dataloader = build_dataloader(report.samples, cfg, pipe.tokenizer)
    optimizer = torch.optim.AdamW(param_groups, weight_decay=cfg.train.weight_decay)
    lr_scheduler = get_scheduler(
        cfg.train.lr_scheduler,
        optimizer,
        num_warmup_steps=cfg.train.warmup_steps * accelerator.num_processes,
        num_training_steps=cfg.train.max_steps * accelerator.num_processes,
    )
    unet, text_encoder, optimizer, dataloader, lr_scheduler = accelerator.prepare(
        pipe.unet, pipe.text_encoder, optimizer, dataloader, lr_scheduler
    )
    trainable = [p for group in param_groups for p in group["params"]]
    if accelerator.is_main_process:
        accelerator.init_trackers("sdtune")
        n = sum(p.numel() for p in trainable)
        logger.info("family %s, %s, %d trainable LoRA parameters", family.name, prediction_type, n)

    step, last_loss = 0, float("nan")
    unet.train()
    text_encoder.train(cfg.lora.train_text_encoder)
    while step < cfg.train.max_steps:
        for batch in dataloader:
            with accelerator.accumulate(unet, text_encoder):
                loss = training_step(
                    batch, pipe, unet, text_encoder, alphas_cumprod, prediction_type, dtype
                )
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.train.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(trainable, cfg.train.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            step += 1
            if step % cfg.train.log_every_n_steps == 0 or step == cfg.train.max_steps:
                last_loss = accelerator.gather(loss.detach()).mean().item()
                accelerator.log({"loss": last_loss, "lr": lr_scheduler.get_last_lr()[0]}, step=step)
                logger.info("step %d/%d  loss %.4f", step, cfg.train.max_steps, last_loss)
            if cfg.train.save_every_n_steps and step % cfg.train.save_every_n_steps == 0:
                _save(accelerator, pipe, cfg, family, out / f"step-{step:06d}", step)
            if step >= cfg.train.max_steps:
                break

    adapter_path = _save(accelerator, pipe, cfg, family, out, step)
    accelerator.end_training()
    pipe.unet = accelerator.unwrap_model(unet).eval()
    pipe.text_encoder = accelerator.unwrap_model(text_encoder).eval()
    if accelerator.is_main_process:
        samples = [_save_sample(pipe, cfg, out / "samples")] if cfg.output.sample_prompt else []
        card = write_model_card(
            out, adapter_info(cfg, pipe, family, step), [p.relative_to(out) for p in samples]
        )
        logger.info("model card %s", card)
    return TrainResult(out, adapter_path, step, last_loss, pipe)


def _save_sample(pipe, cfg: RunConfig, folder: Path) -> Path:
    """One image from the trained adapter, so the run folder shows what was learned."""
    from sdtune.generate.outputs import GenerationParams, save_png
    from sdtune.generate.txt2img import generate_images

    size = cfg.data.resolution
    steps, seed = cfg.output.sample_steps, cfg.train.seed
    with torch.no_grad():
        image = generate_images(
            pipe, cfg.output.sample_prompt, steps=steps, seed=seed, width=size, height=size
        )[0]
    params = GenerationParams(
        prompt=cfg.output.sample_prompt,
        steps=steps,
        seed=seed,
        width=size,
        height=size,
        scheduler=type(pipe.scheduler).__name__,
        model=cfg.model.path,
    )
    path = save_png(image, folder, params, stem=f"seed{seed}")
    logger.info("sample image %s", path)
    return path


def _alphas_cumprod(scheduler) -> torch.Tensor:
    from diffusers import DDPMScheduler

    # The training noise schedule is DDPM's, whatever sampler the model ships with.
    return DDPMScheduler.from_config(scheduler.config).alphas_cumprod.float()


def _save(accelerator, pipe, cfg: RunConfig, family, folder: Path, step: int) -> Path:
    accelerator.wait_for_everyone()
    path = folder / "pytorch_lora_weights.safetensors"
    if accelerator.is_main_process:
        info = adapter_info(cfg, pipe, family, step)
        unet = accelerator.unwrap_model(pipe.unet)
        text_encoder = (
            accelerator.unwrap_model(pipe.text_encoder) if cfg.lora.train_text_encoder else None
        )
        path = save_adapter(folder, unet, text_encoder, info)
        logger.info("saved adapter %s", path)
    accelerator.wait_for_everyone()
    return path


def adapter_info(cfg: RunConfig, pipe, family, step: int) -> dict:
    """What the adapter's header and model card say about how it was made."""
    return {
        "family": family.name,
        "base_model": cfg.model.path,
        "prediction_type": cfg.train.prediction_type or pipe.scheduler.config.prediction_type,
        "rank": cfg.lora.rank,
        "alpha": cfg.lora.alpha,
        "unet_targets": resolve_unet_targets(cfg.lora.unet_targets),
        "text_encoder": cfg.lora.train_text_encoder,
        "trigger": cfg.data.trigger,
        "resolution": cfg.data.resolution,
        "steps": step,
        "config": config_to_dict(cfg),
    }
