"""What a training run reports as it goes: the step's mean loss, the progress bar, the step event."""

from __future__ import annotations

import sys

import torch

from sdtune.train.events import Stepped


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


def log_step(run, loss, grad_norm, images_per_s: float, left_s: float) -> float:
    """Report the step (its loss is the mean over processes) as a `step` event: the log line,
    the trackers and the progress bar are its sinks."""
    value = run.accelerator.gather(loss.detach()).mean().item()
    memory = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    run.events.emit(
        Stepped(
            run.progress.step,
            run.cfg.train.max_steps,
            value,
            run.lr_scheduler.get_last_lr()[0],
            images_per_s,
            left_s,
            None if grad_norm is None else float(grad_norm),
            memory,
        )
    )
    return value
