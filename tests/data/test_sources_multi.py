"""Several sources in one run (data.sources): per-source repeats and caption settings, strict
entries, inspect output, the saved config, and an end-to-end run."""

import json
from collections import Counter

import datasets
import pytest
import yaml
from PIL import Image

from sdtune.adapters.io import read_adapter_metadata
from sdtune.cli.main import main
from sdtune.config import load_config, parse_overrides, save_config
from sdtune.data.captions import CaptionAugment, caption_rng
from sdtune.data.sources import scan_data_config
from sdtune.errors import SdtuneError
from sdtune.models.tokenizer import load_tokenizer
from sdtune.train.setup import build_dataloader


def _folder(root, name, count, colour):
    folder = root / name
    folder.mkdir()
    for i in range(count):
        Image.new("RGB", (48, 40), colour).save(folder / f"{name}{i}.png")
        (folder / f"{name}{i}.txt").write_text(f"{name}{i}, tag one, tag two, tag three")
    return folder


@pytest.fixture
def two_folders(tmp_path):
    return _folder(tmp_path, "a", 3, "red"), _folder(tmp_path, "b", 2, "blue")


def _cfg(sources, **extra):
    values = {"model.path": "m", "data.resolution": 32, "data.sources": sources}
    return load_config(None, {**values, **extra})


def _one_epoch(cfg, epoch=0):
    """(caption, draw) of every item the loader's sampler deals out in `epoch`."""
    loader, sampler = build_dataloader(scan_data_config(cfg.data).samples, cfg, load_tokenizer(1))
    sampler.set_epoch(epoch)
    return [(loader.dataset[d]["caption"], d) for d in sampler]


def test_repeats_per_source_weight_each_epoch(two_folders):
    a, b = two_folders
    cfg = _cfg([{"dir": str(a), "repeats": 3}, {"dir": str(b)}], **{"data.repeats": 2})
    for epoch in (0, 1):
        items = _one_epoch(cfg, epoch)
        counts = Counter(caption.split(",")[0] for caption, _ in items)
        # a sets its own repeats; b falls back to data.repeats
        assert counts == {"a0": 3, "a1": 3, "a2": 3, "b0": 2, "b1": 2}
        assert sorted(d for _, d in items) == list(range(13 * epoch, 13 * (epoch + 1)))
    assert _one_epoch(cfg, 1) == _one_epoch(cfg, 1)  # the same draws every time


def test_caption_settings_apply_per_source(two_folders):
    a, b = two_folders
    sources = [
        {"dir": str(a), "trigger": "ohwx", "shuffle_tags": True, "keep_tags": 1},
        {"dir": str(b), "caption_dropout": 1.0},
    ]
    cfg = _cfg(sources, **{"data.trigger": "sks", "train.seed": 5})
    report = scan_data_config(cfg.data)
    static = {s.image_path.stem: s.caption for s in report.samples}
    assert static["a0"] == "ohwx, a0, tag one, tag two, tag three"  # its own trigger in front
    assert static["b0"] == "sks, b0, tag one, tag two, tag three"  # the data.trigger fallback
    loader, sampler = build_dataloader(report.samples, cfg, load_tokenizer(1))
    dataset, shuffle = loader.dataset, CaptionAugment(shuffle_tags=True, keep_tags=1)
    orders = set()
    for epoch in (0, 1, 2):
        for item in range(len(dataset)):
            caption = dataset[epoch * len(dataset) + item]["caption"]
            sample = report.samples[dataset.sample_index(item)]
            if sample.source == 1:
                assert caption == ""  # caption_dropout 1 for b only
                continue
            want = shuffle.apply(sample.caption, caption_rng(5, epoch, item))
            assert caption == want and caption.startswith("ohwx, ")
            assert sorted(caption.split(", ")) == sorted(sample.caption.split(", "))
            orders.add(caption)
    assert len(orders) > 3  # a's tags really are shuffled, not only passed through


