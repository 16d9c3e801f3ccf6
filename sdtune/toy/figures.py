"""Pictures the demo writes: a labelled before/after grid and a loss curve, drawn with PIL
(so no plotting library is needed), and the loss history read back from a run's events.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from sdtune.errors import SdtuneError


def read_loss_history(run_dir: str | Path) -> list[tuple[int, float]]:
    """(step, loss) pairs logged by a training run, from its `events.jsonl`."""
    from sdtune.train.events import loss_history

    history = loss_history(run_dir)
    if not history:
        raise SdtuneError(f"no logged loss in {Path(run_dir) / 'events.jsonl'}")
    return history


def _moving_average(values: np.ndarray, window: int) -> np.ndarray:
    if len(values) < window:
        return values
    kernel = np.ones(window) / window
    head = np.array([values[: i + 1].mean() for i in range(window - 1)])
    return np.concatenate([head, np.convolve(values, kernel, mode="valid")])


def save_loss_curve(history: list[tuple[int, float]], path: str | Path, title: str = "") -> Path:
    """A 640x400 PNG: logged losses in grey, their moving average in blue, step and loss axes."""
    width, height, left, right, top, bottom = 640, 400, 64, 16, 32, 40
    steps = np.array([s for s, _ in history], dtype=float)
    losses = np.array([v for _, v in history], dtype=float)
    lo, hi = float(losses.min()), float(losses.max())
    hi = hi if hi > lo else lo + 1e-6
    x0, x1 = steps.min(), max(steps.max(), steps.min() + 1)

    def point(step: float, loss: float) -> tuple[float, float]:
        x = left + (step - x0) / (x1 - x0) * (width - left - right)
        y = top + (hi - loss) / (hi - lo) * (height - top - bottom)
        return x, y

    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.rectangle((left, top, width - right, height - bottom), outline="black")
    for frac in (0.0, 0.5, 1.0):
        value = lo + frac * (hi - lo)
        y = point(x0, value)[1]
        draw.text((4, y - 6), f"{value:.4f}", fill="black")
        step = x0 + frac * (x1 - x0)
        x = point(step, lo)[0]
        draw.text((x - 12, height - bottom + 6), f"{int(step)}", fill="black")
    draw.text((width // 2 - 16, height - 18), "step", fill="black")
    draw.text((left, 10), title or "training loss", fill="black")
    if len(history) > 1:
        draw.line(
            [point(s, v) for s, v in zip(steps, losses, strict=True)], fill=(180, 180, 180), width=1
        )
        smooth = _moving_average(losses, max(1, len(losses) // 10))
        draw.line(
            [point(s, v) for s, v in zip(steps, smooth, strict=True)], fill=(30, 80, 200), width=2
        )
    path = Path(path)
    img.save(path)
    return path


def save_before_after_grid(
    before: list[Image.Image], after: list[Image.Image], path: str | Path, scale: int = 2
) -> Path:
    """Two labelled rows: the base model's images above, the fine-tuned model's below."""
    if not before or len(before) != len(after):
        raise SdtuneError("the before/after grid needs the same, non-zero number of images")
    side = before[0].width * scale
    label_w = 56
    grid = Image.new("RGB", (label_w + side * len(before), 2 * side), "white")
    draw = ImageDraw.Draw(grid)
    for row, (label, images) in enumerate((("before", before), ("after", after))):
        draw.text((6, row * side + side // 2 - 6), label, fill="black")
        for col, image in enumerate(images):
            tile = image.resize((side, side), Image.NEAREST)
            grid.paste(tile, (label_w + col * side, row * side))
    path = Path(path)
    grid.save(path)
    return path
