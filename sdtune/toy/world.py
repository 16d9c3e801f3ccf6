"""Scenes of the toy world: one coloured shape on a plain background, with its caption.

The base model is trained on the held-in shapes only; the held-out shape (the ring) is what a
LoRA teaches later, so whether it was learned can be measured. Rendering is seeded and takes
well under a millisecond per 64 px image.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from sdtune.data.synthetic import BACKGROUNDS, COLOURS, Pose, render_shape

HELD_IN_SHAPES = ("circle", "square", "triangle")
# Never in the base's training set. The demo teaches the ring: a disc with a hole, a new shape
# the base can learn from few images. The star is a second, harder one (five thin points, about
# one latent pixel wide at 8x8 latents); LoRAs on this base draw it about half the time.
UNSEEN_SHAPES = ("ring", "star")
HELD_OUT_SHAPE = UNSEEN_SHAPES[0]
# Every shape, in the order of the shipped classifier's outputs.
ALL_SHAPES = (*HELD_IN_SHAPES, "star", "ring")
COLOUR_NAMES = tuple(sorted(COLOURS))
BACKGROUND_NAMES = tuple(sorted(BACKGROUNDS))
TOY_RESOLUTION = 64
# The toy world's poses: near the centre (within 6 px), radius 15-19 px, turned at most 14
# degrees either way. Narrow enough that a 3 M-parameter U-Net trained for half an hour on a CPU
# draws crisp shapes; the classifier is trained on the much wider default pose (anywhere, any
# turn), so it also judges shapes a model draws off-centre or turned.
TOY_POSE = Pose(radius=(0.24, 0.3), jitter=0.1, turn=0.25)


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str

    def caption(self, trigger: str = "") -> str:
        """'a red circle on a white background'; a trigger word goes right before the shape."""
        subject = f"{trigger} {self.shape}" if trigger else self.shape
        return f"a {self.colour} {subject} on a {self.background} background"


def sample_scenes(count: int, shapes: tuple[str, ...], rng: random.Random) -> list[Scene]:
    """`count` scenes with shape, colour and background drawn uniformly."""
    return [
        Scene(rng.choice(shapes), rng.choice(COLOUR_NAMES), rng.choice(BACKGROUND_NAMES))
        for _ in range(count)
    ]


def render_scenes(
    scenes: list[Scene], rng: random.Random, size: int = TOY_RESOLUTION, pose: Pose = TOY_POSE
) -> np.ndarray:
    """The scenes as a uint8 array (count, size, size, 3); position, size, turn come from `rng`."""
    images = [
        np.asarray(render_shape(s.shape, s.colour, s.background, size, rng, pose)) for s in scenes
    ]
    return np.stack(images)


def all_scenes(shapes: tuple[str, ...]) -> list[Scene]:
    """Every (shape, colour, background) combination of `shapes`, in a fixed order."""
    return [Scene(s, c, b) for s in shapes for c in COLOUR_NAMES for b in BACKGROUND_NAMES]
