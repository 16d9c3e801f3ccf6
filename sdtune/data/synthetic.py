"""A small rendered image set: coloured shapes on plain backgrounds, with captions.

It gives the demo and the tests a real folder of images and sidecars without any download.
Rendering is seeded, so the same call writes the same files everywhere.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 40),
    "purple": (140, 60, 190),
}
BACKGROUNDS = {"white": (245, 245, 245), "black": (20, 20, 20), "grey": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle", "star", "ring")


def _polygon(shape: str, cx: float, cy: float, r: float, turn: float) -> list[tuple[float, float]]:
    if shape == "square":
        corners, radii = 4, [r * 1.2]
    elif shape == "triangle":
        corners, radii = 3, [r * 1.3]
    else:  # star: alternate outer and inner points
        corners, radii = 10, [r * 1.3, r * 0.55]
    points = []
    for i in range(corners):
        angle = turn + 2 * math.pi * i / corners
        radius = radii[i % len(radii)]
        points.append((cx + radius * math.sin(angle), cy - radius * math.cos(angle)))
    return points


@dataclass(frozen=True)
class Pose:
    """How much a shape may vary: radius as a fraction of the image size, centre offset
    (`jitter`, a fraction of the size; None = anywhere the shape fits) and turn in radians
    (`turn`, at most this far either way; None = any turn, stars 0 to 0.3)."""

    radius: tuple[float, float] = (0.22, 0.3)
    jitter: float | None = None
    turn: float | None = None


def render_shape(
    shape: str,
    colour: str,
    background: str,
    size: int,
    rng: random.Random,
    pose: Pose = Pose(),
) -> Image.Image:
    """One shape of `colour` on a `background`, at a random position, size and rotation."""
    img = Image.new("RGB", (size, size), BACKGROUNDS[background])
    draw = ImageDraw.Draw(img)
    r = size * rng.uniform(*pose.radius)
    if pose.jitter is None:
        low, high = r * 1.3, size - r * 1.3
    else:
        low, high = size / 2 - pose.jitter * size, size / 2 + pose.jitter * size
    cx = rng.uniform(low, high)
    cy = rng.uniform(low, high)
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=COLOURS[colour])
    elif shape == "ring":  # a disc with a hole of half its radius
        outer, inner = r * 1.1, r * 0.55
        draw.ellipse((cx - outer, cy - outer, cx + outer, cy + outer), fill=COLOURS[colour])
        draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=BACKGROUNDS[background])
    else:
        if pose.turn is not None:
            turn = rng.uniform(-pose.turn, pose.turn)
        else:
            turn = rng.uniform(0, 2 * math.pi) if shape != "star" else rng.uniform(0, 0.3)
        draw.polygon(_polygon(shape, cx, cy, r, turn), fill=COLOURS[colour])
    return img


def write_shape_dataset(
    folder: str | Path,
    shape: str = "star",
    count: int = 8,
    size: int = 64,
    trigger: str = "",
    seed: int = 0,
    pose: Pose = Pose(),
) -> list[Path]:
    """Render `count` images of `shape` in mixed colours, each with a `.txt` caption sidecar."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for i in range(count):
        colour = rng.choice(sorted(COLOURS))
        background = rng.choice(sorted(BACKGROUNDS))
        img = render_shape(shape, colour, background, size, rng, pose)
        path = folder / f"{shape}_{i:03d}.png"
        img.save(path)
        subject = f"{trigger} {shape}" if trigger else shape
        path.with_suffix(".txt").write_text(
            f"a {colour} {subject} on a {background} background\n", encoding="utf-8"
        )
        paths.append(path)
    return paths
