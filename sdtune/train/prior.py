"""Class images for prior preservation: use the user's, and draw the missing ones with the base
model, so a DreamBooth run needs nothing but the subject's photos and a class prompt."""

from __future__ import annotations

import logging
from pathlib import Path

from sdtune.config import RunConfig
from sdtune.data.images import IMAGE_EXTENSIONS
from sdtune.data.sources import Sample, scan_image_folder
from sdtune.errors import SdtuneError

logger = logging.getLogger("sdtune.train")

CLASS_IMAGE_STEPS = 25  # denoising steps of each drawn class image (sdtune generate's default)


def ensure_class_images(pipe, cfg: RunConfig, is_main_process: bool) -> int:
    """Generate class images until `data.num_class_images` exist; returns how many were made.

    New files get fresh names (class-00012.png); nothing already in the folder is touched.
    """
    import torch

    from sdtune.generate.engine import run_request
    from sdtune.generate.outputs import save_png
    from sdtune.generate.request import GenerationRequest
    from sdtune.generate.run import build_generation_params
    from sdtune.train.sampling import generation_precision

    folder, d = Path(cfg.data.class_dir), cfg.data
    have = (
        [p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS]
        if folder.is_dir()
        else []
    )
    missing = d.num_class_images - len(have)
    if missing <= 0 or not is_main_process:
        return 0
    logger.info("drawing %d class images for '%s' into %s", missing, d.class_prompt, folder)
    size, seed0 = d.resolution, cfg.train.seed + len(have)
    for k in range(missing):
        # What `sdtune generate --model BASE --seed S --dtype <training precision>` draws.
        request = GenerationRequest(
            prompt=d.class_prompt,
            steps=CLASS_IMAGE_STEPS,
            seeds=[seed0 + k],
            width=size,
            height=size,
        )
        with torch.no_grad(), generation_precision(pipe, pipe.unet.dtype):
            result = run_request(pipe, request)
            params = build_generation_params(pipe, request, result, cfg.model.path, [], 0)
        save_png(result.images[0], folder, params, stem=f"class-{len(have) + k:05d}")
    return missing


def scan_class_images(cfg: RunConfig) -> list[Sample]:
    """Every class image, captioned with the class prompt (their sidecars are not used)."""
    report = scan_image_folder(cfg.data.class_dir, caption_ext=".no-sidecars")
    if report.skipped:
        logger.warning("class images: %s", report.summary())
    if not report.samples:
        raise SdtuneError(f"data.class_dir '{cfg.data.class_dir}' holds no usable image")
    return [Sample(s.image_path, cfg.data.class_prompt) for s in report.samples]
