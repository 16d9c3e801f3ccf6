"""Did a LoRA teach the toy base its held-out concept, and did the base keep what it knew?

Two numbers, each over many seeds, measured by the toy classifier on generated images:

- concept rate: the share of trigger-word prompts ("a red sks ring on a white background")
  whose image shows the held-out shape. The base has never seen a ring, so it is near 0.
- retention: the share of held-in prompts ("a blue square on a grey background") whose image
  shows the asked shape, and the asked colour. A LoRA that teaches rings by turning every
  shape into a ring loses these.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from sdtune.errors import SdtuneError
from sdtune.toy.world import (
    HELD_IN_SHAPES,
    HELD_OUT_SHAPE,
    UNSEEN_SHAPES,
    Scene,
    all_scenes,
)

EVAL_STEPS = 25
EVAL_GUIDANCE = 7.5


@dataclass
class ToyScores:
    """Rates in [0, 1]; `images` is how many images each rate was measured on."""

    concept_rate: float | None  # trigger prompts showing the held-out shape (None: no trigger)
    concept_colour_rate: float | None  # ... in the asked colour
    shape_rate: float  # held-in prompts showing the asked shape
    colour_rate: float  # held-in prompts showing the asked colour
    concept_images: int
    held_in_images: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def draw(
    pipe: Any,
    prompts: list[str],
    seeds: list[int],
    steps: int = EVAL_STEPS,
    guidance_scale: float = EVAL_GUIDANCE,
    batch_size: int = 32,
) -> list[Any]:
    """One image per (prompt, seed) pair as uint8 arrays; each image depends only on its seed."""
    import torch

    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = slice(start, start + batch_size)
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds[chunk]]
        out = pipe(
            prompt=prompts[chunk],
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=generators,
            output_type="np",
        ).images
        images.extend((out * 255).round().clip(0, 255).astype("uint8"))
    return images


def prompt_grid(scenes: list[Scene], seeds_per_prompt: int, trigger: str = "", seed: int = 0):
    """(scenes, prompts, seeds): every scene repeated with its own run of seeds."""
    rows = [(s, seed + 1000 * i + k) for i, s in enumerate(scenes) for k in range(seeds_per_prompt)]
    return [r[0] for r in rows], [r[0].caption(trigger) for r in rows], [r[1] for r in rows]


def score_toy_model(
    pipe: Any,
    trigger: str = "",
    seeds_per_prompt: int = 4,
    steps: int = EVAL_STEPS,
    guidance_scale: float = EVAL_GUIDANCE,
    seed: int = 0,
    concept: str = HELD_OUT_SHAPE,
) -> ToyScores:
    """Concept rate (if `trigger`) and held-in shape/colour rates of a loaded toy pipeline.

    Held-in prompts: all 45 (shape, colour, background) captions; concept prompts: the 15
    `concept` captions (the ring, or the star) with the trigger word before the shape. Each gets
    `seeds_per_prompt` seeds.
    """
    if concept not in UNSEEN_SHAPES:
        raise SdtuneError(
            f"concept '{concept}' is not a held-out shape of the toy world: {list(UNSEEN_SHAPES)}"
        )
    from sdtune.toy.measure import classify, load_classifier

    net = load_classifier()
    pipe.set_progress_bar_config(disable=True)
    scenes, prompts, seeds = prompt_grid(all_scenes(HELD_IN_SHAPES), seeds_per_prompt, seed=seed)
    found = classify(net, draw(pipe, prompts, seeds, steps, guidance_scale))
    shape_rate = sum(f[0] == s.shape for f, s in zip(found, scenes, strict=True)) / len(scenes)
    colour_rate = sum(f[1] == s.colour for f, s in zip(found, scenes, strict=True)) / len(scenes)
    concept_rate = concept_colour = None
    concept_count = 0
    if trigger:
        concepts, prompts, seeds = prompt_grid(
            all_scenes((concept,)), seeds_per_prompt, trigger, seed=seed + 500
        )
        found = classify(net, draw(pipe, prompts, seeds, steps, guidance_scale))
        concept_rate = sum(f[0] == concept for f in found) / len(found)
        concept_colour = sum(f[1] == s.colour for f, s in zip(found, concepts, strict=True)) / len(
            found
        )
        concept_count = len(found)
    return ToyScores(
        concept_rate, concept_colour, shape_rate, colour_rate, concept_count, len(scenes)
    )


def format_scores(label: str, scores: ToyScores) -> str:
    """One line: '<label>  concept 92%  shape 95%  colour 98%  (60 + 180 images)'."""
    concept = "" if scores.concept_rate is None else f"concept {scores.concept_rate:4.0%}  "
    return (
        f"{label:<8} {concept}shape {scores.shape_rate:4.0%}  colour {scores.colour_rate:4.0%}"
        f"  ({scores.concept_images} + {scores.held_in_images} images)"
    )
