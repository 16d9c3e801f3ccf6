"""The logged loss is the mean over the optimizer step's items, however the batch is split."""

import pytest

from sdtune.config import load_config
from sdtune.train.loop import train


def _last_loss(tiny_sd1_dir, star_images, out, batch: int, accumulation: int) -> float:
    cfg = load_config(
        None,
        {
            "model.path": str(tiny_sd1_dir),
            "data.dir": str(star_images),
            "data.resolution": 32,
            "lora.rank": 2,
            "train.max_steps": 1,
            "train.batch_size": batch,
            "train.gradient_accumulation_steps": accumulation,
            "train.log_every_n_steps": 1,
            "output.dir": str(out),
            "output.log_with": "none",
        },
    )
    return train(cfg).last_loss


def test_accumulated_micro_batches_log_the_loss_of_the_whole_batch(
    tiny_sd1_dir, star_images, tmp_path
):
    whole = _last_loss(tiny_sd1_dir, star_images, tmp_path / "b4", 4, 1)
    split = _last_loss(tiny_sd1_dir, star_images, tmp_path / "b2x2", 2, 2)
    singles = _last_loss(tiny_sd1_dir, star_images, tmp_path / "b1x4", 1, 4)
    # The same four items with the same draws: only the batched kernels' rounding differs.
    assert split == pytest.approx(whole, rel=1e-4)
    assert singles == pytest.approx(whole, rel=1e-4)
