"""The SDXL refiner as a second stage: the base denoises the first part of the run, the refiner
the rest ("ensemble of expert denoisers", Podell et al. 2023 sec. 2.5).

The base stops at `refiner_start` of the schedule (diffusers' `denoising_end`) and hands over
its latents, still noisy; the refiner, an image-to-image model conditioned on OpenCLIP bigG
alone and an aesthetic score, continues from there (`denoising_start`) over the same steps. An
inpainting run keeps its mask in the second stage: the refiner runs as diffusers' SDXL
inpainting pipeline over the same mask (its 4-channel U-Net blends the known region back in).
"""

from __future__ import annotations

from typing import Any

from sdtune.errors import SdtuneError
from sdtune.generate.request import GenerationRequest

BASES = ("sdxl", "sdxl-inpaint")  # the families a refiner can follow
REFINER = "sdxl-refiner"
MODES = ("txt2img", "img2img", "inpaint")  # the modes with a second stage


def check_refiner_families(base: str, refiner: str | None, where: str = "--refiner") -> None:
    """A clear error unless an SDXL base is followed by an SDXL refiner model."""
    if base not in BASES:
        raise SdtuneError(
            f"{where} needs an SDXL base model ({' or '.join(BASES)}), but the base model is "
            f"'{base}'; drop {where} or use an SDXL base"
        )
    if refiner is not None and refiner != REFINER:
        raise SdtuneError(
            f"{where} must be an SDXL refiner model (family {REFINER}), but it is '{refiner}'; "
            "give the refiner (e.g. stabilityai/stable-diffusion-xl-refiner-1.0)"
        )


def check_refiner_mode(mode: str | None) -> None:
    if mode is not None and mode not in MODES:
        raise SdtuneError(f"--refiner works with {', '.join(MODES)}, not mode '{mode}'")


def check_refiner_request(req: GenerationRequest, base: str, refiner: str) -> None:
    """Everything about a two-stage run that can be checked before drawing."""
    check_refiner_families(base, refiner)
    if not 0.0 < req.refiner_start < 1.0:
        raise SdtuneError(f"--refiner-start must be in (0, 1), got {req.refiner_start}")
    check_refiner_mode(req.mode)
    if req.snapshots:
        raise SdtuneError("--snapshots are not taken across a refiner's stage; drop one of them")
    if req.mode != "txt2img" and req.strength <= 1.0 - req.refiner_start:
        raise SdtuneError(
            f"with --strength {req.strength:g} the base would draw nothing before the refiner "
            f"takes over at {req.refiner_start:g}; give --strength above "
            f"{1.0 - req.refiner_start:g} or a smaller --refiner-start"
        )


def refiner_pipeline(refiner: Any, mode: str) -> Any:
    """The refiner as diffusers' SDXL image-to-image pipeline (inpainting pipeline for an
    inpainting run), sharing its weights."""
    import diffusers

    name = "StableDiffusionXL" + ("InpaintPipeline" if mode == "inpaint" else "Img2ImgPipeline")
    if type(refiner).__name__ == name:
        return refiner
    view = getattr(diffusers, name).from_pipe(refiner)
    view.set_progress_bar_config(disable=True)
    return view


def run_two_stages(
    base: Any, refiner: Any, req: GenerationRequest, kwargs: dict[str, Any]
) -> list[Any]:
    """The images of one pipeline call's `kwargs` (sdtune.generate.engine), drawn by the base
    up to `req.refiner_start` and by the refiner from there. Each image keeps its own generator
    through both stages, so it depends on its seed alone."""
    import torch

    from sdtune.generate.engine import (
        takes_guidance_rescale,
        xl_conditioning_kwargs,
        xl_prompt_kwargs,
    )

    latents = base(**{**kwargs, "output_type": "latent", "denoising_end": req.refiner_start})
    second = refiner_pipeline(refiner, req.mode)
    n = len(kwargs["generator"])
    refine: dict[str, Any] = {
        **xl_prompt_kwargs(second, req, n),
        **xl_conditioning_kwargs(second, req),
        "image": latents.images,
        "denoising_start": req.refiner_start,
        "num_inference_steps": req.steps,
        "guidance_scale": req.guidance_scale,
        "generator": kwargs["generator"],
        "output_type": req.output_type,
    }
    if req.mode == "inpaint":  # the mask is read at the output's size, not the model's own
        refine.update(mask_image=kwargs["mask_image"], width=kwargs["width"])
        refine["height"] = kwargs["height"]
    if "guidance_rescale" in kwargs and takes_guidance_rescale(second):
        refine["guidance_rescale"] = kwargs["guidance_rescale"]
    with torch.no_grad():
        return list(second(**refine).images)
