"""The diffusion training objective as pure functions of tensors.

Forward process (Ho et al. 2020): x_t = sqrt(a_t) * x_0 + sqrt(1 - a_t) * eps, with a_t the
cumulative product of (1 - beta). The U-Net predicts either eps ("epsilon") or the velocity
v = sqrt(a_t) * eps - sqrt(1 - a_t) * x_0 ("v_prediction", Salimans & Ho 2022, used by SD 2 768-v).
The signal-to-noise ratio of step t is SNR(t) = a_t / (1 - a_t).
"""

from __future__ import annotations

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction")
LOSS_TYPES = ("l2", "huber")


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


def compute_offset_noise(
    noise: torch.Tensor, strength: float, offset: torch.Tensor
) -> torch.Tensor:
    """Offset noise (Guttenberg 2023): add `strength` times one random value per sample and
    channel (`offset`, shaped (B, C, 1, 1)), so the model can learn to change an image's overall
    brightness (very dark or very bright pictures)."""
    return noise + strength * offset


def compute_snr(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    a = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return a / (1 - a)


def compute_min_snr_weights(
    timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float, prediction_type: str
) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023), one per sample.

    The paper weights the x_0 error by min(SNR, gamma). An eps error equals the x_0 error times
    SNR, and a v error times (SNR + 1), so the weight on the eps loss is min(SNR, gamma) / SNR
    and on the v loss min(SNR, gamma) / (SNR + 1).
    """
    snr = compute_snr(timesteps, alphas_cumprod)
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    if prediction_type == "epsilon":
        # SNR is 0 at the last step of a zero-terminal-SNR schedule: the eps loss keeps weight 1.
        return torch.where(snr > 0, clipped / snr.clamp_min(1e-12), torch.ones_like(snr))
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def compute_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Rescale a schedule so its last step is pure noise (Lin et al. 2023, Algorithm 1).

    sqrt(a_t) is shifted so the last value is 0 and scaled so the first value is unchanged.
    Use it with v-prediction: an eps model cannot be trained at SNR 0.
    """
    root = alphas_cumprod.double().sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    return (root**2).to(alphas_cumprod.dtype)


def compute_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor | None = None,
    loss_type: str = "l2",
    huber_c: float = 0.1,
) -> torch.Tensor:
    """Mean error per sample, times its weight, averaged; in fp32 (fp16 squares overflow).

    "l2" is the squared error. "huber" is the pseudo-Huber error 2c(sqrt(d^2 + c^2) - c): like
    L2 near zero and like L1 for large d, so outliers in the data pull less.
    """
    diff = prediction.float() - target.float()
    if loss_type == "l2":
        per_element = diff**2
    elif loss_type == "huber":
        per_element = 2 * huber_c * (torch.sqrt(diff**2 + huber_c**2) - huber_c)
    else:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    per_sample = per_element.reshape(per_element.shape[0], -1).mean(dim=1)
    if weights is not None:
        per_sample = per_sample * weights.float()
    return per_sample.mean()
