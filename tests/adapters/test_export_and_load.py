"""Round trips between layouts on tiny models: every path gives the same images or weights."""

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sdtune.adapters import formats
from sdtune.adapters.export import export_diffusers, export_kohya
from sdtune.adapters.inspect import inspect_adapter
from sdtune.adapters.io import save_adapter
from sdtune.adapters.load import attach_adapter, model_modules, read_adapter
from sdtune.config import load_config
from sdtune.errors import SdtuneError
from sdtune.generate.txt2img import load_adapters
from sdtune.models.tiny import build_tiny_pipeline
from sdtune.train.setup import add_lora_adapters

LIVE_ATOL = 1e-5  # same math, different order of float operations


def _images(pipe):
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(0)
    return pipe("a sks star", num_inference_steps=3, generator=gen, output_type="np").images


def trained_adapter(folder, seed=1, family="sd1", **overrides):
    """A tiny adapter with non-zero B (as after training), saved; returns (path, pipe)."""
    pipe = build_tiny_pipeline(family)
    settings = {
        "model.path": "m",
        "data.dir": "d",
        "lora.unet_targets": "locon",
        "lora.rank": "4",
        "lora.alpha": "2",
        "lora.train_text_encoder": "true",
        "lora.text_encoder_targets": "attn-mlp",
        **overrides,
    }
    add_lora_adapters(pipe, load_config(None, settings))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in (pipe.unet, pipe.text_encoder):
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.add_(torch.randn(param.shape, generator=gen) * 0.3)
    info = {"family": family, "base_model": "tiny", "resolution": 64}
    return save_adapter(folder, pipe.unet, pipe.text_encoder, info), pipe


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    path, pipe = trained_adapter(tmp_path_factory.mktemp("adapter"))
    return path, _images(pipe)


@pytest.fixture(scope="module")
def kohya_file(adapter, tmp_path_factory):
    out = tmp_path_factory.mktemp("kohya") / "style.safetensors"
    # checked against the tiny model: full-size SD 1 has no conv_shortcut in its last down block
    return export_kohya(adapter[0], out, "sd1", base=build_tiny_pipeline("sd1"))


def test_save_then_load_equals_the_in_memory_adapter(adapter):
    pipe = build_tiny_pipeline("sd1")
    base = _images(pipe)
    load_adapters(pipe, [(str(adapter[0]), 1.0)])
    np.testing.assert_allclose(_images(pipe), adapter[1], atol=LIVE_ATOL)
    assert np.abs(base - adapter[1]).max() > 1e-2  # the adapter does change the images


def test_kohya_export_has_kohya_keys_real_alphas_and_ss_metadata(kohya_file):
    with safe_open(str(kohya_file), framework="pt") as f:
        keys, meta = list(f.keys()), f.metadata()
        alphas = {f.get_tensor(k).item() for k in keys if k.endswith(".alpha")}
    assert all(k.startswith(("lora_unet_", "lora_te_text_model_encoder_layers_")) for k in keys)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha" in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys
    assert "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight" in keys  # LoCon, 4-D
    assert alphas == {2.0}  # the real alpha, not the rank (4)
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    assert (meta["ss_network_alpha"], meta["ss_base_model_version"], meta["ss_v2"]) == (
        "2",
        "sd_v1",
        "False",
    )
    assert meta["sdtune.family"] == "sd1" and "conv_dim" in meta["ss_network_args"]
    summary = inspect_adapter(kohya_file)
    assert (summary.format, dict(summary.ranks), set(summary.alphas)) == (
        "kohya",
        {4: summary.modules},
        {"2"},
    )


def test_kohya_export_loads_back_in_sdtune_to_the_same_layers_and_images(adapter, kohya_file):
    pipe = build_tiny_pipeline("sd1")
    modules = model_modules(pipe)
    original = read_adapter(adapter[0], modules).layers
    back = read_adapter(kohya_file, modules).layers
    assert back.keys() == original.keys()
    for module, layer in original.items():
        assert torch.equal(back[module].down, layer.down) and back[module].alpha == layer.alpha
    load_adapters(pipe, [(str(kohya_file), 1.0)])
    np.testing.assert_allclose(_images(pipe), adapter[1], atol=LIVE_ATOL)


