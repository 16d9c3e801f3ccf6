"""Fuse, merge, resize and extract: exact where the math says exact, measured where it is not."""

import numpy as np
import pytest
import torch

from sdtune.adapters.load import model_modules, read_adapter
from sdtune.adapters.lowrank import compute_delta
from sdtune.adapters.merge import (
    extract_lora,
    fuse_adapters,
    lora_shape,
    merge_adapters,
    resize_adapter,
    save_merged_model,
)
from sdtune.cli.main import main
from sdtune.errors import SdtuneError
from sdtune.generate.txt2img import load_adapters
from sdtune.models.loading import load_pipeline
from sdtune.models.tiny import build_tiny_pipeline
from tests.adapters.test_export_and_load import _images, trained_adapter

FUSED_ATOL = 1e-4  # fused vs live: the same sum computed in another order (measured ~1e-6)


@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory):
    a, _ = trained_adapter(tmp_path_factory.mktemp("a"), seed=1)
    b, _ = trained_adapter(tmp_path_factory.mktemp("b"), seed=2, **{"lora.unet_targets": "attn"})
    return a, b


def test_fused_equals_live_for_two_weighted_adapters(two_adapters):
    live = build_tiny_pipeline("sd1")
    load_adapters(live, [(str(two_adapters[0]), 0.7), (str(two_adapters[1]), -0.4)])
    fused = build_tiny_pipeline("sd1")
    fuse_adapters(fused, [(two_adapters[0], 0.7), (two_adapters[1], -0.4)])
    difference = np.abs(_images(live) - _images(fused)).max()
    assert difference <= FUSED_ATOL, difference


def test_merged_checkpoint_reloads_through_the_single_file_path(two_adapters, tmp_path):
    fused = build_tiny_pipeline("sd1")
    fuse_adapters(fused, [(two_adapters[0], 1.0)])
    folder, ckpt = save_merged_model(fused, tmp_path / "merged", tmp_path / "merged.safetensors")
    with pytest.raises(SdtuneError, match="already exists"):
        save_merged_model(fused, tmp_path / "merged")
    from_file = load_pipeline(ckpt, config_dir=folder)  # configs of the tiny model, no weights
    from_folder = load_pipeline(folder)
    expected = _images(fused)
    np.testing.assert_allclose(_images(from_folder), expected, atol=1e-5)
    np.testing.assert_allclose(_images(from_file), expected, atol=1e-5)


def _deltas(layers):
    return {m: compute_delta(layer, lora_shape(layer)) for m, layer in layers.items()}


def test_merge_by_concatenation_is_exact_and_svd_reports_energy(two_adapters):
    modules = model_modules(build_tiny_pipeline("sd1"))
    a, b = (read_adapter(p, modules) for p in two_adapters)
    merged, _ = merge_adapters([(a, 0.5), (b, 2.0)])
    da, db, dm = _deltas(a.layers), _deltas(b.layers), _deltas(merged)
    for module, delta in dm.items():
        want = 0.5 * da.get(module, 0) + 2.0 * db.get(module, 0)
        torch.testing.assert_close(delta, want, atol=1e-5, rtol=1e-4)
    assert merged[next(iter(db))].rank == 8  # ranks add up where both adapt the module
    _, reports = merge_adapters([(a, 0.5), (b, 2.0)], rank=2)
    assert all(0 < r.energy < 1 for r in reports if r.rank == 2)


def test_resize_to_full_rank_is_lossless_and_lower_ranks_report_what_they_keep(two_adapters):
    adapter = read_adapter(two_adapters[0], model_modules(build_tiny_pipeline("sd1")))
    full, reports = resize_adapter(adapter, 4)
    for module, delta in _deltas(full).items():
        torch.testing.assert_close(delta, _deltas(adapter.layers)[module], atol=1e-5, rtol=1e-4)
    assert min(r.energy for r in reports) > 1 - 1e-5
    _, half = resize_adapter(adapter, 2)
    energies = [r.energy for r in half]
    assert 0.3 < min(energies) and max(energies) < 1  # random rank-4 changes: ~0.6-0.9 kept


def test_extract_recovers_a_known_low_rank_difference():
    base, tuned = build_tiny_pipeline("sd1"), build_tiny_pipeline("sd1")
    gen = torch.Generator().manual_seed(5)
    names = ["unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_q", "unet.conv_in"]
    known = {}
    with torch.no_grad():
        for name in names:
            weight = tuned.unet.get_submodule(name.removeprefix("unet.")).weight
            up = torch.randn(weight.shape[0], 2, generator=gen)
            down = torch.randn(2, weight[0].numel(), generator=gen)
            known[name] = (up @ down).reshape(weight.shape)
            weight.add_(known[name])
    layers, reports = extract_lora(base, tuned, rank=2)
    assert set(layers) == set(names)
    for name, delta in _deltas(layers).items():
        torch.testing.assert_close(delta, known[name], atol=1e-4, rtol=1e-4)
    assert all(r.energy > 1 - 1e-6 for r in reports)
    with pytest.raises(SdtuneError, match="nothing to extract"):
        extract_lora(base, build_tiny_pipeline("sd1"), rank=2)


def test_commands_convert_resize_merge_and_push_errors(tmp_path, capsys, monkeypatch):
    path, _ = trained_adapter(tmp_path / "run", **{"lora.unet_targets": "cross-attn"})
    build_tiny_pipeline("sd1").save_pretrained(tmp_path / "base")  # the model it is for
    kohya = tmp_path / "style.safetensors"
    convert = ["convert", str(path), "--to", "kohya", "--out", str(kohya)]
    assert main([*convert, "--model", str(tmp_path / "base")]) == 0
    assert main(convert) == 2
    assert "already exists" in capsys.readouterr().err
    assert (
        main(["resize", str(kohya), "--rank", "2", "--out", str(tmp_path / "r2.safetensors")]) == 0
    )
    assert "kept energy mean" in capsys.readouterr().out
    out = str(tmp_path / "m.safetensors")
    assert main(["merge", "--lora", f"{path}:0.5", "--lora", str(kohya), "--out", out]) == 0
    assert main(["inspect", out]) == 0 and "ranks       8" in capsys.readouterr().out
    monkeypatch.setenv("HF_TOKEN", "")
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    assert main(["push", str(path.parent), "--repo", "me/style"]) == 2
    assert "no Hugging Face token" in capsys.readouterr().err
