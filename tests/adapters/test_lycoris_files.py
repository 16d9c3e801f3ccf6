"""Files saved by LyCORIS itself load whole in sdtune, with LyCORIS' own weight changes.

LyCORIS (the `lycoris-lora` package) trains LoRA, LoCon, LoHa and LoKr (with Tucker cores and
DoRA as options) on diffusers modules and saves them in the kohya layout. Each case builds its
network on a tiny SD 1 model, gives every factor non-zero values, saves it with LyCORIS'
`save_weights`, and measures the change LyCORIS' own forward applies per module. sdtune must
apply the same change to the same modules live, fused by `generate --fuse`, and fused by
`merge --base`, within a relative error of 1e-5.

The reference is LyCORIS' forward (what training and its own inference compute). In
lycoris-lora 4.1.3, `get_diff_weight` of LoHa and LoKr modules multiplies by alpha / rank a
second time and so disagrees with that forward wherever alpha != rank; it is not used here.
"""

from __future__ import annotations

import logging

import pytest
import torch

from sdtune.adapters.inspect import inspect_adapter
from sdtune.adapters.merge import fuse_adapters
from sdtune.cli.main import main
from sdtune.generate.adapters import fuse_adapters as fuse_loaded
from sdtune.generate.txt2img import load_adapters
from sdtune.models.tiny import build_tiny_pipeline
from tests.adapters.weight_probe import (
    applied_changes,
    base_weights,
    canonical_modules,
    changed_modules,
    effective_weight,
    relative_errors,
    stored_changes,
)

lycoris_kohya = pytest.importorskip("lycoris.kohya")

TOLERANCE = 1e-5
# LyCORIS' "full" preset, without its TimestepEmbedding entry (which wraps time_embedding twice
# on a diffusers U-Net and makes LyCORIS fail its own duplicate-name check), on every kind of
# block once: the first down block (attention, resnets, downsampler), the mid block, the first
# up block (resnets with shortcut convs, upsampler), conv_in/out, the time embedding and the
# whole text encoder.
PRESET = r"""
enable_conv = true
unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
unet_target_name = ["conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"]
text_encoder_target_module = ["CLIPAttention", "CLIPMLP"]
text_encoder_target_name = []
exclude_name = ['down_blocks\.[123]', 'up_blocks\.[123]']
"""
slow = pytest.mark.slow
CASES = {
    "lora-locon": pytest.param(("lora", {}), marks=slow),
    "locon-tucker": pytest.param(("locon", {"use_tucker": True}), marks=slow),
    "dora": ("lora", {"dora_wd": True}),
    "loha": pytest.param(("loha", {}), marks=slow),
    "loha-tucker": ("loha", {"use_tucker": True}),
    "lokr": ("lokr", {}),
    "lokr-factored": pytest.param(("lokr", {"factor": 4, "decompose_both": True}), marks=slow),
}


def _algorithm(lora) -> str:
    """The algorithm name sdtune should show for one LyCORIS module."""
    kind = type(lora).__name__
    if kind == "LoConModule":
        conv = isinstance(lora.org_module[0], torch.nn.Conv2d)
        name = "LoCon" if conv and lora.org_module[0].kernel_size != (1, 1) else "LoRA"
    else:
        name = {"LohaModule": "LoHa", "LokrModule": "LoKr"}[kind]
    name += "+Tucker" if getattr(lora, "tucker", False) else ""
    return name + ("+DoRA" if lora.wd else "")


def _expected_summary(network):
    algorithms, ranks, alphas = {}, {}, {}
    for lora in network.text_encoder_loras + network.unet_loras:
        full = getattr(lora, "use_w1", False) and getattr(lora, "use_w2", False)
        algorithm = _algorithm(lora)
        rank = "full" if full else lora.lora_dim
        alpha = "unused (full factors)" if full else f"{float(lora.alpha):g}"
        for table, key in ((algorithms, algorithm), (ranks, rank), (alphas, alpha)):
            table[key] = table.get(key, 0) + 1
    return algorithms, ranks, alphas


# SDXL: both text encoders (LyCORIS names them lora_te1_/lora_te2_), the U-Net's first attending
# level (down_blocks.1, whose proj_in/out are linear), the mid block, the first up level, the
# added-conditioning MLP (the original layout's label_emb) and conv_in/out.
XL_PRESET = r"""
enable_conv = true
unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
unet_target_name = ["conv_in", "conv_out", "add_embedding.linear_1", "add_embedding.linear_2"]
text_encoder_target_module = ["CLIPAttention", "CLIPMLP"]
text_encoder_target_name = []
exclude_name = ['down_blocks\.[02]', 'up_blocks\.[12]']
"""