def test_kohya_export_gives_the_same_images_in_diffusers_as_in_sdtune(adapter, kohya_file):
    theirs = build_tiny_pipeline("sd1")
    theirs.load_lora_weights(str(kohya_file))  # diffusers' own kohya conversion
    ours = build_tiny_pipeline("sd1")
    load_adapters(ours, [(str(kohya_file), 1.0)])
    np.testing.assert_allclose(_images(theirs), _images(ours), atol=LIVE_ATOL)


def test_convert_to_diffusers_and_back_keeps_the_images(kohya_file, adapter, tmp_path):
    pipe = build_tiny_pipeline("sd1")
    out = export_diffusers(kohya_file, tmp_path / "plain.safetensors", base=pipe)
    pipe.load_lora_weights(str(out))  # diffusers alone, no metadata: alpha is folded in
    np.testing.assert_allclose(_images(pipe), adapter[1], atol=LIVE_ATOL)
    with pytest.raises(SdtuneError, match="already exists; pass --overwrite"):
        export_diffusers(kohya_file, out, base=pipe)


def test_sd1_adapter_on_sd2_model_names_both_families(adapter):
    pipe = build_tiny_pipeline("sd2-base")
    with pytest.raises(SdtuneError, match="trained on the sd1 family but the base model is sd2"):
        load_adapters(pipe, [(str(adapter[0]), 1.0)])
    with pytest.raises(SdtuneError, match="sd2-base"):
        export_kohya(adapter[0], adapter[0].parent / "x.safetensors", "sd2-base")


def test_foreign_kohya_file_for_sd2_fails_on_sd1_naming_both(tmp_path):
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    tensors = {
        f"{name}.lora_down.weight": torch.zeros(4, 1024),  # reads SD 2's 1024-wide text
        f"{name}.lora_up.weight": torch.zeros(320, 4),  # full-size SD 2's to_k: 320 x 1024
        f"{name}.alpha": torch.tensor(4.0),
    }
    save_file(tensors, str(tmp_path / "sd2.safetensors"))
    pipe = build_tiny_pipeline("sd1")
    with pytest.raises(SdtuneError, match=r"is for sd2 and does not fit the sd1 base.*attn2\.to_k"):
        load_adapters(pipe, [(str(tmp_path / "sd2.safetensors"), 1.0)])
    # against the full-size families: names fit, the text width tells SD 2 from SD 1
    with pytest.raises(SdtuneError, match="is an sd2 adapter .* target family is sd1"):
        export_kohya(tmp_path / "sd2.safetensors", tmp_path / "out.safetensors", "sd1")
    assert export_kohya(tmp_path / "sd2.safetensors", tmp_path / "out.safetensors").is_file()
    with safe_open(str(tmp_path / "out.safetensors"), framework="pt") as f:
        assert f.metadata()["ss_base_model_version"] == "sd_v2"  # family inferred: sd2-base


