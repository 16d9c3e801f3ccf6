"""Folders saved by peft's `save_pretrained` and files saved the way diffusers' training scripts
save them load whole in sdtune, with the weight changes peft itself merges.

Each case puts peft LoRA layers on a tiny SD 1 model (U-Net and/or text encoder), gives every B
non-zero values (as after training), saves with the producer's own code, and takes peft's own
merged-minus-base weights per module as the reference. sdtune must apply the same change to
the same modules live, fused by `generate --fuse`, and fused by `merge --base`, within a
relative error of 1e-5, and `sdtune inspect` must report the producer's ranks and alphas,
including those that `rank_pattern` and `alpha_pattern` give single layers.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict

from sdtune.adapters.inspect import inspect_adapter
from sdtune.adapters.merge import fuse_adapters
from sdtune.generate.adapters import fuse_adapters as fuse_loaded
from sdtune.generate.txt2img import load_adapters
from sdtune.models.tiny import build_tiny_pipeline
from tests.adapters.weight_probe import (
    applied_changes,
    base_weights,
    canonical_modules,
    changed_modules,
    relative_errors,
    stored_changes,
)

TOLERANCE = 1e-5
ATTENTION = ["to_k", "to_q", "to_v", "to_out.0"]  # what diffusers' SD LoRA scripts target
TEXT_ATTENTION = ["q_proj", "k_proj", "v_proj", "out_proj"]
# Some layers with their own rank and alpha (peft's keys are regular expressions).
RANK_PATTERN = {"attn2.to_k": 2, "proj_in": 8}
ALPHA_PATTERN = {r"down_blocks\.0.*to_q": 3, "ff.net.2": 16}


def _randomize(model, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.add_(torch.randn(param.shape, generator=gen) * 0.3)
            elif "lora_magnitude_vector" in name:
                param.mul_(1 + 0.2 * torch.rand(param.shape, generator=gen))


def _peft_merged_changes(pipe, base) -> dict[str, torch.Tensor]:
    """peft's own merge of every LoRA layer of `pipe`, minus the base weights."""
    changes = {}
    for name, module in canonical_modules(pipe).items():
        if isinstance(module, BaseTunerLayer):
            merged = copy.deepcopy(module)
            merged.merge()
            changes[name] = merged.get_base_layer().weight.detach() - base[name]
    return changes


def _peft_unet(folder):
    pipe = build_tiny_pipeline("sd1", seed=0)
    base = base_weights(pipe)
    targets = [*ATTENTION, "proj_in", "conv1", "ff.net.2"]
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=targets,
        rank_pattern=RANK_PATTERN,
        alpha_pattern=ALPHA_PATTERN,
    )
    model = get_peft_model(pipe.unet, config)  # wraps pipe.unet's modules in place
    _randomize(model, 1)
    model.save_pretrained(folder)
    return folder, _peft_merged_changes(pipe, base)


def _peft_text_encoder_dora(folder):
    pipe = build_tiny_pipeline("sd1", seed=0)
    base = base_weights(pipe)
    config = LoraConfig(
        r=4, lora_alpha=2, use_dora=True, use_rslora=True, target_modules=["q_proj", "fc1"]
    )
    model = get_peft_model(pipe.text_encoder, config)
    _randomize(model, 2)
    model.save_pretrained(folder)
    return folder, _peft_merged_changes(pipe, base)


