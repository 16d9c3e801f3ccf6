"""Sample images during and after training, through the same code as `sdtune generate`.

A sample is the image `sdtune generate` draws with the adapter saved at that step, at the
training precision (`--dtype bf16` for a bf16 run): `generation_precision` puts the pipeline in
that state for the length of the drawing. Three things differ while training and are undone:
accelerate's autocast wrapper (which also hands fp32 outputs to the half-precision VAE), the
adapter's fp32 weights (generate casts them to the pipeline's dtype), and, in fp16, the VAE
(generate keeps it in fp32, where the SD VAE does not overflow).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch

from sdtune.train import checkpoint as ckpt

logger = logging.getLogger("sdtune.train")


@contextmanager
def generation_precision(
    pipe, dtype: torch.dtype, adapter_params: Sequence[torch.nn.Parameter] = ()
) -> Iterator[None]:
    """The pipeline as `sdtune generate --dtype <dtype>` would hold it, for a `with` block."""
    from sdtune.generate.device import vae_in_fp32

    masters = [p.data for p in adapter_params]
    with ExitStack() as stack:
        from sdtune.models.components import Components

        for model in (pipe.unet, *Components.of(pipe).text_encoders):
            stack.enter_context(_without_autocast_wrapper(model))
        if dtype == torch.float16:
            stack.enter_context(vae_in_fp32(pipe.vae))
        try:
            for p in adapter_params:  # the fp32 masters are kept and put back afterwards
                p.data = p.data.to(dtype)
            yield
        finally:
            for p, master in zip(adapter_params, masters, strict=True):
                p.data = master


@contextmanager
def _without_autocast_wrapper(model) -> Iterator[None]:
    """Call the model's own forward: `accelerator.prepare` wraps it in autocast and casts its
    outputs to fp32 (the wrapper is an instance attribute next to `_original_forward`)."""
    original = model.__dict__.get("_original_forward")
    if original is None:
        yield
        return
    # The class's own forward, not the saved bound method: transformers 5 models called through
    # the saved method return no hidden_states, which SDXL's prompt encoding reads.
    wrapped = model.__dict__.pop("forward")
    try:
        yield
    finally:
        model.forward = wrapped


def save_samples(run, stem: str) -> Path:
    """Sample images of every prompt through the same code as `sdtune generate`, as PNGs, a grid
    and a TensorBoard image. The RNG state is untouched, so sampling does not change training."""
    from sdtune.generate.outputs import save_grid, save_png
    from sdtune.generate.run import build_generation_params

    cfg, pipe = run.cfg, run.pipe
    rng = ckpt.capture_rng_state()
    was_training = run.unet.training
    run.unet.eval()
    folder, images, first = run.out / "samples", [], None
    for i, prompt in enumerate(cfg.output.sample_prompts):
        with torch.no_grad(), generation_precision(pipe, run.dtype, run.trainable):
            request, result = _draw_sample(run, prompt)
            params = build_generation_params(
                pipe, request, result, cfg.model.path, [(str(run.out), 1.0)], 0
            )
        params.extra["Training step"] = str(run.progress.step)
        save_png(result.images[0], folder, params, stem=f"{stem}-prompt{i}")
        images.append(result.images[0])
        first = first or params
    run.unet.train(was_training)
    ckpt.restore_rng_state(rng)
    grid = save_grid(images, folder, stem, first)
    _log_image(run, grid)
    return grid


def _draw_sample(run, prompt: str):
    """(request, result) of one image through `sdtune generate`'s own path, with the settings
    `sdtune generate` reads from the adapter; an inpainting model repaints a blank canvas whole
    (its text-to-image)."""
    from PIL import Image

    from sdtune.generate.run import GenerationRequest, generate

    cfg, size = run.cfg, run.cfg.data.resolution
    request = GenerationRequest(
        prompt=prompt,
        steps=cfg.output.sample_steps,
        seeds=[cfg.output.sample_seed],
        width=size,
        height=size,
        max_token_length=cfg.data.max_token_length,  # prompts encoded as captions were
        prediction_type=run.objective.prediction_type,
        zero_terminal_snr=cfg.train.zero_terminal_snr,
    )
    if run.family.takes_inpaint_inputs:
        request.mode = "inpaint"
        request.image = Image.new("RGB", (size, size), (127, 127, 127))
        request.mask = Image.new("L", (size, size), 255)
        request.strength = 1.0
    return request, generate(run.pipe, request)


def _log_image(run, path: Path) -> None:
    import numpy as np
    from PIL import Image

    tracker = run.accelerator.get_tracker("tensorboard", unwrap=True)
    if hasattr(tracker, "add_image"):
        pixels = np.asarray(Image.open(path).convert("RGB"))
        tracker.add_image("samples", pixels, run.progress.step, dataformats="HWC")
