"""LoRA target presets select the modules they name, and every kind of adapter reloads exactly."""

import numpy as np
import pytest
import torch

from sdtune.adapters.io import save_adapter
from sdtune.config import load_config
from sdtune.errors import SdtuneError
from sdtune.models.tiny import build_tiny_pipeline
from sdtune.train.setup import add_lora_adapters


def _adapted(pipe, model_name: str) -> set[str]:
    model = getattr(pipe, model_name)
    return {name for name, module in model.named_modules() if hasattr(module, "lora_A")}


def _with_lora(**overrides):
    pipe = build_tiny_pipeline("sd1")
    cfg = load_config(None, {"model.path": "m", "data.dir": "d", **overrides})
    add_lora_adapters(pipe, cfg)
    return pipe


@pytest.mark.parametrize(
    "preset,must_have,must_not_have",
    [
        ("attn", {"attn1.to_q", "attn2.to_out.0"}, {"ff.net.2", "conv1"}),
        ("cross-attn", {"attn2.to_k"}, {"attn1.to_q", "ff.net.2"}),
        ("attn-ff", {"attn1.to_v", "ff.net.0.proj", "ff.net.2", "proj_in"}, {"conv1"}),
        ("locon", {"attn2.to_q", "conv1", "conv2", "downsamplers.0.conv"}, {"ff.net.2"}),
    ],
)
def test_unet_presets_select_their_modules(preset, must_have, must_not_have):
    names = _adapted(_with_lora(**{"lora.unet_targets": preset}), "unet")
    for suffix in must_have:
        assert any(n.endswith(suffix) for n in names), f"{preset} misses {suffix}"
    for suffix in must_not_have:
        assert not any(n.endswith(suffix) for n in names), f"{preset} should not adapt {suffix}"


def test_regex_and_explicit_lists_and_text_encoder_presets():
    pipe = _with_lora(
        **{
            "lora.unet_targets": r"re:.*attn2\.to_k",
            "lora.train_text_encoder": "true",
            "lora.text_encoder_targets": "attn-mlp",
        }
    )
    assert _adapted(pipe, "unet") and all(n.endswith("attn2.to_k") for n in _adapted(pipe, "unet"))
    te = _adapted(pipe, "text_encoder")
    assert any(n.endswith("mlp.fc1") for n in te) and any(
        n.endswith("self_attn.q_proj") for n in te
    )
    explicit = _adapted(_with_lora(**{"lora.unet_targets": "to_v, proj_out"}), "unet")
    assert all(n.endswith(("to_v", "proj_out")) for n in explicit)


def test_targets_that_match_nothing_name_the_presets():
    with pytest.raises(SdtuneError, match="no U-Net module matches.*attn, cross-attn"):
        _with_lora(**{"lora.unet_targets": "to_qq"})
    with pytest.raises(SdtuneError, match="not a valid regular expression"):
        _with_lora(**{"lora.unet_targets": "re:(("})


def _images(pipe):
    gen = torch.Generator().manual_seed(0)
    return pipe("a sks star", num_inference_steps=3, generator=gen, output_type="np").images


@pytest.mark.parametrize(
    "overrides",
    [
        {
            "lora.unet_targets": "locon",
            "lora.train_text_encoder": "true",
            "lora.text_encoder_targets": "attn-mlp",
            "lora.text_encoder_rank": "2",
            "lora.text_encoder_alpha": "1",
            "lora.init": "kaiming",
        },
        {"lora.use_dora": "true", "lora.rank": "4", "lora.alpha": "8"},
    ],
    ids=["locon-te-mlp", "dora"],
)
def test_every_adapter_kind_reloads_in_diffusers_to_the_same_images(overrides, tmp_path):
    pipe = _with_lora(**overrides)
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a trained adapter: non-zero B (and moved DoRA magnitudes)
        for name, param in pipe.unet.named_parameters():
            if "lora_B" in name or "lora_magnitude" in name:
                param.add_(torch.randn(param.shape, generator=gen) * 0.3)
        for name, param in pipe.text_encoder.named_parameters():
            if "lora_B" in name:
                param.add_(torch.randn(param.shape, generator=gen) * 0.3)
    expected = _images(pipe)
    te = pipe.text_encoder if "lora.train_text_encoder" in overrides else None
    path = save_adapter(tmp_path, pipe.unet, te, {"family": "sd1"})
    fresh = build_tiny_pipeline("sd1")
    fresh.set_progress_bar_config(disable=True)
    base = _images(fresh)
    fresh.load_lora_weights(str(path))
    np.testing.assert_allclose(_images(fresh), expected, atol=1e-5)
    assert np.abs(base - expected).max() > 1e-2
