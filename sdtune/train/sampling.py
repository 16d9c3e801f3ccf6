"""Sample images during and after training, through the same code as `sdtune generate`."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from sdtune.train import checkpoint as ckpt

logger = logging.getLogger("sdtune.train")


def save_samples(run, stem: str) -> Path:
    """Sample images of every prompt through the same code as `sdtune generate`, as PNGs, a grid
    and a TensorBoard image. The RNG state is untouched, so sampling does not change training."""
    from sdtune.generate.outputs import GenerationParams, save_grid, save_png

    cfg, pipe = run.cfg, run.pipe
    rng = ckpt.capture_rng_state()
    size, steps, seed = cfg.data.resolution, cfg.output.sample_steps, cfg.output.sample_seed
    was_training = run.unet.training
    run.unet.eval()
    folder, images = run.out / "samples", []
    for i, prompt in enumerate(cfg.output.sample_prompts):
        with torch.no_grad():
            image = _draw_sample(run, prompt, steps, seed, size)
        params = GenerationParams(
            prompt=prompt,
            steps=steps,
            seed=seed,
            width=size,
            height=size,
            scheduler=type(pipe.scheduler).__name__,
            model=cfg.model.path,
        )
        save_png(image, folder, params, stem=f"{stem}-prompt{i}")
        images.append(image)
    run.unet.train(was_training)
    ckpt.restore_rng_state(rng)
    grid = save_grid(images, folder, stem)
    _log_image(run, grid)
    return grid


def _draw_sample(run, prompt: str, steps: int, seed: int, size: int):
    """One image through `sdtune generate`'s own path; an inpainting model repaints a blank
    canvas whole (its text-to-image)."""
    from PIL import Image

    from sdtune.generate.run import GenerationRequest, generate

    request = GenerationRequest(
        prompt=prompt,
        steps=steps,
        seeds=[seed],
        width=size,
        height=size,
        max_token_length=run.cfg.data.max_token_length,  # prompts encoded as captions were
    )
    if run.family.unet_in_channels == 9:
        request.mode = "inpaint"
        request.image = Image.new("RGB", (size, size), (127, 127, 127))
        request.mask = Image.new("L", (size, size), 255)
        request.strength = 1.0
    return generate(run.pipe, request).images[0]


def _log_image(run, path: Path) -> None:
    import numpy as np
    from PIL import Image

    tracker = run.accelerator.get_tracker("tensorboard", unwrap=True)
    if hasattr(tracker, "add_image"):
        pixels = np.asarray(Image.open(path).convert("RGB"))
        tracker.add_image("samples", pixels, run.progress.step, dataformats="HWC")
