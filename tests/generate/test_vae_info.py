"""VAE tools and parameter tables."""

from __future__ import annotations

import pytest
import torch

from sdtune.errors import SdtuneError
from sdtune.generate import vae as tools
from sdtune.generate.info import count_parameters, format_info_table
from tests.generate.conftest import tiny


def test_encode_save_load_decode_and_report(tmp_path, rgb64):
    vae = tiny("sd1").vae
    enc = tools.encode_image(vae, rgb64)
    assert enc.mean.shape == (1, 4, 8, 8) and (enc.variance > 0).all()
    path = tools.save_latents(enc, tmp_path / "z.safetensors")
    with pytest.raises(SdtuneError, match="already exists"):
        tools.save_latents(enc, path)
    back = tools.load_latents(path)
    torch.testing.assert_close(back.latents(), enc.latents())
    assert tools.decode_to_image(vae, back.latents()).size == (64, 64)
    report, restored = tools.reconstruction_report(vae, rgb64)
    assert report.compression_ratio == 48  # 64*64*3 / (4*8*8)
    assert report.mse > 0 and restored.size == (64, 64)  # a random VAE reconstructs badly
    with pytest.raises(SdtuneError, match="multiples of 8"):
        tools.encode_image(vae, rgb64.resize((60, 60)))
    (tmp_path / "bad.safetensors").write_text("x")
    with pytest.raises(SdtuneError, match="not a latents file"):
        tools.load_latents(tmp_path / "bad.safetensors")


def test_parameter_table_adds_up():
    pipe = tiny("sd2-depth")
    infos = count_parameters(pipe)
    names = {c.name for c in infos}
    assert {"unet", "vae", "text_encoder", "depth_estimator"} <= names
    for comp in infos:
        assert sum(comp.by_layer_type.values()) == comp.parameters
    table = format_info_table(infos)
    total = sum(p.numel() for c in ("unet", "vae", "text_encoder", "depth_estimator")
                for p in getattr(pipe, c).parameters())  # fmt: skip
    assert f"{total:,}" in table.splitlines()[-1]


def test_full_size_sd15_counted_on_the_meta_device():
    from sdtune.generate.info import load_for_info

    pipe, title = load_for_info("sd1")
    unet = next(c for c in count_parameters(pipe) if c.name == "unet")
    assert unet.parameters == 859_520_964 and "full-size" in title
