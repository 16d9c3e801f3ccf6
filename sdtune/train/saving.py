"""Writing what a run makes: checkpoints (and reading them back) and the adapter files.

Nothing non-finite is written: the weights are checked after every update, and every tensor
of an adapter, EMA or training state again before it is saved."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from sdtune.adapters.card import write_model_card
from sdtune.adapters.io import save_adapter
from sdtune.adapters.lora import resolve_unet_targets
from sdtune.config import RunConfig, config_to_dict, save_config
from sdtune.errors import SdtuneError
from sdtune.train import checkpoint as ckpt
from sdtune.train.checkpoint import Progress
from sdtune.train.outputs import CONFIG_FILE, begin_final_files, commit_final_files
from sdtune.train.resume import config_fingerprint

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
            "run_id": run.run_id,
            "config": config_to_dict(run.cfg),
            "config_fingerprint": config_fingerprint(run.cfg),
        }

        def write_files(folder: Path) -> None:
            _write_adapter(run, folder)
            save_config(run.cfg, folder / CONFIG_FILE)

        path = ckpt.save_checkpoint(
            run.out, p.step, state, write_files, run.cfg.train.keep_checkpoints
        )
    acc.wait_for_everyone()
    return path


def restore_checkpoint(run, folder: Path, state: dict | None = None) -> None:
    """Put every piece of saved state back, so the next step is the one that would have run.
    `state` is the folder's training state when it was read already."""
    state = state if state is not None else ckpt.load_training_state(folder)
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


def save_final_files(run, draw_samples: Callable[[], Path]) -> Path:
    """The adapter, its EMA, sample images, the kohya file, the model card and the config,
    staged in `.final-tmp/` and moved into the run folder once all are complete."""
    acc, out = run.accelerator, run.out
    acc.wait_for_everyone()
    path = out / ckpt.ADAPTER_FILE
    if acc.is_main_process:
        staging = begin_final_files(out)
        try:
            _stage_final_files(run, staging, draw_samples)
        except SdtuneError:
            shutil.rmtree(staging, ignore_errors=True)  # the folder keeps its earlier state
            raise
        commit_final_files(out)
        logger.info("saved adapter %s", path)
        logger.info("model card %s", out / "README.md")
    acc.wait_for_everyone()
    return path


def _stage_final_files(run, staging: Path, draw_samples: Callable[[], Path]) -> None:
    cfg, out = run.cfg, run.out
    staged = _write_adapter(run, staging)
    if run.ema is not None:
        with run.ema.swapped_in():
            _write_adapter(run, staging, EMA_FILE_NAME)
    samples = [draw_samples()] if cfg.output.sample_prompts else []
    info = adapter_info(cfg, run.pipe, run.family, run.progress.step)
    if cfg.output.export_kohya:
        kohya = _write_kohya_file(run, staged, staging)
        if kohya is not None:
            info["kohya_file"] = kohya.name
    write_model_card(staging, info, [p.relative_to(out) for p in samples], title=out.name)
    save_config(cfg, staging / CONFIG_FILE)


def _write_kohya_file(run, adapter: Path, folder: Path) -> Path | None:
    """`<run folder>.safetensors` for A1111/ComfyUI, checked first; the run's adapter is already
    made, so a file that cannot be made is a warning, not a failed run."""
    from sdtune.adapters.export import export_kohya

    if run.cfg.lora.use_dora:
        logger.warning("no kohya file: the kohya LoRA layout cannot hold DoRA magnitudes")
        return None
    name = f"{run.out.name}.safetensors"
    try:
        kohya = export_kohya(adapter, folder / name, run.family.name, overwrite=True, base=run.pipe)
    except SdtuneError as exc:
        logger.warning("no kohya file: %s", exc)
        return None
    logger.info("kohya/A1111/ComfyUI file %s", run.out / name)
    return kohya


def check_weights_finite(run, step: int) -> None:
    """Stop at the update that made a LoRA weight NaN or infinite: nothing after it is saved."""
    bad = sum(int((~torch.isfinite(p.detach())).sum()) for p in run.trainable)
    if not bad:
        return
    total = sum(p.numel() for p in run.trainable)
    saved = ckpt.list_checkpoints(run.out)
    raise SdtuneError(
        f"the update of step {step} made {bad:,} of {total:,} LoRA weights non-finite; the run "
        f"stopped and nothing from this step was saved (last checkpoint: "
        f"{saved[-1] if saved else 'none'}); lower train.learning_rate"
    )


def _write_adapter(run, folder: Path, file_name: str | None = None) -> Path:
    acc, cfg = run.accelerator, run.cfg
    unet = acc.unwrap_model(run.unet, keep_torch_compile=False)
    trained = {
        name: acc.unwrap_model(encoder)
        for name, encoder in run.text_encoders.items()
        if name in run.trained_text_encoders
    }
    info = adapter_info(cfg, run.pipe, run.family, run.progress.step)
    kwargs = {"file_name": file_name} if file_name else {}
    if "text_encoder_2" in trained:
        kwargs["text_encoder_2"] = trained["text_encoder_2"]
    return save_adapter(folder, unet, trained.get("text_encoder"), info, **kwargs)


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
        **({"text_encoder_2": cfg.lora.train_text_encoder_2} if family.is_xl else {}),
        "trigger": cfg.data.trigger,
        "resolution": cfg.data.resolution,
        "steps": step,
        "config": config_to_dict(cfg),
    }
