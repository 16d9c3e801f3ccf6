"""What a training run reports as it goes: the progress bar, the loss line and its numbers."""

from __future__ import annotations

import logging
import sys

import torch

logger = logging.getLogger("sdtune.train")


class StepLoss:
    """The mean loss over the items of one optimizer step, however its batch is split into
    micro-batches (gradient accumulation): what batch 4 logs, 2 accumulated batches of 2 log."""

    def __init__(self) -> None:
        self.total, self.items = None, 0

    def add(self, loss: torch.Tensor, items: int) -> None:
        weighted = loss.detach().float() * items
        self.total = weighted if self.total is None else self.total + weighted
        self.items += items

    def mean(self) -> torch.Tensor:
        return self.total / self.items


def progress_bar(run):
    """A bar with loss, speed and time left, on the main process of an interactive run."""
    from tqdm.auto import tqdm

    interactive = sys.stderr.isatty() and run.accelerator.is_main_process
    return tqdm(
        total=run.cfg.train.max_steps,
        initial=run.progress.step,
        unit="step",
        disable=not interactive,
        dynamic_ncols=True,
    )


def format_duration(seconds: float) -> str:
    """12s, 3m05s, 1h02m: short enough for a log line."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def log_step(run, loss, grad_norm, images_per_s: float, left_s: float) -> float:
    """Log the step's loss (the mean over processes), lr, speed and time left."""
    acc, step = run.accelerator, run.progress.step
    value = acc.gather(loss.detach()).mean().item()
    logs = {"loss": value, "lr": run.lr_scheduler.get_last_lr()[0], "images_per_s": images_per_s}
    if grad_norm is not None:
        logs["grad_norm"] = float(grad_norm)
    if torch.cuda.is_available():
        logs["gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    acc.log(logs, step=step)
    logger.info(
        "step %d/%d  loss %.4f  lr %.2e  %.1f img/s  %s left",
        step,
        run.cfg.train.max_steps,
        value,
        logs["lr"],
        images_per_s,
        format_duration(left_s),
    )
    return value
