import pytest
import torch
from diffusers import DDPMScheduler

from sdtune.train.objectives import (
    compute_loss,
    compute_min_snr_weights,
    compute_noisy_latents,
    compute_offset_noise,
    compute_target,
    compute_zero_terminal_snr,
)


def test_exact_values_on_a_hand_computed_case():
    alphas_cumprod = torch.tensor([0.64, 0.36])  # sqrt: 0.8 / 0.6, and sqrt(1 - a): 0.6 / 0.8
    x0 = torch.full((1, 1, 1, 1), 2.0)
    eps = torch.full((1, 1, 1, 1), 1.0)
    t = torch.tensor([1])
    assert (
        compute_noisy_latents(x0, eps, t, alphas_cumprod).item()
        == torch.tensor(0.6 * 2 + 0.8 * 1).item()
    )
    assert compute_target(x0, eps, t, alphas_cumprod, "epsilon").item() == 1.0
    v = compute_target(x0, eps, t, alphas_cumprod, "v_prediction").item()
    assert abs(v - (0.6 * 1 - 0.8 * 2)) < 1e-6
    assert compute_loss(torch.tensor([1.0, 3.0]), torch.tensor([0.0, 0.0])).item() == 5.0


def test_matches_diffusers_scheduler_math():
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    t = torch.tensor([0, 500, 999])
    ours = compute_noisy_latents(x0, eps, t, scheduler.alphas_cumprod)
    torch.testing.assert_close(ours, scheduler.add_noise(x0, eps, t))
    v = compute_target(x0, eps, t, scheduler.alphas_cumprod, "v_prediction")
    torch.testing.assert_close(v, scheduler.get_velocity(x0, eps, t))


def test_min_snr_weights_exact():
    alphas_cumprod = torch.tensor([0.8, 0.5, 0.2])  # SNR 4, 1, 0.25
    t = torch.tensor([0, 1, 2])
    eps = compute_min_snr_weights(t, alphas_cumprod, gamma=1.0, prediction_type="epsilon")
    v = compute_min_snr_weights(t, alphas_cumprod, gamma=1.0, prediction_type="v_prediction")
    torch.testing.assert_close(eps, torch.tensor([0.25, 1.0, 1.0]))
    torch.testing.assert_close(v, torch.tensor([0.2, 0.5, 0.2]))
    big_gamma = compute_min_snr_weights(t, alphas_cumprod, gamma=100.0, prediction_type="epsilon")
    torch.testing.assert_close(big_gamma, torch.ones(3))  # gamma above every SNR: plain loss


def test_min_snr_is_finite_at_zero_terminal_snr():
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    zts = compute_zero_terminal_snr(scheduler.alphas_cumprod)
    w = compute_min_snr_weights(torch.tensor([999]), zts, 5.0, "epsilon")
    assert torch.isfinite(w).all() and w.item() == 1.0
    assert compute_min_snr_weights(torch.tensor([999]), zts, 5.0, "v_prediction").item() == 0.0


def test_zero_terminal_snr_matches_the_paper_algorithm_in_diffusers():
    from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    expected = torch.cumprod(1.0 - rescale_zero_terminal_snr(scheduler.betas), dim=0)
    ours = compute_zero_terminal_snr(scheduler.alphas_cumprod)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-5)
    assert ours[-1] == 0 and abs(ours[0] - scheduler.alphas_cumprod[0]) < 1e-7


def test_offset_noise_adds_one_value_per_sample_and_channel():
    offset = torch.randn(2, 4, 1, 1, generator=torch.Generator().manual_seed(0))
    out = compute_offset_noise(torch.zeros(2, 4, 8, 8), 0.1, offset)
    torch.testing.assert_close(out, (0.1 * offset).expand(2, 4, 8, 8))


def test_loss_types_and_weights_exact():
    pred, target = torch.tensor([[3.0**0.5], [0.0]]), torch.zeros(2, 1)
    assert compute_loss(pred, target).item() == pytest.approx(1.5)  # (3 + 0) / 2
    # pseudo-Huber with c = 1 at d = sqrt(3): 2 * (sqrt(3 + 1) - 1) = 2
    assert compute_loss(pred, target, loss_type="huber", huber_c=1.0).item() == pytest.approx(1.0)
    weighted = compute_loss(pred, target, weights=torch.tensor([2.0, 5.0]))
    assert weighted.item() == pytest.approx(3.0)  # (3 * 2 + 0 * 5) / 2
