"""Snapshots of the backward diffusion: the latents decoded at chosen fractions of the run.

A step callback copies the latents after the chosen steps; they are decoded once the run is
over, so the run itself is untouched and the final images are identical with or without
snapshots. What is shown is the current noisy sample x_t, the classic picture of noise turning
into an image.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image


class SnapshotRecorder:
    """Keeps the latents after the steps nearest to the given fractions of the run."""

    def __init__(self, fractions: list[float]):
        self.fractions = sorted(set(fractions))
        self.latents: list[tuple[float, torch.Tensor]] = []

    def wanted(self, step: int, total: int) -> list[float]:
        """The fractions whose step (1-based, rounded, at least 1) is `step + 1`."""
        return [f for f in self.fractions if max(1, round(f * total)) == step + 1]

    def on_step_end(self, pipe: Any, step: int, timestep: Any, kwargs: dict) -> dict:
        """diffusers' `callback_on_step_end` signature."""
        total = getattr(pipe, "_num_timesteps", None) or len(pipe.scheduler.timesteps)
        for fraction in self.wanted(step, total):
            self.latents.append((fraction, kwargs["latents"].detach().clone()))
        return {}

    def legacy_callback(self, pipe: Any) -> Any:
        """The older `callback(step, timestep, latents)` form, for the x4 upscaler."""

        def callback(step: int, timestep: Any, latents: torch.Tensor) -> None:
            self.on_step_end(pipe, step, timestep, {"latents": latents})

        return callback

    def decode(self, pipe: Any) -> list[list[Image.Image]]:
        """Per image of the batch, its snapshots in order of fraction."""
        if not self.latents:
            return []
        per_step = [decode_latents(pipe, latents) for _, latents in self.latents]
        return [list(images) for images in zip(*per_step, strict=True)]


@torch.no_grad()
def decode_latents(pipe: Any, latents: torch.Tensor) -> list[Image.Image]:
    """PIL images of (scaled) latents through the pipeline's VAE and image processor."""
    vae = pipe.vae
    scaled = latents / vae.config.scaling_factor
    image = vae.decode(scaled.to(device=vae.device, dtype=vae.dtype)).sample
    return pipe.image_processor.postprocess(image.float(), output_type="pil")


def make_strip(images: list[Image.Image]) -> Image.Image:
    """Images side by side, resized to the last one's size (the upscaler grows the image)."""
    w, h = images[-1].size
    strip = Image.new("RGB", (w * len(images), h), "white")
    for i, image in enumerate(images):
        strip.paste(image.resize((w, h)) if image.size != (w, h) else image, (i * w, 0))
    return strip
