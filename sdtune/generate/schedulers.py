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


def scheduler_label(pipe: Any, name: str | None) -> tuple[str, str]:
    """(Sampler, Schedule type) for the PNG text: A1111 names if chosen, else the class name."""
    if name is None:
        return type(pipe.scheduler).__name__, ""
    choice = get_scheduler_choice(name)
    return choice.a1111_sampler, choice.a1111_schedule
