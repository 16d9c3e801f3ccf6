"""The kohya export names modules that AUTOMATIC1111's and ComfyUI's key rules find in the
full-size SD 1 and SD 2 models (built on the meta device from the shipped configs), at the
right strength; a file of the earlier mixed layout still loads whole, says what it repaired,
and `sdtune convert` rewrites it."""

import json
import logging

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sdtune.adapters import consumers
from sdtune.adapters.check import _family_ldm_shapes
from sdtune.adapters.export import export_diffusers, write_layers
from sdtune.adapters.formats import Layer
from sdtune.adapters.load import family_modules
from sdtune.adapters.lora import (
    TEXT_ENCODER_TARGET_PRESETS,
    UNET_TARGET_PRESETS,
    matched_modules,
)
from sdtune.cli.main import main
from sdtune.generate.txt2img import load_adapters
from sdtune.models.families import build_pipeline_from_config
from sdtune.models.tiny import build_tiny_pipeline
from tests.adapters.test_interop_matrix import (
    _plain_diffusers,
    _uint8,
    _wrapped,
    faults,
    make_adapter,
)


def _rank1_layers(family: str, unet_targets, te_targets) -> dict[str, Layer]:
    """Rank-1 LoRA layers (alpha 2: scale 2) on the full-size modules the presets select."""
    pipe = build_pipeline_from_config(family, empty=True)
    shapes = family_modules(family)
    names = [f"unet.{m}" for m in matched_modules(pipe.unet, unet_targets)]
    names += [f"text_encoder.{m}" for m in matched_modules(pipe.text_encoder, te_targets)]
    layers = {}
    for module in names:
        module = module.replace("text_encoder.text_model.", "text_encoder.")
        out, *rest = shapes[module]
        kernel = rest[1:] if len(rest) > 1 else []
        down = torch.ones(1, rest[0], *kernel)
        up = torch.ones(out, 1, *([1, 1] if kernel else []))
        layers[module] = Layer(down, up, 2.0)
    return layers


@pytest.mark.parametrize("family", ["sd1", "sd2-base"])
@pytest.mark.parametrize("preset", ["attn-ff", "locon"])
def test_kohya_names_map_onto_full_size_ldm_modules_in_a1111_and_comfyui(tmp_path, family, preset):
    layers = _rank1_layers(
        family, UNET_TARGET_PRESETS[preset], TEXT_ENCODER_TARGET_PRESETS["attn-mlp"]
    )
    out = write_layers(layers, tmp_path / "k.safetensors", family, layout="kohya")
    with safe_open(str(out), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    ldm = _family_ldm_shapes(family)
    downs = {k for k in state if k.endswith(".lora_down.weight")}
    assert len(downs) == len(layers)
    for applied in (consumers.a1111_applied(state, ldm), consumers.comfyui_applied(state, ldm)):
        assert set(applied.scales) == downs, applied.consumer
        assert set(applied.scales.values()) == {2.0}, applied.consumer  # alpha 2 / rank 1


def _landed_layout_file(folder, unet, te, variant):
    """An adapter written the way the earlier release wrote it: convert_state_dict_to_diffusers
    of peft's state dict (attention in old names, the rest in PEFT names), text-encoder keys
    without text_model., and peft's whole config in the header."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    kept = []
    path, expected, trained = make_adapter(folder, unet, te, variant, keep=kept)
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata()
    pipe, old, meta = kept[0], {}, {}
    parts = [("unet", pipe.unet)] + ([("text_encoder", pipe.text_encoder)] if te != "off" else [])
    for part, model in parts:
        converted = convert_state_dict_to_diffusers(get_peft_model_state_dict(model))
        old.update({f"{part}.{k}": v.contiguous() for k, v in converted.items()})
        config = model.peft_config["default"].to_dict()
        meta.update(
            {f"{part}.{k}": sorted(v) if isinstance(v, set) else v for k, v in config.items()}
        )
    header["lora_adapter_metadata"] = json.dumps(meta, sort_keys=True)
    landed = folder / "landed.safetensors"
    save_file(old, str(landed), metadata=header)
    return landed, expected, trained, old


def test_a_file_of_the_earlier_mixed_layout_loads_whole_and_says_what_it_repaired(tmp_path, caplog):
    landed, expected, trained, old = _landed_layout_file(tmp_path, "locon", "attn-mlp", "dora")
    assert any(".lora.down.weight" in k for k in old) and any(".lora_A.weight" in k for k in old)
    pipe = build_tiny_pipeline("sd1")
    with caplog.at_level(logging.WARNING, logger="sdtune.adapters"):
        load_adapters(pipe, [(str(landed), 1.0)])
    repaired = [r.getMessage() for r in caplog.records if "repaired" in r.getMessage()]
    assert len(repaired) == 1 and "\n" not in repaired[0]
    assert "old .lora.down/.lora.up names beside PEFT names" in repaired[0]
    assert f"all {len(trained)} modules loaded" in repaired[0]
    assert _wrapped(pipe) == trained
    assert np.abs(_uint8(pipe) - expected).max() <= 1


def test_convert_rewrites_the_earlier_layout_and_check_tells_the_two_apart(tmp_path, capsys):
    landed, expected, trained, _ = _landed_layout_file(tmp_path, "attn-ff", "attn", "alpha2x")
    tiny = tmp_path / "tiny"
    build_tiny_pipeline("sd1").save_pretrained(tiny)
    # diffusers itself drops the attention layers of the mixed file: check says so, exits 1
    assert main(["check", str(landed), "--model", str(tiny)]) == 1
    report = capsys.readouterr().out
    assert "not loaded: unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q" in report

    out = tmp_path / "fixed.safetensors"  # `sdtune convert --to diffusers` (here: a tiny model)
    export_diffusers(landed, out, "sd1", base=build_tiny_pipeline("sd1"))
    assert main(["check", str(out), "--model", str(tiny)]) == 0
    assert f"diffusers       {len(trained)}/{len(trained)} load" in capsys.readouterr().out
    wrapped, live, fused, said = _plain_diffusers(out)
    assert faults(said, True) == []
    assert wrapped == trained
    assert np.abs(live - expected).max() <= 1 and np.abs(fused - expected).max() <= 1
