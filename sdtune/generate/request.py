"""What to generate, as one value: `GenerationRequest`, checked before any model runs; and the
job around it: `GenerationJob` (model, adapters, output folder) and `SpeedOptions`.

Their fields are the generation options, each declared once with `option()` (default, help,
valid range, section); `sdtune generate`'s flags and the generation form are made from them by
sdtune.generate.schema. An option left unset (None) takes its value from the model or the
adapter when the request is resolved: the family's first mode, the trained prompt length.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sdtune.config import option
from sdtune.errors import SdtuneError
from sdtune.generate.inputs import ImageInput, check_side, read_depth_map, read_image, read_mask
from sdtune.generate.modes import MODES, Mode, check_mode_fits, default_mode, get_mode
from sdtune.generate.schedulers import SCHEDULERS, get_scheduler_choice
from sdtune.models.families import FAMILIES, get_family

logger = logging.getLogger("sdtune.generate")

MAX_SEEDS = 10_000  # a typo like --num-images 1e6 should fail, not run for a week
MAX_TOKEN_LENGTHS = (75, 150, 225)  # 1, 2 or 3 windows of 75 tokens (sdtune.data.prompts)


def _check_mode(value: str, flag: str) -> None:
    get_mode(value)


def _check_scheduler(value: str, flag: str) -> None:
    get_scheduler_choice(value)  # names are case-insensitive and have aliases


def _check_side(value: int, flag: str) -> None:
    check_side(flag, value)


def _check_file(value: Any, flag: str) -> None:
    """A path given as text must name a file (images and arrays in memory are taken as they are)."""
    if isinstance(value, (str, Path)) and not Path(value).is_file():
        raise SdtuneError(f"{flag} '{value}' does not exist")


def _check_size_pair(value: list[int], flag: str) -> None:
    if value and (len(value) != 2 or min(value) < 8):
        raise SdtuneError(f"{flag} takes a width and a height in px, e.g. 1024,1024; got {value}")


def _check_corner(value: list[int], flag: str) -> None:
    if value and (len(value) != 2 or min(value) < 0):
        raise SdtuneError(f"{flag} takes x and y in px from the top left, e.g. 0,0; got {value}")


def _check_config_dir(value: str, flag: str) -> None:
    if not (Path(value) / "model_index.json").is_file():
        raise SdtuneError(f"{flag} '{value}' is not a diffusers folder (no model_index.json)")


def _check_seed_count(value: list[int], flag: str) -> None:
    if len(value) > MAX_SEEDS:
        raise SdtuneError(f"give between 1 and {MAX_SEEDS} seeds, got {len(value)}")


@dataclass
class GenerationRequest:
    """One generation job for any mode; fields a mode does not use are ignored by it.

    Each image depends only on its own seed (one generator per image), so `batch_size` trades
    memory for speed without changing what is drawn up to the rounding of batched kernels: at most
    1/255 in a few values of a PNG (tests/generate/test_outputs_and_options.py holds the bound).
    """

    prompt: str = option("", "what to draw", section="prompt")
    negative_prompt: str = option("", "what to steer away from", section="prompt")
    # Prompt tokens the text encoder sees: 75 (one window, the pipeline's own encoding), or
    # 150/225 in windows of 75 as in training with data.max_token_length (sdtune.data.prompts).
    max_token_length: int | None = option(
        None,
        "prompt tokens: 75, or 150/225 in windows (default: as the adapter was trained, else 75)",
        MAX_TOKEN_LENGTHS,
        section="prompt",
    )
    mode: str | None = option(
        None,
        "what to draw from (default: the model's first mode)",
        tuple(MODES),
        section="mode",
        check=_check_mode,
    )
    image: ImageInput | None = option(
        None,
        "input image (img2img, inpaint, depth2img, upscale)",
        section="mode",
        check=_check_file,
    )
    mask: ImageInput | None = option(
        None, "inpaint mask: white = repaint", section="mode", check=_check_file
    )
    # depth2img: a greyscale file or a (1, H, W) tensor; None = estimate with the family's DPT
    depth_map: ImageInput | Any | None = option(
        None, "depth2img: greyscale depth map, near = bright", section="mode", check=_check_file
    )
    strength: float = option(
        0.8,
        "fraction of the diffusion run redone (img2img, inpaint, depth2img)",
        valid="(0, 1]",
        section="mode",
    )
    noise_level: int = option(
        20, "upscale: noise added to the low-res input", valid="[0, 350]", section="mode"
    )
    steps: int = option(25, "denoising steps", valid="[1, inf)", section="sampling")
    guidance_scale: float = option(
        7.5,
        "classifier-free guidance scale (below 1 turns guidance off)",
        valid="(-inf, inf)",
        section="sampling",
        flag="--guidance",
    )
    seed: int = option(0, "seed of the first image", section="sampling")
    num_images: int = option(
        1, "images to make, seeds seed, seed+1, ...", valid=f"[1, {MAX_SEEDS}]", section="sampling"
    )
    seeds: list[int] = option(
        [],
        "explicit seeds, e.g. 1,7,42 (replace seed and num_images)",
        section="sampling",
        check=_check_seed_count,
    )
    batch_size: int | None = option(
        None,
        "images per pipeline call (default: all at once)",
        valid="[1, inf)",
        section="sampling",
    )
    width: int | None = option(
        None,
        "width in px, a multiple of 8 (default: the model's; other modes follow the image)",
        section="sampling",
        check=_check_side,
    )
    height: int | None = option(
        None, "height in px, a multiple of 8", section="sampling", check=_check_side
    )
    scheduler: str | None = option(
        None,
        "sampler (default: the model's own)",
        tuple(SCHEDULERS),
        section="sampling",
        check=_check_scheduler,
    )
    # Sampling for a model trained with zero terminal SNR (Lin et al. 2023): the rescaled
    # schedule with trailing timesteps, and guidance rescaled by `guidance_rescale` (None: 0.7
    # with zero terminal SNR, else off; text-to-image only, the other pipelines lack it).
    zero_terminal_snr: bool | None = option(
        None,
        "sample for zero terminal SNR: rescaled schedule, trailing timesteps, guidance rescale "
        "(default: as the adapter was trained)",
        section="sampling",
    )
    # What the U-Net predicts. An adapter trained with train.prediction_type on a base of the
    # other kind (SD 1.5 turned to v-prediction, say) samples only with its own.
    prediction_type: str | None = option(
        None,
        "what the U-Net predicts (default: as the adapter was trained, else the model's own)",
        ("epsilon", "v_prediction"),
        section="sampling",
    )
    guidance_rescale: float | None = option(
        None,
        "rescale guidance by this phi (default 0.7 with zero terminal SNR)",
        valid="[0, 1]",
        section="sampling",
    )
    # SDXL's refiner (GenerationJob.refiner) takes over after this fraction of the schedule
    refiner_start: float = option(
        0.8,
        "fraction of the run the base draws before the refiner takes over (with --refiner)",
        valid="(0, 1)",
        section="sampling",
    )
    # SDXL's micro-conditioning (Podell et al. 2023): the sizes and crop the U-Net is told the
    # image has, as training gave it each image's. Width first here; diffusers takes (h, w).
    original_size: list[int] = option(
        [],
        "SDXL: the source size the image claims, W,H (default: the output's size)",
        section="sdxl",
        check=_check_size_pair,
    )
    target_size: list[int] = option(
        [],
        "SDXL: the size it is drawn for, W,H (default: the output's size)",
        section="sdxl",
        check=_check_size_pair,
    )
    crop_top_left: list[int] = option(
        [],
        "SDXL: the top-left corner of the crop it claims, X,Y (default 0,0: uncropped)",
        section="sdxl",
        check=_check_corner,
    )
    aesthetic_score: float = option(
        6.0, "SDXL refiner: the aesthetic score it is conditioned on", valid="[0, 10]",
        section="sdxl",
    )  # fmt: skip
    negative_aesthetic_score: float = option(
        2.5, "SDXL refiner: the score guidance steers away from", valid="[0, 10]",
        section="sdxl",
    )  # fmt: skip
    snapshots: list[float] = option(
        [],
        "fractions of the run to save as a strip, e.g. 0.25,0.5,0.75",
        valid="(0, 1]",
        section="output",
        label="snapshot fractions",
    )
    output_type: str = "pil"  # "pil" images, or "np" float arrays in [0, 1] for exact checks

    @property
    def mode_spec(self) -> Mode:
        return get_mode(self.mode or "txt2img")

    @property
    def all_seeds(self) -> list[int]:
        return seeds_for(self.seed, self.num_images, self.seeds)

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
        raise SdtuneError(f"--num-images must be in [1, {MAX_SEEDS}], got {num_images}")
    return [seed + i for i in range(num_images)]


def resolve_request(req: GenerationRequest, family: str | None = None) -> GenerationRequest:
    """A copy with every unset option given its value: the family's first mode (txt2img
    without a family), the seeds, one call for all images, 75 prompt tokens, no zero SNR."""
    seeds = req.all_seeds
    return replace(
        req,
        mode=req.mode or (default_mode(family) if family else "txt2img"),
        seeds=seeds,
        batch_size=req.batch_size or len(seeds),
        max_token_length=req.max_token_length or 75,
        zero_terminal_snr=bool(req.zero_terminal_snr),
    )


def check_numbers(req: GenerationRequest) -> None:
    """Every declared range and rule of the request's options (no model needed); warns about
    low guidance."""
    from sdtune.generate.schema import check_request

    problems = check_request(req)
    if problems:
        raise SdtuneError(next(iter(problems.values())))
    if req.output_type not in ("pil", "np"):
        raise SdtuneError(f"output_type must be 'pil' or 'np', got '{req.output_type}'")
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


XL_CONDITIONING = (
    "original_size",
    "target_size",
    "crop_top_left",
    "aesthetic_score",
    "negative_aesthetic_score",
)


def _default_of(name: str) -> Any:
    from dataclasses import MISSING, fields

    spec = next(f for f in fields(GenerationRequest) if f.name == name)
    return spec.default_factory() if spec.default is MISSING else spec.default


def prepare_request(req: GenerationRequest, family: str) -> GenerationRequest:
    """Check `req` against the model family and read its files; returns a ready copy."""
    check_numbers(req)
    req = resolve_request(req, family)
    mode = get_mode(req.mode)
    check_mode_fits(mode, family)
    if not get_family(family).is_xl:
        given = [n for n in XL_CONDITIONING if getattr(req, n) != _default_of(n)]
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise SdtuneError(
                f"{flag} is SDXL micro-conditioning; family '{family}' has none (leave it out)"
            )
    for name in mode.required:
        if getattr(req, name) is None:
            flag = name.replace("_", "-")
            raise SdtuneError(f"mode '{mode.name}' needs --{flag}")
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


DTYPE_NAMES = ("fp32", "fp16", "bf16")  # the keys of sdtune.generate.device.DTYPES


def _check_dtype(value: str, flag: str) -> None:
    if value.lower() not in DTYPE_NAMES:
        raise SdtuneError(f"unknown dtype '{value}'; valid dtypes: {', '.join(DTYPE_NAMES)}")


def _check_family(value: str, flag: str) -> None:
    get_family(value)


def _check_adapters(value: list[tuple[str, float]], flag: str) -> None:
    for path, _ in value:
        if not Path(path).exists():
            raise SdtuneError(f"{flag}: adapter '{path}' does not exist")


@dataclass
class SpeedOptions:
    """How the model runs: device, precision and the optional CUDA speed-ups."""

    device: str | None = option(
        None, "cpu, cuda, cuda:N (default: CUDA if present, else the CPU)", section="speed"
    )
    dtype: str | None = option(
        None,
        "precision of the weights (default: fp16 on CUDA, fp32 elsewhere)",
        DTYPE_NAMES,
        section="speed",
        check=_check_dtype,
    )
    compile: bool = option(
        False, "torch.compile the U-Net (adapters get fused first)", section="speed"
    )
    cpu_offload: bool = option(
        False, "keep models on the CPU until used (CUDA; for small GPUs)", section="speed"
    )
    channels_last: bool = option(False, "channels-last memory format", section="speed")


@dataclass
class GenerationJob:
    """What `sdtune generate` runs: a request, the model and adapters, where the PNGs go."""

    request: GenerationRequest = field(default_factory=GenerationRequest)
    model: str | None = option(
        None,
        "base model (folder, hub id or .safetensors); defaults to the adapter's base model",
        section="model",
    )
    family: str | None = option(
        None,
        "model family, if detection needs help",
        tuple(FAMILIES),
        section="model",
        check=_check_family,
    )
    refiner: str | None = option(
        None,
        "SDXL refiner model (folder, hub id or .safetensors) for a second stage",
        section="model",
    )
    # As model.config_dir in training: a single file whose architecture the shipped configs
    # do not describe (a custom fine-tune, a tiny test model) loads with its own configs.
    config_dir: str | None = option(
        None,
        "diffusers folder of the configs a single-file --model of a non-standard "
        "architecture is loaded with",
        section="model",
        check=_check_config_dir,
    )
    lora: list[tuple[str, float]] = option(
        [],
        "an adapter file or run folder, with an optional weight (repeatable)",
        section="adapters",
        metavar="FILE[:WEIGHT]",
        check=_check_adapters,
    )
    fuse: bool = option(False, "fuse the adapters into the weights", section="adapters")
    out: str = option("outputs/images", "folder for the PNGs", section="output")
    speed: SpeedOptions = field(default_factory=SpeedOptions)