def _diffusers_script(folder, text_encoder: bool, patterns: bool = False):
    """As train_text_to_image_lora.py / train_dreambooth_lora.py save (diffusers' examples):
    `unet.add_adapter`, then `save_lora_weights` of `convert_state_dict_to_diffusers(
    get_peft_model_state_dict(...))`; with `patterns`, per-layer ranks/alphas and the adapter
    metadata that keeps them."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    pipe = build_tiny_pipeline("sd1", seed=0)
    base = base_weights(pipe)
    targets = ATTENTION + (["proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"] if patterns else [])
    unet_config = LoraConfig(
        r=4,
        lora_alpha=4,
        init_lora_weights="gaussian",
        target_modules=targets,
        rank_pattern=RANK_PATTERN if patterns else {},
        alpha_pattern=ALPHA_PATTERN if patterns else {},
    )
    pipe.unet.add_adapter(unet_config)
    _randomize(pipe.unet, 3)
    layers = {
        "unet_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    }
    if patterns:
        layers["unet_lora_adapter_metadata"] = unet_config.to_dict()
    if text_encoder:
        text_config = LoraConfig(
            r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=TEXT_ATTENTION
        )
        pipe.text_encoder.add_adapter(text_config)
        _randomize(pipe.text_encoder, 4)
        state = get_peft_model_state_dict(pipe.text_encoder)
        layers["text_encoder_lora_layers"] = convert_state_dict_to_diffusers(state)
    StableDiffusionPipeline.save_lora_weights(folder, safe_serialization=True, **layers)
    return folder / "pytorch_lora_weights.safetensors", _peft_merged_changes(pipe, base)


PRODUCERS = {
    "peft-unet-patterns": _peft_unet,
    "peft-text-encoder-dora-rslora": _peft_text_encoder_dora,
    "diffusers-text-to-image-script": lambda f: _diffusers_script(f, text_encoder=False),
    "diffusers-dreambooth-script": lambda f: _diffusers_script(f, text_encoder=True),
    "diffusers-script-alpha-pattern": lambda f: _diffusers_script(f, False, patterns=True),
}


@pytest.fixture(scope="module", params=sorted(PRODUCERS))
def produced(request, tmp_path_factory):
    path, changes = PRODUCERS[request.param](tmp_path_factory.mktemp(request.param))
    return request.param, path, changes


def test_every_loading_path_applies_the_producers_changes(produced):
    _, path, want = produced
    pipe = build_tiny_pipeline("sd1", seed=0)
    base = base_weights(pipe)
    load_adapters(pipe, [(str(path), 1.0)])
    errors = {"live": relative_errors(applied_changes(pipe, base, want), want)}
    fuse_loaded(pipe)  # what `generate --fuse` does after loading
    assert changed_modules(pipe, base) == set(want)  # every module, and no other
    errors["generate --fuse"] = relative_errors(stored_changes(pipe, base, want), want)
    merged = build_tiny_pipeline("sd1", seed=0)
    fuse_adapters(merged, [(path, 1.0)])  # what `merge --base` does
    assert changed_modules(merged, base) == set(want)
    errors["merge --base"] = relative_errors(stored_changes(merged, base, want), want)
    worst = {route: max(e.values()) for route, e in errors.items()}
    assert max(worst.values()) <= TOLERANCE, worst


def _expected_patterns(name: str, module: str) -> tuple[int, float]:
    """The rank and alpha peft gives `module` in the pattern cases."""
    import re

    rank, alpha = 4, 8 if name.startswith("peft") else 4
    for key, value in RANK_PATTERN.items():
        rank = value if re.match(rf"(.*\.)?({key})$", module) else rank
    for key, value in ALPHA_PATTERN.items():
        alpha = value if re.match(rf"(.*\.)?({key})$", module) else alpha
    return rank, alpha


def test_inspect_reports_ranks_alphas_and_algorithm(produced):
    name, path, want = produced
    summary = inspect_adapter(path)
    assert summary.modules == len(want)
    if "dora" in name:
        assert dict(summary.algorithms) == {"LoRA+DoRA": len(want)}
        assert dict(summary.alphas) == {"4": len(want)}  # rsLoRA: 2 / sqrt(4) = 4 / 4
        return
    expected = [_expected_patterns(name, m.partition(".")[2]) for m in want]
    if "pattern" not in name:
        expected = [(4, 8 if name.startswith("peft") else 4)] * len(want)
    ranks, alphas = {}, {}
    for rank, alpha in expected:
        ranks[rank] = ranks.get(rank, 0) + 1
        alphas[f"{alpha:g}"] = alphas.get(f"{alpha:g}", 0) + 1
    if name in ("diffusers-text-to-image-script", "diffusers-dreambooth-script"):
        alphas = {"= rank (none stored)": len(want)}  # the scripts' alpha = rank, not written
    assert dict(summary.ranks) == ranks
    assert dict(summary.alphas) == alphas
    convs = sum(1 for m in want if m.endswith("conv1"))
    assert dict(summary.algorithms) == {
        k: n for k, n in {"LoRA": len(want) - convs, "LoCon": convs}.items() if n
    }
