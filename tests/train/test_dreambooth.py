"""DreamBooth with prior preservation: class images drawn when missing, the prior loss weighted."""

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from sdtune.config import load_config
from sdtune.errors import SdtuneError
from sdtune.train.loop import train


def _cfg(tiny_sd1_dir, star_images, out, **overrides):
    values = {
        "model.path": str(tiny_sd1_dir),
        "data.dir": str(star_images),
        "data.resolution": 64,
        "lora.rank": 4,
        "train.batch_size": 2,
        "train.max_steps": 3,
        "train.learning_rate": 1e-3,
        "output.dir": str(out),
    }
    return load_config(None, {**values, **overrides})


def test_class_images_are_drawn_and_the_prior_loss_is_weighted(tiny_sd1_dir, star_images, tmp_path):
    classes = tmp_path / "class"
    classes.mkdir()
    Image.new("RGB", (64, 64), "blue").save(classes / "mine.png")  # the user's own class image
    mine = (classes / "mine.png").read_bytes()
    prior = {
        "data.class_dir": str(classes),
        "data.class_prompt": "a star",
        "data.num_class_images": 3,
    }
    weighted = train(_cfg(tiny_sd1_dir, star_images, tmp_path / "w1", **prior))
    made = sorted(p.name for p in classes.iterdir())
    assert made == ["class-00001.png", "class-00002.png", "mine.png"]
    assert (classes / "mine.png").read_bytes() == mine
    assert "a star" in Image.open(classes / "class-00001.png").text["parameters"]

    # With prior_loss_weight 0 the class half adds nothing: the result equals plain training.
    zero = train(
        _cfg(
            tiny_sd1_dir, star_images, tmp_path / "w0", **prior, **{"train.prior_loss_weight": 0.0}
        )
    )
    plain = train(_cfg(tiny_sd1_dir, star_images, tmp_path / "plain"))
    a, b, c = (load_file(str(r.adapter_path)) for r in (zero, plain, weighted))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=2e-5, rtol=1e-3)
    assert any((c[k] - b[k]).abs().max() > 1e-4 for k in c)  # weight 1: the prior pulls
    assert len(list(classes.iterdir())) == 3  # enough class images now: none drawn again


def test_class_dir_needs_a_class_prompt(tiny_sd1_dir, star_images, tmp_path):
    with pytest.raises(SdtuneError, match="data.class_prompt is required"):
        _cfg(tiny_sd1_dir, star_images, tmp_path / "x", **{"data.class_dir": str(tmp_path)})
