"""What a training run reports, as typed events: one stream, several sinks.

The loop emits an event for each thing that happens (start, a logged step, samples written,
a validation loss, a checkpoint, the end, a failure, a stop on request). `EventLog` appends
each one as a JSON line to `events.jsonl` in the run folder, flushed at once, and hands it to
its sinks: the log lines, the progress bar and the trackers (TensorBoard) are all sinks of the
same events, so they cannot disagree. Anything else that wants to follow a run (the demo's
loss curve, a UI, a script) reads `events.jsonl` with `read_events`, and a reader that polls
it gets each new event once with `EventTail`.

A run is asked to stop by a `STOP` file in its folder, or by SIGTERM: at the next optimizer
step it writes a checkpoint, emits `stopped` and returns, and `train.resume=latest` continues
it exactly.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

EVENTS_FILE = "events.jsonl"
STOP_FILE = "STOP"
STOP_REASONS = ("stop file", "SIGTERM")

logger = logging.getLogger("sdtune.train")


@dataclass
class Event:
    """Common to every event: what happened (`kind`), when (unix seconds) and at which step."""

    kind: ClassVar[str] = "event"
    step: int

    def to_dict(self) -> dict[str, Any]:
        return {"event": self.kind, "time": round(time.time(), 3), **_finite(asdict(self))}


@dataclass
class Started(Event):
    kind: ClassVar[str] = "start"
    max_steps: int
    items: int  # training items per epoch
    family: str
    config: dict[str, Any]  # the resolved config, as saved in config.yaml
    predicted_peak_gib: float | None = None  # `sdtune estimate` on a GPU run; None on a CPU
    resumed_from: str | None = None


@dataclass
class Stepped(Event):
    kind: ClassVar[str] = "step"
    max_steps: int
    loss: float
    lr: float
    images_per_s: float
    eta_s: float
    grad_norm: float | None = None
    gpu_memory_gb: float | None = None


@dataclass
class SamplesWritten(Event):
    kind: ClassVar[str] = "sample"
    grid: str
    images: list[str] = field(default_factory=list)


@dataclass
class Validated(Event):
    kind: ClassVar[str] = "validation"
    val_loss: float


@dataclass
class CheckpointWritten(Event):
    kind: ClassVar[str] = "checkpoint"
    path: str


@dataclass
class Finished(Event):
    kind: ClassVar[str] = "finished"
    adapter: str
    last_loss: float
    seconds: float


@dataclass
class Stopped(Event):
    kind: ClassVar[str] = "stopped"
    checkpoint: str | None
    reason: str  # "stop file" | "SIGTERM"


@dataclass
class Failed(Event):
    kind: ClassVar[str] = "failed"
    error: str  # one line


def _finite(fields: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN or inf: such a float is written as null."""
    return {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in fields.items()
    }


Sink = Callable[[Event], None]


class EventLog:
    """Append events to `folder/events.jsonl` (when `folder` is given) and pass them to sinks."""

    def __init__(self, folder: Path | None, sinks: Iterable[Sink] = ()):
        self.path = folder / EVENTS_FILE if folder is not None else None
        self.sinks = list(sinks)

    def emit(self, event: Event) -> None:
        if self.path is not None:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(event.to_dict(), sort_keys=True) + "\n")
        for sink in self.sinks:
            sink(event)


def read_events(folder: str | Path) -> list[dict[str, Any]]:
    """Every complete event of a run folder, oldest first; a half-written last line is left."""
    events, _ = _read_from(Path(folder) / EVENTS_FILE, 0)
    return events


def _read_from(path: Path, offset: int) -> tuple[list[dict[str, Any]], int]:
    if not path.is_file():
        return [], offset
    with path.open("rb") as f:
        f.seek(offset)
        data = f.read()
    complete = data[: data.rfind(b"\n") + 1]
    events = [json.loads(line) for line in complete.splitlines() if line.strip()]
    return events, offset + len(complete)


