import torch
from diffusers import DDPMScheduler

from sdtune.train.objectives import compute_loss, compute_noisy_latents, compute_target


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
