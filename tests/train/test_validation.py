"""The validation loss: held-out images, fixed noise and noise levels, no effect on training."""

import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sdtune.config import load_config
from sdtune.data.sources import split_validation
from sdtune.train.loop import train


def test_split_is_seeded_and_keeps_at_least_one_of_each():
    items = list(range(10))
    train_a, held_a = split_validation(items, 0.2, seed=3)
    assert split_validation(items, 0.2, seed=3) == (train_a, held_a)
    assert len(held_a) == 2 and sorted(train_a + held_a) == items
    assert split_validation(items, 0.0, seed=3) == (items, [])
    assert len(split_validation([1, 2], 0.9, seed=0)[0]) == 1


def test_validation_loss_is_logged_and_changes_nothing(tiny_sd1_dir, star_images, tmp_path):
    def run(name, every):
        return train(
            load_config(
                None,
                {
                    "model.path": str(tiny_sd1_dir),
                    "data.dir": str(star_images),
                    "data.resolution": 64,
                    "data.validation_split": 0.25,
                    "train.batch_size": 2,
                    "train.max_steps": 4,
                    "train.learning_rate": 1e-3,
                    "output.validation_every_n_steps": every,
                    "output.dir": str(tmp_path / name),
                },
            )
        )

    quiet, checked = run("quiet", 0), run("checked", 2)
    first, second = load_file(str(quiet.adapter_path)), load_file(str(checked.adapter_path))
    assert all(torch.equal(first[k], second[k]) for k in first)
    logs = next((tmp_path / "checked").rglob("events.out.tfevents.*")).parent
    values = EventAccumulator(str(logs)).Reload().Scalars("val_loss")
    assert [v.step for v in values] == [2, 4] and all(v.value > 0 for v in values)
    # The final value is a pure function of the adapter: the quiet run's last check equals it.
    quiet_logs = next((tmp_path / "quiet").rglob("events.out.tfevents.*")).parent
    quiet_final = EventAccumulator(str(quiet_logs)).Reload().Scalars("val_loss")[-1].value
    assert quiet_final == values[-1].value
