"""Schedulers by name, the way users know them from A1111 and civitai.

Each name maps to a diffusers scheduler class and config overrides; switching keeps the base
model's own scheduler settings (betas, prediction type, timestep spacing), so an SD 2 768-v
model stays v-prediction whatever sampler is picked.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any

from sdtune.errors import SdtuneError


@dataclass(frozen=True)
class SchedulerChoice:
    """A named sampler: the diffusers class, config overrides and the A1111 names."""

    class_name: str
    a1111_sampler: str
    a1111_schedule: str = ""  # A1111's "Schedule type" (Karras, ...) when it is not the default
    overrides: dict[str, Any] = field(default_factory=dict)


SCHEDULERS: dict[str, SchedulerChoice] = {
    "ddim": SchedulerChoice("DDIMScheduler", "DDIM"),
    "pndm": SchedulerChoice("PNDMScheduler", "PLMS"),
    "lms": SchedulerChoice("LMSDiscreteScheduler", "LMS"),
    "euler": SchedulerChoice("EulerDiscreteScheduler", "Euler"),
    "euler-a": SchedulerChoice("EulerAncestralDiscreteScheduler", "Euler a"),
    "dpm++2m": SchedulerChoice(
        "DPMSolverMultistepScheduler", "DPM++ 2M", overrides={"algorithm_type": "dpmsolver++"}
    ),
    "dpm++2m-karras": SchedulerChoice(
        "DPMSolverMultistepScheduler",
        "DPM++ 2M",
        "Karras",
        {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True},
    ),
    "unipc": SchedulerChoice("UniPCMultistepScheduler", "UniPC"),
}

_ALIASES = {"euler_a": "euler-a", "euler-ancestral": "euler-a", "dpmpp-2m": "dpm++2m"}


def get_scheduler_choice(name: str) -> SchedulerChoice:
    """The scheduler called `name` (case-insensitive); a bad name lists the valid ones."""
    key = _ALIASES.get(name.lower(), name.lower())
    choice = SCHEDULERS.get(key)
    if choice is None:
        raise SdtuneError(f"unknown scheduler '{name}'; valid schedulers: {', '.join(SCHEDULERS)}")
    if choice.class_name == "LMSDiscreteScheduler" and importlib.util.find_spec("scipy") is None:
        raise SdtuneError("scheduler 'lms' needs scipy (pip install scipy); or pick another")
    return choice


def set_scheduler(pipe: Any, name: str) -> SchedulerChoice:
    """Replace `pipe.scheduler` with the named one, built from the current scheduler's config."""
    import diffusers

    choice = get_scheduler_choice(name)
    cls = getattr(diffusers, choice.class_name)
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **choice.overrides)
    return choice


# Samplers A1111 knows that sdtune does not offer by name, for a model that ships with one.
_OTHER_A1111_NAMES = {"DDPMScheduler": "DDPM", "HeunDiscreteScheduler": "Heun"}


def a1111_name_of(scheduler: Any) -> tuple[str, str]:
    """(Sampler, Schedule type) of a scheduler instance, by the table above: its class and,
    where one class has several entries, its config (Karras sigmas). Unknown classes keep
    their class name without the `Scheduler` suffix."""
    name = type(scheduler).__name__
    karras = bool(getattr(scheduler.config, "use_karras_sigmas", False))
    for choice in SCHEDULERS.values():
        if choice.class_name == name and bool(choice.overrides.get("use_karras_sigmas")) == karras:
            return choice.a1111_sampler, choice.a1111_schedule
    return _OTHER_A1111_NAMES.get(name, name.removesuffix("Scheduler")), ""


def scheduler_label(pipe: Any, name: str | None) -> tuple[str, str]:
    """(Sampler, Schedule type) for the PNG text, in A1111's names: of the chosen scheduler,
    or of the model's own when none was chosen."""
    if name is None:
        return a1111_name_of(pipe.scheduler)
    choice = get_scheduler_choice(name)
    return choice.a1111_sampler, choice.a1111_schedule


# Lin et al. 2023 (Common Diffusion Noise Schedules and Sample Steps are Flawed), Sec. 3.4:
# classifier-free guidance rescaled by phi = 0.7 against over-exposure at zero terminal SNR.
ZERO_TERMINAL_SNR_GUIDANCE_RESCALE = 0.7


def use_zero_terminal_snr(pipe: Any, chosen: str | None) -> str:
    """Sample as Lin et al. 2023 do for a model trained with zero terminal SNR: the noise
    schedule rescaled to SNR 0 at its last step, and timesteps spaced from that last step
    ("trailing"), so the first step starts from pure noise as in training. A scheduler that
    cannot rescale (PNDM, LMS) is replaced by DDIM unless it was `chosen`; returns the name of
    the scheduler class used."""
    import inspect

    import diffusers

    cls = type(pipe.scheduler)
    if "rescale_betas_zero_snr" not in inspect.signature(cls.__init__).parameters:
        if chosen is not None:
            able = [n for n, c in SCHEDULERS.items() if c.class_name not in _NO_ZERO_SNR]
            raise SdtuneError(
                f"scheduler '{chosen}' cannot sample with zero terminal SNR; use one of "
                f"{', '.join(able)}, or --no-zero-terminal-snr"
            )
        cls = diffusers.DDIMScheduler
    if pipe.scheduler.config.get("prediction_type") == "epsilon":
        raise SdtuneError(
            "zero terminal SNR needs a v-prediction model (an epsilon model cannot denoise "
            "from SNR 0, Lin et al. 2023); pass --no-zero-terminal-snr"
        )
    pipe.scheduler = cls.from_config(
        pipe.scheduler.config, rescale_betas_zero_snr=True, timestep_spacing="trailing"
    )
    return cls.__name__


_NO_ZERO_SNR = ("PNDMScheduler", "LMSDiscreteScheduler")