def save_lycoris_file(folder, case: str, algo: str, options: dict, family: str = "sd1"):
    """(file, LyCORIS' per-module changes, its network): one network saved by LyCORIS."""
    (folder / "preset.toml").write_text(XL_PRESET if family == "sdxl" else PRESET)
    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    pipe = build_tiny_pipeline(family, seed=0)
    names = {id(m): n for n, m in canonical_modules(pipe).items()}
    text = [pipe.text_encoder, pipe.text_encoder_2] if family == "sdxl" else pipe.text_encoder
    network = lycoris_kohya.create_network(
        1.0, 4, 2, pipe.vae, text, pipe.unet, algo=algo,
        preset=str(folder / "preset.toml"), conv_dim=2, conv_alpha=1, **options,
    )  # fmt: skip
    network.apply_to(text, pipe.unet, True, True)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in network.named_parameters():
            if "dora_scale" in name:
                param.mul_(1 + 0.2 * torch.rand(param.shape, generator=gen))
            else:
                param.add_(torch.randn(param.shape, generator=gen) * 0.2)
    path = folder / f"{case}.safetensors"
    network.save_weights(str(path), None, {})
    changes = {}
    for lora in network.text_encoder_loras + network.unet_loras:
        module = lora.org_module[0]
        changes[names[id(module)]] = effective_weight(module) - module.weight.detach()
    return path, changes, network


def _params():
    for case, value in CASES.items():
        marks = value.marks if hasattr(value, "marks") else ()
        algo, options = value.values[0] if hasattr(value, "values") else value
        yield pytest.param((case, algo, options), marks=marks, id=case)


@pytest.fixture(scope="module", params=list(_params()))
def lycoris_file(request, tmp_path_factory):
    case, algo, options = request.param
    return save_lycoris_file(tmp_path_factory.mktemp(case), case, algo, options)


def test_lycoris_file_applies_lycoris_changes_live_and_fused(lycoris_file):
    path, want, _ = lycoris_file
    assert any(m.startswith("text_encoder.") for m in want)  # written as lora_te_encoder_*
    pipe = build_tiny_pipeline("sd1", seed=0)
    base = base_weights(pipe)
    load_adapters(pipe, [(str(path), 1.0)])
    errors = {"live": relative_errors(applied_changes(pipe, base, want), want)}
    fuse_loaded(pipe)  # what `generate --fuse` does after loading
    errors["generate --fuse"] = relative_errors(stored_changes(pipe, base, want), want)
    assert changed_modules(pipe, base) == set(want)  # every module, and no other
    merged = build_tiny_pipeline("sd1", seed=0)
    fuse_adapters(merged, [(path, 1.0)])  # what `merge --base` does
    errors["merge --base"] = relative_errors(stored_changes(merged, base, want), want)
    assert changed_modules(merged, base) == set(want)
    worst = {route: max(e.values()) for route, e in errors.items()}
    assert max(worst.values()) <= TOLERANCE, worst


def test_inspect_names_algorithm_modules_ranks_and_alphas(lycoris_file, capsys):
    path, want, network = lycoris_file
    summary = inspect_adapter(path)
    algorithms, ranks, alphas = _expected_summary(network)
    assert summary.modules == len(want)
    assert dict(summary.algorithms) == algorithms
    assert dict(summary.ranks) == ranks
    assert dict(summary.alphas) == alphas
    assert main(["inspect", str(path)]) == 0
    shown = capsys.readouterr().out
    assert "algorithm   " + ", ".join(f"{k} x{n}" for k, n in sorted(algorithms.items())) in shown


@pytest.fixture(scope="module")
def loha_and_lokr(tmp_path_factory):
    folder = tmp_path_factory.mktemp("merge")
    loha = save_lycoris_file(folder, "loha", "loha", {})
    lokr = save_lycoris_file(folder, "lokr", "lokr", {})
    return loha[:2], lokr[:2]


