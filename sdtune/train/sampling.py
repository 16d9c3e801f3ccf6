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
    logger.info("sample images %s", grid)
    return grid


def _draw_sample(run, prompt: str, steps: int, seed: int, size: int):
    """One image; an inpainting model repaints a blank canvas whole (text-to-image for it)."""
    from PIL import Image

    from sdtune.generate.txt2img import generate_images

    if run.family.unet_in_channels != 9:
        return generate_images(run.pipe, prompt, steps=steps, seed=seed, width=size, height=size)[0]
    generator = torch.Generator(run.pipe.device).manual_seed(seed)
    canvas, mask = (
        Image.new("RGB", (size, size), (127, 127, 127)),
        Image.new("L", (size, size), 255),
    )
    return run.pipe(
        prompt=prompt,
        image=canvas,
        mask_image=mask,
        num_inference_steps=steps,
        generator=generator,
        height=size,
        width=size,
    ).images[0]


def _log_image(run, path: Path) -> None:
    import numpy as np
    from PIL import Image

    tracker = run.accelerator.get_tracker("tensorboard", unwrap=True)
    if hasattr(tracker, "add_image"):
        pixels = np.asarray(Image.open(path).convert("RGB"))
        tracker.add_image("samples", pixels, run.progress.step, dataformats="HWC")