class EventTail:
    """Follow a run's events: each call of `read_new` returns the events written since the last."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / EVENTS_FILE
        self.offset = 0

    def read_new(self) -> list[dict[str, Any]]:
        events, self.offset = _read_from(self.path, self.offset)
        return events


def loss_history(folder: str | Path) -> list[tuple[int, float]]:
    """(step, loss) of every logged step of a run, from its events; a resumed run's repeated
    steps keep the last value written."""
    history = {e["step"]: e["loss"] for e in read_events(folder) if e["event"] == "step"}
    return sorted((s, v) for s, v in history.items() if v is not None)


class StopRequest:
    """Has this run been asked to stop? A `STOP` file in the run folder, or SIGTERM."""

    def __init__(self, folder: Path):
        self.file = folder / STOP_FILE
        self.signalled = False
        self._previous = None

    def __enter__(self) -> StopRequest:
        self.file.unlink(missing_ok=True)  # a stale request from an earlier run is not this one's
        try:
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        except ValueError:  # not the main thread: only the stop file works
            self._previous = None
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        self.file.unlink(missing_ok=True)

    def _on_sigterm(self, signum, frame) -> None:
        self.signalled = True

    def reason(self) -> str | None:
        """Why to stop now, or None to go on."""
        if self.signalled:
            return "SIGTERM"
        if self.file.exists():
            return "stop file"
        return None

    def agreed_reason(self, accelerator) -> str | None:
        """`reason`, agreed by every process: one may see the file a step later than another,
        so all take the answer any of them has (SIGTERM before the file)."""
        reason = self.reason()
        if accelerator.num_processes > 1:
            import torch

            code = torch.tensor([0 if reason is None else 1 + STOP_REASONS.index(reason)])
            code = accelerator.reduce(code.to(accelerator.device), reduction="max")
            reason = None if int(code) == 0 else STOP_REASONS[int(code) - 1]
        return reason


def request_stop(folder: str | Path) -> Path:
    """Ask the run in `folder` to checkpoint and stop at its next step (what `STOP` does)."""
    path = Path(folder) / STOP_FILE
    path.write_text("stop requested\n", encoding="utf-8")
    return path


# --- sinks: the log lines and the trackers, made from the same events ---------------------


def format_duration(seconds: float) -> str:
    """12s, 3m05s, 1h02m: short enough for a log line."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def log_line_sink(event: Event) -> None:
    """The human-readable lines of a run, as `sdtune train` prints them."""
    if isinstance(event, Stepped):
        logger.info(
            "step %d/%d  loss %.4f  lr %.2e  %.1f img/s  %s left",
            event.step,
            event.max_steps,
            event.loss,
            event.lr,
            event.images_per_s,
            format_duration(event.eta_s),
        )
    elif isinstance(event, Validated):
        logger.info("step %d  validation loss %.4f", event.step, event.val_loss)
    elif isinstance(event, CheckpointWritten):
        logger.info("checkpoint %s", event.path)
    elif isinstance(event, SamplesWritten):
        logger.info("sample images %s", event.grid)
    elif isinstance(event, Stopped):
        saved = f"checkpoint {event.checkpoint}" if event.checkpoint else "no checkpoint"
        logger.info(
            "stopped at step %d (%s): %s; continue with train.resume=latest",
            event.step,
            event.reason,
            saved,
        )


def tracker_sink(accelerator) -> Sink:
    """The scalars of step and validation events, to accelerate's trackers (TensorBoard)."""

    def sink(event: Event) -> None:
        if isinstance(event, Stepped):
            logs = {"loss": event.loss, "lr": event.lr, "images_per_s": event.images_per_s}
            if event.grad_norm is not None:
                logs["grad_norm"] = event.grad_norm
            if event.gpu_memory_gb is not None:
                logs["gpu_memory_gb"] = event.gpu_memory_gb
            accelerator.log(logs, step=event.step)
        elif isinstance(event, Validated):
            accelerator.log({"val_loss": event.val_loss}, step=event.step)

    return sink


def progress_bar_sink(bar) -> Sink:
    """A tqdm bar that follows the logged steps, with the loss beside it."""

    def sink(event: Event) -> None:
        if isinstance(event, Stepped):
            bar.update(event.step - bar.n)
            bar.set_postfix(loss=f"{event.loss:.4f}")

    return sink