def test_unknown_and_corrupt_files_give_one_line_errors(tmp_path):
    bad = {
        "lora_unet_down_blocks_9_nonsense.lora_down.weight": torch.zeros(2, 4),
        "lora_unet_down_blocks_9_nonsense.lora_up.weight": torch.zeros(4, 2),
    }
    save_file(bad, str(tmp_path / "bad.safetensors"))
    pipe = build_tiny_pipeline("sd1")
    with pytest.raises(SdtuneError, match="not in the model: lora_unet_down_blocks_9_nonsense"):
        attach_adapter(pipe, tmp_path / "bad.safetensors", "a")
    with pytest.raises(SdtuneError, match="map to no module of the sd1 model"):
        export_kohya(tmp_path / "bad.safetensors", tmp_path / "out.safetensors", "sd1")
    (tmp_path / "torn.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(SdtuneError, match="not a readable safetensors"):
        attach_adapter(pipe, tmp_path / "torn.safetensors", "a")
    half = {"unet.conv_in.lora_A.weight": torch.zeros(2, 4, 3, 3)}
    save_file(half, str(tmp_path / "half.safetensors"))
    with pytest.raises(SdtuneError, match="only one half"):
        attach_adapter(pipe, tmp_path / "half.safetensors", "a")
    assert not (tmp_path / "out.safetensors").exists()


def _lycoris_file(path, kind):
    """A LoHa or LoKr on two tiny SD 1 modules (a linear and a 3x3 conv)."""
    gen = torch.Generator().manual_seed(3)

    def rand(*shape):
        return torch.randn(*shape, generator=gen) * 0.2

    linear = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # 16 x 16
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"  # 16 x 16 x 3 x 3
    tensors = {}
    for name, fan_in in ((linear, 16), (conv, 16 * 9)):
        if kind == "loha":
            parts = {"hada_w1_a": rand(16, 2), "hada_w1_b": rand(2, fan_in)}
            parts.update({"hada_w2_a": rand(16, 2), "hada_w2_b": rand(2, fan_in)})
        else:
            parts = {
                "lokr_w1": rand(4, 4),
                "lokr_w2_a": rand(4, 2),
                "lokr_w2_b": rand(2, fan_in // 4),
            }
        tensors.update({f"{name}.{k}": v for k, v in parts.items()})
        tensors[f"{name}.alpha"] = torch.tensor(1.0)
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_lycoris_loha_and_lokr_load_live_equal_to_fused(kind, tmp_path):
    from sdtune.adapters.merge import fuse_adapters

    path = _lycoris_file(tmp_path / f"{kind}.safetensors", kind)
    live = build_tiny_pipeline("sd1")
    base = _images(live)
    load_adapters(live, [(str(path), 1.0)])
    fused = build_tiny_pipeline("sd1")
    fuse_adapters(fused, [(path, 1.0)])
    assert inspect_adapter(path).format == "kohya"
    np.testing.assert_allclose(_images(live), _images(fused), atol=LIVE_ATOL)
    assert np.abs(_images(fused) - base).max() > 1e-3


def test_kohya_names_decode_unambiguously_for_every_sd_family():
    from sdtune.adapters.load import family_modules

    for family in ("sd1", "sd2-base", "sd1-inpaint", "sd2-depth", "sd2-upscale"):
        modules = family_modules(family)
        table = formats.kohya_table(modules)
        assert len({formats.kohya_name(m) for m in modules}) == len(modules)
        assert table["lora_te_text_model_encoder_layers_0_self_attn_q_proj"] == (
            "text_encoder.encoder.layers.0.self_attn.q_proj"
        )


def test_a_folder_saved_by_peft_itself_loads_with_its_alpha(tmp_path):
    """PEFT's own `save_pretrained` folder (adapter_model.safetensors + adapter_config.json)."""
    from peft import LoraConfig, get_peft_model

    pipe = build_tiny_pipeline("sd1")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    peft_model = get_peft_model(pipe.unet, config)  # injects into pipe.unet in place
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.add_(torch.randn(param.shape, generator=gen) * 0.3)
    peft_model.save_pretrained(tmp_path / "peft")
    assert {p.name for p in (tmp_path / "peft").iterdir()} >= {
        "adapter_model.safetensors",
        "adapter_config.json",
    }
    expected = _images(pipe)

    fresh = build_tiny_pipeline("sd1")
    base = _images(fresh)
    load_adapters(fresh, [(str(tmp_path / "peft"), 1.0)])
    np.testing.assert_allclose(_images(fresh), expected, atol=LIVE_ATOL)
    assert np.abs(base - expected).max() > 1e-2
    assert read_adapter(tmp_path / "peft", model_modules(fresh)).layout == "peft"