def test_merge_and_resize_take_loha_and_lokr_through_their_changes(loha_and_lokr, tmp_path):
    from sdtune.adapters.export import read_for_family, write_layers
    from sdtune.adapters.lowrank import compute_delta
    from sdtune.adapters.merge import merge_adapters, resize_adapter

    pipe = build_tiny_pipeline("sd1", seed=0)
    (loha, loha_changes), (lokr, lokr_changes) = loha_and_lokr
    a, b = (read_for_family(path, "sd1", base=pipe)[0] for path in (loha, lokr))
    merged, _ = merge_adapters([(a, 0.5), (b, -2.0)])  # exact: the factors concatenated
    for module, layer in merged.items():
        want = 0.5 * loha_changes[module] - 2.0 * lokr_changes[module]
        error = float((compute_delta(layer) - want).norm() / want.norm())
        assert error <= TOLERANCE, (module, error)
    assert set(merged) == set(loha_changes) | set(lokr_changes)
    out = write_layers(merged, tmp_path / "merged.safetensors", "sd1", modules=None)
    merged_pipe = build_tiny_pipeline("sd1", seed=0)
    base = base_weights(merged_pipe)
    fuse_adapters(merged_pipe, [(out, 1.0)])  # the written file applies the same changes
    got = stored_changes(merged_pipe, base, merged)
    want = {m: 0.5 * loha_changes[m] - 2.0 * lokr_changes[m] for m in merged}
    assert max(relative_errors(got, want).values()) <= TOLERANCE
    full, reports = resize_adapter(a, 64)  # at or above every layer's exact rank: lossless
    for module, layer in full.items():
        error = float((compute_delta(layer) - loha_changes[module]).norm())
        assert error <= TOLERANCE * float(loha_changes[module].norm()), module
    assert min(r.energy for r in reports) > 1 - 1e-5
    _, low = resize_adapter(a, 2)  # LoHa rank 4 x 4 = 16 down to 2: part of it is kept
    assert all(0 < r.energy < 1 for r in low if r.rank == 2)


def test_a_lycoris_algorithm_that_cannot_be_applied_is_refused_before_loading(tmp_path):
    from sdtune.errors import SdtuneError

    path, _, _ = save_lycoris_file(tmp_path, "oft", "diag-oft", {})
    pipe = build_tiny_pipeline("sd1", seed=0)
    base = base_weights(pipe)
    with pytest.raises(SdtuneError, match=r"LyCORIS OFT \(oft_blocks\) layers cannot be applied"):
        load_adapters(pipe, [(str(path), 1.0)])
    with pytest.raises(SdtuneError, match="OFT"):
        fuse_adapters(pipe, [(path, 1.0)])
    assert not changed_modules(pipe, base)  # nothing half-loaded
    assert not any(hasattr(m, "get_base_layer") for m in canonical_modules(pipe).values())


@pytest.mark.parametrize("algo", ["lora", "loha", "lokr"])
def test_lycoris_sdxl_files_apply_lycoris_changes_live_and_fused(algo, tmp_path):
    """LoRA/LoCon, LoHa and LoKr on a tiny SDXL (both text encoders), read by sdtune's loader."""
    path, want, _ = save_lycoris_file(tmp_path, algo, algo, {}, family="sdxl")
    assert {m.partition(".")[0] for m in want} == {"unet", "text_encoder", "text_encoder_2"}
    assert {"unet.add_embedding.linear_1", "unet.mid_block.resnets.0.conv1"} <= set(want)
    pipe = build_tiny_pipeline("sdxl", seed=0)
    base = base_weights(pipe)
    load_adapters(pipe, [(str(path), 1.0)])  # attach_adapter: sdtune reads, diffusers applies
    errors = {"live": relative_errors(applied_changes(pipe, base, want), want)}
    merged = build_tiny_pipeline("sdxl", seed=0)
    fuse_adapters(merged, [(path, 1.0)])  # what `merge --base` does
    errors["merge --base"] = relative_errors(stored_changes(merged, base, want), want)
    assert changed_modules(merged, base) == set(want)  # every module, and no other
    worst = {route: max(e.values()) for route, e in errors.items()}
    assert max(worst.values()) <= TOLERANCE, worst
    assert inspect_adapter(path).modules == len(want)
    assert inspect_adapter(path).family == "sdxl"  # told by its lora_te2_ names
    # the same file with the U-Net under its original names (LyCORIS on kohya's SGM U-Net)
    from safetensors.torch import load_file, save_file

    from sdtune.adapters.formats import kohya_name
    from sdtune.adapters.load import model_modules, read_adapter

    modules = model_modules(pipe)
    renamed = {kohya_name(m): kohya_name(m, modules.original) for m in want if "unet." in m}
    state = {}
    for key, value in load_file(str(path)).items():
        name, _, rest = key.partition(".")
        state[f"{renamed.get(name, name)}.{rest}"] = value
    assert any(k.startswith("lora_unet_input_blocks_4_1_") for k in state)
    save_file(state, str(tmp_path / "sgm.safetensors"))
    first = read_adapter(path, modules).layers
    second = read_adapter(tmp_path / "sgm.safetensors", modules).layers
    assert first.keys() == second.keys() == set(want)
    assert all(torch.equal(second[m].tensors[0], layer.tensors[0]) for m, layer in first.items())
