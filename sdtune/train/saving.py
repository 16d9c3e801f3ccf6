"""Writing what a run makes: checkpoints (and reading them back) and the adapter files."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from sdtune.adapters.io import save_adapter
from sdtune.adapters.lora import resolve_unet_targets
from sdtune.config import RunConfig, config_to_dict
from sdtune.train import checkpoint as ckpt
from sdtune.train.checkpoint import Progress

logger = logging.getLogger("sdtune.train")

EMA_FILE_NAME = "pytorch_lora_weights_ema.safetensors"


def save_checkpoint(run) -> Path | None:
    """Adapter + full training state under checkpoints/step-N (main process writes)."""
    acc = run.accelerator
    acc.wait_for_everyone()
    path = None
    if acc.is_main_process:
        p = run.progress
        state = {
            "progress": {"step": p.step, "epoch": p.epoch, "batch_in_epoch": p.batch_in_epoch},
            "trainable": [t.detach().cpu() for t in run.trainable],
            "optimizer": run.optimizer.state_dict(),
            "lr_scheduler": run.lr_scheduler.state_dict(),
            "ema": run.ema.state_dict() if run.ema is not None else None,
            "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
            "rng": ckpt.capture_rng_state(),
        }
        path = ckpt.save_checkpoint(
            run.out, p.step, state, lambda d: _write_adapter(run, d), run.cfg.train.keep_checkpoints
        )
    acc.wait_for_everyone()
    return path


def restore_checkpoint(run, folder: Path) -> None:
    """Put every piece of saved state back, so the next step is the one that would have run."""
    state = ckpt.load_training_state(folder)
    with torch.no_grad():
        for param, saved in zip(run.trainable, state["trainable"], strict=True):
            param.copy_(saved)
    run.optimizer.load_state_dict(state["optimizer"])
    run.lr_scheduler.load_state_dict(state["lr_scheduler"])
    if run.ema is not None and state["ema"] is not None:
        run.ema.load_state_dict(state["ema"])
    if run.accelerator.scaler is not None and state["scaler"] is not None:
        run.accelerator.scaler.load_state_dict(state["scaler"])
    ckpt.restore_rng_state(state["rng"])
    run.progress = Progress(**state["progress"])
    logger.info("resumed from %s at step %d", folder, run.progress.step)


def save_adapter_files(run, folder: Path) -> Path:
    acc = run.accelerator
    acc.wait_for_everyone()
    path = folder / "pytorch_lora_weights.safetensors"
    if acc.is_main_process:
        path = _write_adapter(run, folder)
        if run.ema is not None:
            with run.ema.swapped_in():
                _write_adapter(run, folder, EMA_FILE_NAME)
        logger.info("saved adapter %s", path)
    acc.wait_for_everyone()
    return path


def _write_adapter(run, folder: Path, file_name: str | None = None) -> Path:
    acc, cfg = run.accelerator, run.cfg
    unet = acc.unwrap_model(run.unet, keep_torch_compile=False)
    text_encoder = acc.unwrap_model(run.text_encoder) if cfg.lora.train_text_encoder else None
    info = adapter_info(cfg, run.pipe, run.family, run.progress.step)
    kwargs = {"file_name": file_name} if file_name else {}
    return save_adapter(folder, unet, text_encoder, info, **kwargs)


def adapter_info(cfg: RunConfig, pipe, family, step: int) -> dict:
    """What the adapter's header and model card say about how it was made."""
    return {
        "family": family.name,
        "base_model": cfg.model.path,
        "prediction_type": cfg.train.prediction_type or pipe.scheduler.config.prediction_type,
        "zero_terminal_snr": cfg.train.zero_terminal_snr,
        "rank": cfg.lora.rank,
        "alpha": cfg.lora.alpha,
        "unet_targets": resolve_unet_targets(cfg.lora.unet_targets),
        "text_encoder": cfg.lora.train_text_encoder,
        "trigger": cfg.data.trigger,
        "resolution": cfg.data.resolution,
        "steps": step,
        "config": config_to_dict(cfg),
    }
