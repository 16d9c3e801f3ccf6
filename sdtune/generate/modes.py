"""The table of generation modes: which diffusers pipeline runs each, what it needs, who can.

One row per mode instead of one module per mode: the shared path (loading, adapters, seeds,
saving) reads this table, so adding a mode is adding a row. A plain 4-channel model can inpaint
too: diffusers' inpainting pipeline runs a 4-channel U-Net by blending the known latents back in
after each step (the "latent-mask" fallback), which is weaker at seams than a 9-channel model.

SDXL runs the same modes through diffusers' SDXL pipelines (`xl_pipeline_class`); the SDXL
refiner on its own is an image-to-image model (its usual place is the second stage of a run,
sdtune.generate.refiner).
"""

from __future__ import annotations

from dataclasses import dataclass

from sdtune.errors import SdtuneError
from sdtune.models.families import get_family

_PLAIN = ("sd1", "sd2-base", "sd2-v", "sdxl")
_INPAINT = ("sd1-inpaint", "sd2-inpaint", "sdxl-inpaint")


@dataclass(frozen=True)
class Mode:
    """One generation mode: its pipeline, the request fields it needs, the families that can."""

    name: str
    pipeline_class: str  # diffusers class, reached from the loaded base with `from_pipe`
    required: tuple[str, ...]  # GenerationRequest fields that must be set
    families: tuple[str, ...]
    description: str
    # request field -> pipeline keyword, for the fields this mode passes on
    arguments: tuple[tuple[str, str], ...] = ()
    xl_pipeline_class: str | None = None  # the diffusers class for SDXL families

    def pipeline_class_for(self, family: str) -> str:
        """The diffusers pipeline class that runs this mode on a model of `family`."""
        if get_family(family).is_xl and self.xl_pipeline_class is not None:
            return self.xl_pipeline_class
        return self.pipeline_class


MODES: dict[str, Mode] = {
    m.name: m
    for m in (
        Mode(
            "txt2img",
            "StableDiffusionPipeline",
            (),
            _PLAIN,
            "text to image",
            (("width", "width"), ("height", "height")),
            "StableDiffusionXLPipeline",
        ),
        Mode(
            "img2img",
            "StableDiffusionImg2ImgPipeline",
            ("image",),
            (*_PLAIN, "sdxl-refiner"),
            "a reference image redrawn from `strength` of the way into the diffusion run",
            (("image", "image"), ("strength", "strength")),
            "StableDiffusionXLImg2ImgPipeline",
        ),
        Mode(
            "inpaint",
            "StableDiffusionInpaintPipeline",
            ("image", "mask"),
            _INPAINT + _PLAIN,
            "repaint the white part of a mask (plain models: latent-mask fallback)",
            (("image", "image"), ("mask", "mask_image"), ("strength", "strength")),
            "StableDiffusionXLInpaintPipeline",
        ),
        Mode(
            "depth2img",
            "StableDiffusionDepth2ImgPipeline",
            ("image",),
            ("sd2-depth",),
            "an image redrawn keeping its depth (given, or estimated by the family's DPT model)",
            (("image", "image"), ("depth_map", "depth_map"), ("strength", "strength")),
        ),
        Mode(
            "upscale",
            "StableDiffusionUpscalePipeline",
            ("image",),
            ("sd2-upscale",),
            "x4 upscaling of a low-resolution image, guided by the prompt",
            (("image", "image"), ("noise_level", "noise_level")),
        ),
    )
}


def get_mode(name: str) -> Mode:
    """The mode called `name`; a bad name lists the valid ones."""
    mode = MODES.get(name)
    if mode is None:
        raise SdtuneError(f"unknown mode '{name}'; valid modes: {', '.join(MODES)}")
    return mode


def modes_of_family(family: str) -> list[str]:
    """The modes a model family can run, in table order."""
    return [m.name for m in MODES.values() if family in m.families]


def check_mode_fits(mode: Mode, family: str) -> None:
    """A clear error when the model's family cannot run the mode (depth on SD 1, ...)."""
    if family in mode.families:
        return
    raise SdtuneError(
        f"mode '{mode.name}' needs a model of family {' or '.join(mode.families)}, but this "
        f"model is '{family}', which can do: {', '.join(modes_of_family(family)) or 'nothing'}"
    )


def default_mode(family: str) -> str:
    """The mode to run when none is asked for: the family's first (txt2img, inpaint, ...)."""
    return modes_of_family(family)[0]
