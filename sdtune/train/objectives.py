"""The diffusion training objective as pure functions of tensors.

Forward process (Ho et al. 2020): x_t = sqrt(a_t) * x_0 + sqrt(1 - a_t) * eps, with a_t the
cumulative product of (1 - beta). The U-Net predicts either eps ("epsilon") or the velocity
v = sqrt(a_t) * eps - sqrt(1 - a_t) * x_0 ("v_prediction", Salimans & Ho 2022, used by SD 2 768-v).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PREDICTION_TYPES = ("epsilon", "v_prediction")


def _per_sample(values: torch.Tensor, timesteps: torch.Tensor, ndim: int) -> torch.Tensor:
    picked = values.to(timesteps.device)[timesteps].float()
    return picked.reshape(-1, *([1] * (ndim - 1)))


def compute_noisy_latents(
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
) -> torch.Tensor:
    """x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps, per sample."""
    a = _per_sample(alphas_cumprod, timesteps, latents.ndim)
    return (a.sqrt() * latents.float() + (1 - a).sqrt() * noise.float()).to(latents.dtype)


def compute_target(
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: str,
) -> torch.Tensor:
    """What the U-Net should output: the noise, or the velocity for v-prediction."""
    if prediction_type == "epsilon":
        return noise.float()
    if prediction_type == "v_prediction":
        a = _per_sample(alphas_cumprod, timesteps, latents.ndim)
        return a.sqrt() * noise.float() - (1 - a).sqrt() * latents.float()
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def compute_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error in fp32 (fp16 squares overflow)."""
    return F.mse_loss(prediction.float(), target.float(), reduction="mean")
