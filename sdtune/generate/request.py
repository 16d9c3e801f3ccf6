"""What to generate, as one value: `GenerationRequest`, checked before any model runs."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any

from sdtune.data.prompts import MAX_TOKEN_LENGTHS
from sdtune.errors import SdtuneError
from sdtune.generate.inputs import ImageInput, check_side, read_depth_map, read_image, read_mask
from sdtune.generate.modes import Mode, check_mode_fits, get_mode

logger = logging.getLogger("sdtune.generate")

MAX_SEEDS = 10_000  # a typo like --num-images 1e6 should fail, not run for a week


@dataclass
class GenerationRequest:
    """One generation job for any mode; fields a mode does not use are ignored by it.

    Each image depends only on its own seed (one generator per image), so `batch_size` trades
    memory for speed without changing what is drawn up to the rounding of batched kernels: at most
    1/255 in a few values of a PNG (tests/generate/test_outputs_and_options.py holds the bound).
    """

    prompt: str = ""
    mode: str = "txt2img"
    negative_prompt: str = ""
    steps: int = 25
    guidance_scale: float = 7.5
    seeds: list[int] = field(default_factory=lambda: [0])
    batch_size: int = 1  # images per pipeline call
    width: int | None = None  # txt2img; other modes follow the input image
    height: int | None = None
    image: ImageInput | None = None  # img2img, inpaint, depth2img, upscale
    mask: ImageInput | None = None  # inpaint: white = repaint
    depth_map: Any = None  # depth2img: None = estimate with the family's DPT model
    strength: float = 0.8  # fraction of the diffusion run redone (img2img, inpaint, depth)
    noise_level: int = 20  # upscale: noise added to the low-res image (0..350)
    scheduler: str | None = None  # a name from sdtune.generate.schedulers; None keeps the model's
    snapshots: list[float] = field(default_factory=list)  # fractions of the run to decode
    output_type: str = "pil"  # "pil" images, or "np" float arrays in [0, 1] for exact checks
    # Prompt tokens the text encoder sees: 75 (one window, the pipeline's own encoding), or
    # 150/225 in windows of 75 as in training with data.max_token_length (sdtune.data.prompts).
    max_token_length: int = 75
    # Sampling for a model trained with zero terminal SNR (Lin et al. 2023): the rescaled
    # schedule with trailing timesteps, and guidance rescaled by `guidance_rescale` (None: 0.7
    # with zero terminal SNR, else off; text-to-image only, the other pipelines lack it).
    zero_terminal_snr: bool = False
    guidance_rescale: float | None = None

    @property
    def mode_spec(self) -> Mode:
        return get_mode(self.mode)

    @property
    def effective_guidance_rescale(self) -> float:
        if self.guidance_rescale is not None:
            return self.guidance_rescale
        from sdtune.generate.schedulers import ZERO_TERMINAL_SNR_GUIDANCE_RESCALE

        return ZERO_TERMINAL_SNR_GUIDANCE_RESCALE if self.zero_terminal_snr else 0.0


def seeds_for(seed: int = 0, num_images: int = 1, seeds: list[int] | None = None) -> list[int]:
    """Explicit seeds, or seed, seed+1, ... for `num_images` images."""
    if seeds:
        return [int(s) for s in seeds]
    if num_images < 1 or num_images > MAX_SEEDS:
        raise SdtuneError(f"--num-images must be between 1 and {MAX_SEEDS}, got {num_images}")
    return [seed + i for i in range(num_images)]


def check_numbers(req: GenerationRequest) -> None:
    """Counts, sizes and fractions in range (no model needed); warns about low guidance."""
    if req.steps < 1:
        raise SdtuneError(f"--steps must be at least 1, got {req.steps}")
    if req.batch_size < 1:
        raise SdtuneError(f"--batch-size must be at least 1, got {req.batch_size}")
    if not req.seeds or len(req.seeds) > MAX_SEEDS:
        raise SdtuneError(f"give between 1 and {MAX_SEEDS} seeds, got {len(req.seeds)}")
    check_side("width", req.width)
    check_side("height", req.height)
    if not 0.0 < req.strength <= 1.0:
        raise SdtuneError(f"--strength must be in (0, 1], got {req.strength}")
    if not 0 <= req.noise_level <= 350:
        raise SdtuneError(f"--noise-level must be between 0 and 350, got {req.noise_level}")
    if req.max_token_length not in MAX_TOKEN_LENGTHS:
        raise SdtuneError(f"--max-token-length must be 75, 150 or 225, got {req.max_token_length}")
    if req.guidance_rescale is not None and not 0.0 <= req.guidance_rescale <= 1.0:
        raise SdtuneError(f"--guidance-rescale must be in [0, 1], got {req.guidance_rescale}")
    if req.output_type not in ("pil", "np"):
        raise SdtuneError(f"output_type must be 'pil' or 'np', got '{req.output_type}'")
    for fraction in req.snapshots:
        if not 0.0 < fraction <= 1.0:
            raise SdtuneError(f"snapshot fractions must be in (0, 1], got {fraction}")
    if req.guidance_scale < 1.0:
        logger.warning(
            "guidance scale %g is below 1: classifier-free guidance is off, so the negative "
            "prompt is ignored and images degrade; typical values are 5-9",
            req.guidance_scale,
        )


def _resize_to_request(image: Any, req: GenerationRequest) -> Any:
    """Input images follow --width/--height when given (their own size otherwise)."""
    if req.width is None and req.height is None:
        return image
    size = (req.width or image.width, req.height or image.height)
    return image if image.size == size else image.resize(size)


def prepare_request(req: GenerationRequest, family: str) -> GenerationRequest:
    """Check `req` against the model family and read its files; returns a ready copy."""
    mode = get_mode(req.mode)
    check_mode_fits(mode, family)
    check_numbers(req)
    for name in mode.required:
        if getattr(req, name) is None:
            flag = name.replace("_", "-")
            raise SdtuneError(f"mode '{mode.name}' needs --{flag}")
    if req.scheduler is not None:
        from sdtune.generate.schedulers import get_scheduler_choice

        get_scheduler_choice(req.scheduler)
    updates: dict[str, Any] = {}
    if "image" in dict(mode.arguments) and req.image is not None:
        image = read_image(req.image)
        if mode.name != "upscale":
            image = _resize_to_request(image, req)
        updates["image"] = image
        if mode.name == "inpaint":
            updates["mask"] = read_mask(req.mask, image.size)
        if mode.name == "depth2img" and req.depth_map is not None:
            updates["depth_map"] = read_depth_map(req.depth_map, image.size)
    return replace(req, **updates)
