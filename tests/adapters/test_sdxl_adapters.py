"""SDXL adapters: the diffusers file and the kohya export load whole in plain diffusers with the
in-memory model's image; the kohya names are SDXL's original module names, on the full-size
model too; sdtune reads them back, refuses them on SD 1/2 (and SD 1/2 adapters on SDXL), and
merges, resizes, extracts and fuses them.

The adapter is made with peft's own `add_adapter` on a tiny SDXL (U-Net and both text
encoders, every B non-zero, alpha != rank), as a training run leaves it, and saved with
`save_adapter`.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from safetensors.torch import save_file

from sdtune.adapters import consumers, formats
from sdtune.adapters.check import _empty_family, _family_ldm_shapes, library_messages
from sdtune.adapters.export import export_kohya, read_for_family, write_layers
from sdtune.adapters.formats import Layer
from sdtune.adapters.io import save_adapter
from sdtune.adapters.load import family_modules, model_modules, read_adapter
from sdtune.adapters.lora import TEXT_ENCODER_TARGET_PRESETS, UNET_TARGET_PRESETS, matched_modules
from sdtune.adapters.merge import extract_lora, fuse_adapters, merge_adapters, resize_adapter
from sdtune.cli.main import main
from sdtune.errors import SdtuneError
from sdtune.generate.txt2img import load_adapters
from sdtune.models.tiny import build_tiny_pipeline

PARTS = ("unet", "text_encoder", "text_encoder_2")
UNET_TARGETS = [*UNET_TARGET_PRESETS["locon"], "time_emb_proj", "proj_in", "proj_out"]
UNET_TARGETS += ["ff.net.0.proj", "ff.net.2"]
TEXT_TARGETS = TEXT_ENCODER_TARGET_PRESETS["attn-mlp"]
ATOL = 1e-5  # the same math in another order of float operations
FUSED_ATOL = 1e-4


def images_np(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(0)
    return pipe(
        "a sks star", num_inference_steps=2, height=64, width=64, generator=gen, output_type="np"
    ).images


def wrapped(pipe) -> set[str]:
    """Every module of the three parts that carries a LoRA and not all-zero B weights."""
    found = set()
    for part in PARTS:
        for name, module in getattr(pipe, part).named_modules():
            if isinstance(module, BaseTunerLayer) and any(
                bool(b.weight.abs().sum() > 0) for b in module.lora_B.values()
            ):
                found.add(formats.strip_text_model(f"{part}.{name}"))
    return found


def no_messages(said) -> list[str]:
    return said.logs + [f"{w.category.__name__}: {w.message}" for w in said.warnings]


def add_peft_lora(pipe, seed: int = 1) -> None:
    """peft LoRA on the U-Net (rank 4, alpha 2) and both text encoders (rank 4, alpha 8), with
    random non-zero B weights."""
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=2, target_modules=UNET_TARGETS))
    for text in (pipe.text_encoder, pipe.text_encoder_2):
        text.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=TEXT_TARGETS))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for part in PARTS:
            for name, param in getattr(pipe, part).named_parameters():
                if "lora_B" in name:
                    param.add_(torch.randn(param.shape, generator=gen) * 0.3)


@pytest.fixture(scope="module")
def adapted(tmp_path_factory):
    """(file, the in-memory image, the adapted modules) of a tiny SDXL LoRA saved by sdtune."""
    pipe = build_tiny_pipeline("sdxl", seed=0)
    add_peft_lora(pipe)
    info = {"family": "sdxl", "base_model": "tiny", "resolution": 1024, "trigger": "sks"}
    folder = tmp_path_factory.mktemp("sdxl-adapter")
    path = save_adapter(
        folder, pipe.unet, pipe.text_encoder, info, text_encoder_2=pipe.text_encoder_2
    )
    return path, images_np(pipe), wrapped(pipe)


@pytest.fixture(scope="module")
def kohya_file(adapted, tmp_path_factory):
    out = tmp_path_factory.mktemp("sdxl-kohya") / "style.safetensors"
    return export_kohya(adapted[0], out, "sdxl", base=build_tiny_pipeline("sdxl", seed=0))


def test_the_diffusers_file_loads_whole_in_plain_diffusers_with_the_same_image(adapted):
    path, want, trained = adapted
    assert {m.partition(".")[0] for m in trained} == set(PARTS)
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert (meta["unet.r"], meta["unet.lora_alpha"]) == (4, 2)
    assert (meta["text_encoder_2.r"], meta["text_encoder_2.lora_alpha"]) == (4, 8)
    fresh = build_tiny_pipeline("sdxl", seed=0)
    base = images_np(fresh)
    with library_messages() as said:
        fresh.load_lora_weights(str(path))  # plain diffusers: StableDiffusionXLPipeline
    assert type(fresh).__name__ == "StableDiffusionXLPipeline"
    assert no_messages(said) == []
    assert wrapped(fresh) == trained
    np.testing.assert_allclose(images_np(fresh), want, atol=ATOL)
    assert np.abs(base - want).max() > 1e-2  # the adapter does change the image


def test_the_kohya_export_has_sdxl_original_names_real_alphas_and_sdxl_metadata(kohya_file):
    with safe_open(str(kohya_file), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        alphas = {k: f.get_tensor(k).item() for k in keys if k.endswith(".alpha")}
    names = {k.partition(".")[0] for k in keys}
    assert all(
        n.startswith(("lora_unet_", "lora_te1_text_model_", "lora_te2_text_model_")) for n in names
    )
    assert not any(n.startswith(("lora_unet_down_blocks", "lora_unet_up_blocks")) for n in names)
    for name in (
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
        "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_out_0",
        "lora_unet_input_blocks_4_1_proj_in",
        "lora_unet_input_blocks_7_1_transformer_blocks_0_ff_net_0_proj",
        "lora_unet_input_blocks_1_0_in_layers_2",
        "lora_unet_input_blocks_1_0_emb_layers_1",
        "lora_unet_input_blocks_1_0_out_layers_3",
        "lora_unet_input_blocks_4_0_skip_connection",
        "lora_unet_input_blocks_3_0_op",
        "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k",
        "lora_unet_middle_block_2_in_layers_2",
        "lora_unet_output_blocks_2_2_conv",
        "lora_unet_output_blocks_8_0_skip_connection",
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_te2_text_model_encoder_layers_1_mlp_fc2",
    ):
        assert name in names, name
        assert {f"{name}.lora_down.weight", f"{name}.lora_up.weight"} <= keys
    assert alphas["lora_unet_input_blocks_3_0_op.alpha"] == 2.0  # the real alpha, rank is 4
    assert alphas["lora_te2_text_model_encoder_layers_1_mlp_fc2.alpha"] == 8.0
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"  # sd-scripts' value for SDXL
    assert meta["ss_v2"] == "False" and meta["ss_resolution"] == "(1024, 1024)"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.resolution"] == "1024x1024"
    assert meta["sdtune.family"] == "sdxl"


def test_the_kohya_export_loads_whole_in_plain_diffusers_with_the_same_image(adapted, kohya_file):
    _, want, trained = adapted
    fresh = build_tiny_pipeline("sdxl", seed=0)
    with library_messages() as said:
        fresh.load_lora_weights(str(kohya_file))  # diffusers converts kohya's SDXL names
    assert no_messages(said) == []
    assert wrapped(fresh) == trained
    np.testing.assert_allclose(images_np(fresh), want, atol=ATOL)


def test_sdtune_reads_both_files_to_the_same_layers_and_image(adapted, kohya_file):
    path, want, trained = adapted
    pipe = build_tiny_pipeline("sdxl", seed=0)
    modules = model_modules(pipe)
    first, second = read_adapter(path, modules), read_adapter(kohya_file, modules)
    assert first.layers.keys() == second.layers.keys() == trained
    for module, layer in first.layers.items():
        other = second.layers[module]
        assert torch.equal(layer.down, other.down) and layer.alpha == other.alpha
    load_adapters(pipe, [(str(kohya_file), 1.0)])
    np.testing.assert_allclose(images_np(pipe), want, atol=ATOL)


@pytest.mark.parametrize("preset", ["attn", "attn-ff", "locon"])
def test_full_size_sdxl_kohya_keys_map_to_original_layout_modules(preset):
    """Shapes only: every tensor lives on the meta device, nothing of 2.5 B weights is made."""
    from sdtune.models.ldm_keys import unet_to_original

    pipe = _empty_family("sdxl")  # the full-size SDXL, weights on the meta device
    modules = family_modules("sdxl")
    names = [f"unet.{m}" for m in matched_modules(pipe.unet, UNET_TARGET_PRESETS[preset])]
    for part in ("text_encoder", "text_encoder_2"):
        names += [f"{part}.{m}" for m in matched_modules(getattr(pipe, part), TEXT_TARGETS)]
    layers = {}
    for module in map(formats.strip_text_model, names):
        out, *rest = modules[module]
        kernel = rest[1:]
        down = torch.empty(1, rest[0], *kernel, device="meta")
        up = torch.empty(out, 1, *([1, 1] if kernel else []), device="meta")
        layers[module] = Layer(down, up, 2.0)
    assert {m.partition(".")[0] for m in layers} == set(PARTS)
    state = formats.to_kohya_state_dict(layers, modules.original)
    downs = {k for k in state if k.endswith(".lora_down.weight")}
    assert len(downs) == len(layers)
    # U-Net: `lora_unet_` + a module of the full-size U-Net in the original layout, as the
    # checkpoint key map names its weights
    weights = {k: v for k, v in pipe.unet.state_dict().items() if "add_embedding" not in k}
    original = {
        k.removeprefix("model.diffusion_model.").removesuffix(".weight").replace(".", "_")
        for k in unet_to_original(weights, pipe.unet.config)
    }
    unet = {k.partition(".")[0] for k in downs if k.startswith("lora_unet_")}
    assert {n.removeprefix("lora_unet_") for n in unet} <= original
    assert any(n.startswith("lora_unet_input_blocks_") for n in unet)
    assert any(n.startswith("lora_unet_output_blocks_") for n in unet)
    assert any(n.startswith("lora_unet_middle_block_1_") for n in unet)
    # every module (both text encoders too) patched by A1111's and ComfyUI's rules at alpha/rank
    ldm = _family_ldm_shapes("sdxl")
    assert any(k.startswith("conditioner.embedders.1.model.transformer.resblocks.") for k in ldm)
    for applied in (consumers.a1111_applied(state, ldm), consumers.comfyui_applied(state, ldm)):
        assert set(applied.scales) == downs, (
            applied.consumer,
            sorted(downs - set(applied.scales))[:3],
        )
        assert set(applied.scales.values()) == {2.0}, applied.consumer
    # and diffusers' own converter names a module of the full-size model for every key
    assert _diffusers_modules(state, pipe.unet.config) == set(layers)


def _diffusers_modules(state, unet_config) -> set[str]:
    """The modules diffusers' kohya conversion (what `load_lora_weights` runs) names, in the
    old attention-processor spellings it converts to, read back as module names."""
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers,
        _maybe_map_sgm_blocks_to_diffusers,
    )

    mapped = _maybe_map_sgm_blocks_to_diffusers(dict(state), unet_config)
    converted, _ = _convert_non_diffusers_lora_to_diffusers(mapped)
    found = set()
    for key in converted:
        if not key.endswith(".down.weight"):
            continue
        module = key.removesuffix(".down.weight").replace(".processor.", ".")
        module = re.sub(r"(_lora|\.lora|\.lora_linear_layer)$", "", module)
        if module.startswith("text_encoder"):  # the text encoders' loader renames these
            module = re.sub(r"self_attn\.to_(q|k|v)$", r"self_attn.\1_proj", module)
            module = re.sub(r"self_attn\.to_out$", "self_attn.out_proj", module)
        else:
            module = re.sub(r"\.to_out$", ".to_out.0", module)
        found.add(formats.strip_text_model(module))
    return found


def test_an_sd1_adapter_on_sdxl_and_an_sdxl_adapter_on_sd1_or_sd2_are_refused(adapted, tmp_path):
    sd1 = build_tiny_pipeline("sd1", seed=0)
    sd1.unet.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_k"], init_lora_weights=False))
    sd1_file = save_adapter(tmp_path / "sd1", sd1.unet, info={"family": "sd1"})
    xl = build_tiny_pipeline("sdxl", seed=0)
    with pytest.raises(SdtuneError, match=r"trained on the sd1 family .* base model is sdxl"):
        load_adapters(xl, [(str(sd1_file), 1.0)])
    assert not wrapped(xl)
    for family in ("sd1", "sd2-base"):
        with pytest.raises(SdtuneError, match=rf"trained on the sdxl family .* model is {family}"):
            load_adapters(build_tiny_pipeline(family, seed=0), [(str(adapted[0]), 1.0)])
        with pytest.raises(SdtuneError, match=rf"sdxl adapter but --family is {family}"):
            export_kohya(adapted[0], tmp_path / f"{family}.safetensors", family)
    with pytest.raises(SdtuneError, match=r"sd1 adapter but --family is sdxl"):
        export_kohya(sd1_file, tmp_path / "x.safetensors", "sdxl")


def test_an_sdxl_kohya_file_that_does_not_say_its_family_is_refused_on_sd1(kohya_file, tmp_path):
    with safe_open(str(kohya_file), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    bare = tmp_path / "bare.safetensors"
    save_file(state, str(bare))  # no header: the names say SDXL (lora_te2_, input_blocks)
    with pytest.raises(SdtuneError, match=r"is an sdxl adapter .* base model is sd1"):
        load_adapters(build_tiny_pipeline("sd1", seed=0), [(str(bare), 1.0)])
    adapter, family, _ = read_for_family(bare, None, base=build_tiny_pipeline("sdxl", seed=0))
    assert family.name == "sdxl" and len(adapter.layers) == len(state) // 3


def test_fuse_equals_the_live_adapter_and_extract_recovers_it(adapted):
    path, want, trained = adapted
    fused = build_tiny_pipeline("sdxl", seed=0)
    fuse_adapters(fused, [(path, 1.0)])  # what `merge --base` does
    np.testing.assert_allclose(images_np(fused), want, atol=FUSED_ATOL)
    base = build_tiny_pipeline("sdxl", seed=0)
    layers, reports = extract_lora(base, fused, rank=4)
    assert set(layers) == trained  # all three parts; every change has rank <= 4
    assert min(r.energy for r in reports) > 1 - 1e-5
    adapter = read_adapter(path, model_modules(base))
    from sdtune.adapters.lowrank import compute_delta

    for module, layer in layers.items():
        want_delta = compute_delta(adapter.layers[module])
        error = float((compute_delta(layer) - want_delta).norm() / want_delta.norm())
        assert error < 1e-4, module


def test_merge_and_resize_write_sdxl_files_that_apply_the_same_change(adapted, tmp_path, capsys):
    path, want, trained = adapted
    tiny = build_tiny_pipeline("sdxl", seed=0)
    modules = model_modules(tiny)
    adapter = read_adapter(path, modules)
    merged, _ = merge_adapters([(adapter, 0.25), (adapter, 0.75)])  # the same change
    out = write_layers(merged, tmp_path / "merged.safetensors", "sdxl", "kohya", modules=modules)
    with safe_open(str(out), framework="pt") as f:
        names = {k.partition(".")[0] for k in f.keys()}
    assert "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_q" in names
    assert any(n.startswith("lora_te2_") for n in names)
    fused = build_tiny_pipeline("sdxl", seed=0)
    fuse_adapters(fused, [(out, 1.0)])
    np.testing.assert_allclose(images_np(fused), want, atol=FUSED_ATOL)
    resized, reports = resize_adapter(adapter, 8)  # above every layer's rank: lossless
    assert set(resized) == trained and min(r.energy for r in reports) > 1 - 1e-5
    # the CLI, checked against the full-size SDXL's modules
    out = tmp_path / "resized.safetensors"
    assert main(["resize", str(path), "--rank", "2", "--out", str(out), "--to", "kohya"]) == 0
    capsys.readouterr()
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"
        assert {f.get_tensor(k).shape[0] for k in f.keys() if k.endswith("lora_down.weight")} == {2}


def test_the_check_keeps_what_diffusers_says_to_itself(tmp_path):
    """An adapter without a text_encoder_2 part: diffusers logs that it found no keys for it.
    `sdtune check` collects that (its report is what the user reads) instead of printing it."""
    import subprocess
    import sys

    pipe = build_tiny_pipeline("sdxl", seed=0)
    pipe.save_pretrained(tmp_path / "base")
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"]))
    pipe.text_encoder.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj"]))
    with torch.no_grad():
        for part in ("unet", "text_encoder"):
            for name, param in getattr(pipe, part).named_parameters():
                if "lora_B" in name:
                    param.fill_(0.1)
    path = save_adapter(tmp_path / "lora", pipe.unet, pipe.text_encoder, {"family": "sdxl"})
    cmd = [sys.executable, "-m", "sdtune.cli.main", "check", str(path)]
    proc = subprocess.run(
        [*cmd, "--model", str(tmp_path / "base")], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "every module loads in diffusers" in proc.stdout
    assert "LoRA keys" not in proc.stdout + proc.stderr, proc.stderr
