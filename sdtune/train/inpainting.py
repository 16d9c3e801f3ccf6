"""Inputs of an inpainting U-Net (9 channels: noisy latents, mask, latents of the masked image).

Training draws a random mask per item, as the SD inpainting models were trained: mostly a
rectangle to repaint, sometimes the whole image (so plain text-to-image keeps working). The mask
comes from the item's own generator, like its noise, so it is the same in a resumed run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FULL_MASK_CHANCE = 0.25  # share of items whose whole image is repainted


def build_random_masks(
    generators: list[torch.Generator], height: int, width: int, device
) -> torch.Tensor:
    """(B, 1, H, W) masks, 1 = repaint: a random rectangle of 10-70% per side, or everything."""
    masks = torch.zeros(len(generators), 1, height, width, device=device)
    for i, gen in enumerate(generators):
        u = torch.rand(5, generator=gen, device=gen.device).tolist()
        if u[0] < FULL_MASK_CHANCE:
            masks[i] = 1
            continue
        h, w = int(height * (0.1 + 0.6 * u[1])), int(width * (0.1 + 0.6 * u[2]))
        top, left = int((height - h) * u[3]), int((width - w) * u[4])
        masks[i, :, top : top + h, left : left + w] = 1
    return masks


def build_inpainting_channels(
    vae, pixels: torch.Tensor, generators: list[torch.Generator], latent_shape: torch.Size
) -> torch.Tensor:
    """The 5 extra U-Net input channels: the mask at latent size and the masked image's latents."""
    masks = build_random_masks(generators, pixels.shape[-2], pixels.shape[-1], pixels.device)
    masked = pixels * (masks < 0.5).to(pixels.dtype)  # repainted pixels become 0 (mid-grey)
    with torch.no_grad():
        masked_latents = vae.encode(masked).latent_dist.sample(generator=generators)
    masked_latents = masked_latents * vae.config.scaling_factor
    small_masks = F.interpolate(masks, size=latent_shape[-2:], mode="nearest")
    return torch.cat([small_masks.to(masked_latents.dtype), masked_latents], dim=1)