def test_entries_are_strict_and_name_the_entry(two_folders):
    a, b = two_folders
    with pytest.raises(SdtuneError, match=r"unknown key 'repeat' in data\.sources\[1\].*'repeats'"):
        _cfg([{"dir": str(a)}, {"dir": str(b), "repeat": 2}])
    with pytest.raises(SdtuneError, match=r"data\.sources\[0\]\.repeats must be int"):
        _cfg([{"dir": str(a), "repeats": "many"}])
    with pytest.raises(SdtuneError, match=r"data\.sources\[0\]\.caption_dropout must be in"):
        _cfg([{"dir": str(a), "caption_dropout": 2}])
    with pytest.raises(SdtuneError, match=r"data\.sources\[1\] needs exactly one of dir or data"):
        _cfg([{"dir": str(a)}, {"repeats": 2}])
    with pytest.raises(SdtuneError, match=r"data\.sources replaces data\.dir"):
        _cfg([{"dir": str(a)}], **{"data.dir": str(b)})
    with pytest.raises(SdtuneError, match=r"data\.sources\[0\] must be a table"):
        _cfg(["just/a/path"])
    # On the command line the list is one YAML value.
    cfg = load_config(None, parse_overrides(["model.path=m", f"data.sources=[{{dir: {a}}}]"]))
    assert cfg.data.sources[0].dir == str(a) and cfg.data.sources[0].repeats is None
    with pytest.raises(SdtuneError, match=r"data\.sources\[0\]: dataset folder .* not exist"):
        scan_data_config(_cfg([{"dir": str(a / "missing")}]).data)


def test_saved_config_round_trips_the_list(two_folders, tmp_path):
    a, b = two_folders
    cfg = _cfg([{"dir": str(a), "repeats": 3, "trigger": "ohwx"}, {"dir": str(b)}])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_inspect_lists_every_source(two_folders, tmp_path, capsys):
    a, b = two_folders
    Image.new("RGB", (48, 40)).save(b / "plain.png")
    (b / "broken.png").write_bytes(b"nope")
    recipe = tmp_path / "r.yaml"
    sources = [
        {"dir": str(a), "repeats": 3, "trigger": "ohwx"},
        {"dir": str(b), "caption_dropout": 0.5},
    ]
    data = {"sources": sources, "resolution": 32, "caption_dropout": 0.2}
    recipe.write_text(yaml.safe_dump({"data": data}))
    assert main(["data", "inspect", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert f"source 0 ({a}): 3 images x 3 repeats = 9 items per epoch, 0 skipped" in out
    assert f"source 1 ({b}): 3 images x 1 repeats = 3 items per epoch, 1 skipped" in out
    assert "trigger 'ohwx': in 3 of 3" in out
    assert "one epoch: 12 items (3 x 3 + 3 x 1 repeats)" in out
    # Each source's own caption augmentation: a inherits data.caption_dropout, b sets its own.
    assert out.count("per epoch:") == 2
    assert out.index("caption_dropout 0.2") < out.index(f"source 1 ({b}):\n")
    assert out.index("caption_dropout 0.5") > out.index(f"source 1 ({b}):\n")


def test_a_run_trains_on_a_folder_and_a_dataset(two_folders, tiny_sd1_dir, tmp_path):
    from sdtune.train.loop import train

    a, _ = two_folders
    rows = {"image": [Image.new("RGB", (40, 40), "green")] * 2, "text": ["green", "grass"]}
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    hf = tmp_path / "hf"
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(hf))
    sources = [
        {"dir": str(a), "repeats": 2, "trigger": "ohwx"},
        {"dataset": str(hf), "image_column": "image", "caption_column": "text"},
    ]
    cfg = _cfg(
        sources,
        **{
            "model.path": str(tiny_sd1_dir),
            "lora.rank": 2,
            "train.batch_size": 2,
            "train.max_steps": 2,
            "output.dir": str(tmp_path / "run"),
        },
    )
    result = train(cfg)
    assert result.steps == 2 and result.adapter_path.is_file()
    assert load_config(tmp_path / "run" / "config.yaml") == cfg
    header = json.loads(read_adapter_metadata(result.adapter_path)["config"])
    assert header["data"]["sources"][1]["dataset"] == str(hf)
    (tmp_path / "header.yaml").write_text(yaml.safe_dump(header))
    assert load_config(tmp_path / "header.yaml") == cfg
