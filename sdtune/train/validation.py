"""A validation loss on held-out images: the same items, noise and noise levels every time,
so its curve moves only when the adapter does (a rising curve while the training loss falls
means the adapter memorises its images)."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from sdtune.data.dataset import ImageCaptionDataset
from sdtune.train.setup import make_collate

NOISE_LEVELS = (0.1, 0.3, 0.5, 0.7, 0.9)  # fractions of the schedule, from light to heavy noise
VALIDATION_DRAW_OFFSET = 1 << 41  # held-out items draw noise far from any training item


def build_validation_loader(samples: list, cfg, tokenizer) -> DataLoader:
    """Held-out items in a fixed order, centre-cropped, unflipped, captions as written."""
    dataset = ImageCaptionDataset(
        samples,
        cfg.data.resolution,
        center_crop=True,
        random_flip=False,
        repeats=1,
        seed=cfg.train.seed,
    )
    return DataLoader(
        dataset,
        batch_size=cfg.train.batch_size,
        shuffle=False,
        collate_fn=make_collate(
            tokenizer,
            max_token_length=cfg.data.max_token_length,
            pixel_keys=cfg.data.cache_latents,
        ),
    )


@torch.no_grad()
def compute_validation_loss(run, loader: DataLoader, step_fn) -> float:
    """Mean loss over the held-out items at each of NOISE_LEVELS (`step_fn` is the loop's own
    loss: the same encode, noise, predict, compare)."""
    from sdtune.train import checkpoint as ckpt

    models = [run.unet, *run.text_encoders.values()]
    rng, modes = ckpt.capture_rng_state(), [m.training for m in models]
    for model in models:
        model.eval()
    last = len(run.objective.alphas_cumprod) - 1
    total, count = 0.0, 0
    for batch in loader:
        batch["draws"] = [VALIDATION_DRAW_OFFSET + d for d in batch["draws"]]
        for level in NOISE_LEVELS:
            loss = step_fn(batch, run, timestep=round(level * last))
            total += loss.item() * len(batch["draws"])
            count += len(batch["draws"])
    for model, mode in zip(models, modes, strict=True):
        model.train(mode)
    ckpt.restore_rng_state(rng)
    return total / max(count, 1)
