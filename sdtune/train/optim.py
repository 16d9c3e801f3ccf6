"""Optimizers by name. The 8-bit ones come from bitsandbytes; where it cannot run, the error
says so and names the 32-bit choice - sdtune never switches optimizer behind the user's back."""

from __future__ import annotations

import torch

from sdtune.errors import SdtuneError

OPTIMIZERS = ("adamw", "adamw8bit", "lion8bit", "adafactor", "sgd")


def build_optimizer(
    name: str,
    param_groups: list[dict],
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    momentum: float = 0.9,
) -> torch.optim.Optimizer:
    """An optimizer over `param_groups` (each group carries its own "lr")."""
    if name == "adamw":
        # fused kernels step all tensors at once on CUDA; the CPU takes the foreach path.
        fused = all(p.is_cuda for g in param_groups for p in g["params"])
        return torch.optim.AdamW(
            param_groups, betas=betas, weight_decay=weight_decay, fused=fused or None
        )
    if name == "sgd":
        return torch.optim.SGD(param_groups, momentum=momentum, weight_decay=weight_decay)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        # A fixed learning rate from the config, not Adafactor's own relative-step schedule.
        return Adafactor(
            param_groups,
            scale_parameter=False,
            relative_step=False,
            warmup_init=False,
            weight_decay=weight_decay,
        )
    if name in ("adamw8bit", "lion8bit"):
        bnb = _import_bitsandbytes(name)
        cls = bnb.optim.AdamW8bit if name == "adamw8bit" else bnb.optim.Lion8bit
        lion_betas = (0.9, 0.99)  # Lion's published defaults; Adam's betas do not carry over
        return cls(
            param_groups,
            betas=betas if name == "adamw8bit" else lion_betas,
            weight_decay=weight_decay,
        )
    raise SdtuneError(f"train.optimizer must be one of {', '.join(OPTIMIZERS)}; got {name!r}")


def _import_bitsandbytes(name: str):
    try:
        import bitsandbytes as bnb
    except Exception as exc:  # ImportError, or a CUDA-library error raised while importing
        raise SdtuneError(
            f"train.optimizer={name} needs bitsandbytes, which cannot run here ({exc}); "
            "install bitsandbytes for this machine or use train.optimizer=adamw"
        ) from None
    return bnb
