"""Streaming a dataset (data.dataset_streaming): a seeded shuffle per epoch, rows shared out
across processes and workers without changing a step, captions through the caption pipeline,
exact resume by skipping consumed rows, and what a stream refuses."""

import datasets
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from sdtune.config import load_config
from sdtune.data.captions import CaptionAugment, caption_rng
from sdtune.data.sources import scan_data_config
from sdtune.data.streaming import EPOCH_STRIDE
from sdtune.errors import SdtuneError
from sdtune.models.tokenizer import load_tokenizer
from sdtune.train.setup import build_dataloader

ROWS = 12


def _write(folder, bad=(), rows=ROWS, parquet=False):
    """`rows` rows saved with save_to_disk, or as two parquet files; the rows in `bad` hold
    garbage instead of an image."""
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    images = [Image.new("RGB", (40, 32), (20 * i, 255 - 20 * i, 90)) for i in range(rows)]
    for i in bad:
        images[i] = {"bytes": b"not an image", "path": None}
    texts = [f"row{i}, red, green, blue" for i in range(rows)]
    table = datasets.Dataset.from_dict({"image": images, "text": texts}, features=features)
    if not parquet:
        table.save_to_disk(str(folder))
        return folder
    table.select(range(rows // 2)).to_parquet(str(folder / "part-0.parquet"))
    table.select(range(rows // 2, rows)).to_parquet(str(folder / "part-1.parquet"))
    return folder


@pytest.fixture(scope="module")
def with_bad_row(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("arrow") / "data", bad=[7])


@pytest.fixture(scope="module")
def clean_dir(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("clean") / "data")


def _cfg(folder, **extra):
    return load_config(None, {**_cfg_values(folder), **extra})


def _cfg_values(folder) -> dict:
    return {
        "model.path": "m",
        "data.dataset": str(folder),
        "data.dataset_streaming": True,
        "data.image_column": "image",
        "data.caption_column": "text",
        "data.resolution": 16,
        "data.shuffle_buffer": 5,
        "train.batch_size": 2,
        "train.seed": 3,
    }


def _items(cfg, epoch=0, rank=0, world_size=1, skip=0):
    """The items of one pass: (draw, caption, pixels) in loader order."""
    loader, stream = build_dataloader([], cfg, load_tokenizer(1), rank, world_size)
    stream.set_epoch(epoch)
    stream.skip_next(skip)
    out = []
    for batch in loader:
        for i, draw in enumerate(batch["draws"]):
            out.append((draw, batch["captions"][i], batch["pixel_values"][i]))
    return out


def _row(caption: str) -> str:
    return next(tag.strip() for tag in caption.split(",") if tag.strip().startswith("row"))


def test_each_epoch_is_a_seeded_shuffle_of_every_row(with_bad_row, caplog):
    cfg = _cfg(with_bad_row, **{"data.trigger": "sks"})
    report = scan_data_config(cfg.data)
    assert len(report.samples) == 7 and "row 7" in str(report.skipped[0][0])
    first, again, second = _items(cfg, 0), _items(cfg, 0), _items(cfg, 1)
    for epoch, items in ((0, first), (1, second)):
        assert [d for d, _, _ in items] == [epoch * EPOCH_STRIDE + k for k in range(ROWS)]
    rows = [_row(c) for _, c, _ in first]
    assert sorted(rows) != rows  # shuffled
    assert [_row(c) for _, c, _ in second] != rows  # reshuffled per epoch
    assert [c for _, c, _ in again] == [c for _, c, _ in first]  # seeded
    assert all(torch.equal(a[2], b[2]) for a, b in zip(first, again, strict=True))
    # The bad row's slot is filled by the last good row: row 7 is missing, one row twice.
    assert set(rows) == {f"row{i}" for i in range(ROWS) if i != 7} and len(rows) == ROWS
    assert "position" in caplog.text and "reusing the last good row" in caplog.text
    assert all(c.startswith("sks, row") for _, c, _ in first)  # the trigger, put in front


def test_caption_augmentation_is_keyed_on_epoch_and_position(with_bad_row):
    cfg = _cfg(with_bad_row, **{"data.shuffle_tags": True, "data.keep_tags": 1})
    augment = CaptionAugment(shuffle_tags=True, keep_tags=1)
    for epoch in (0, 1):
        for draw, caption, _ in _items(cfg, epoch):
            k = draw - epoch * EPOCH_STRIDE
            static = f"{_row(caption)}, red, green, blue"
            assert caption == augment.apply(static, caption_rng(3, epoch, k))


def test_processes_share_rows_and_a_step_sees_the_same_rows(clean_dir, tmp_path):
    one = _items(_cfg(clean_dir, **{"train.batch_size": 4}), epoch=1)
    ranks = [_items(_cfg(clean_dir), epoch=1, rank=r, world_size=2) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == ROWS // 2
    for step in range(ROWS // 4):
        together = ranks[0][2 * step : 2 * step + 2] + ranks[1][2 * step : 2 * step + 2]
        assert sorted(d for d, _, _ in together) == sorted(d for d, _, _ in one[4 * step :][:4])
        for draw, caption, pixels in together:
            match = next(item for item in one if item[0] == draw)
            assert caption == match[1] and torch.equal(pixels, match[2])
    # 11 rows over 2 processes: the tail that does not divide evenly is left out of both.
    odd = _cfg(_write(tmp_path / "odd", rows=11))
    assert [len(_items(odd, 0, r, 2)) for r in (0, 1)] == [5, 5]


def test_workers_give_the_same_batches_and_resume_skips_exactly(with_bad_row):
    plain = _items(_cfg(with_bad_row), epoch=2)
    workers = _items(_cfg(with_bad_row, **{"train.num_workers": 2}), epoch=2)
    assert [(d, c) for d, c, _ in workers] == [(d, c) for d, c, _ in plain]
    resumed = _items(_cfg(with_bad_row), epoch=2, skip=6)
    assert [(d, c) for d, c, _ in resumed] == [(d, c) for d, c, _ in plain[6:]]
    assert all(torch.equal(a[2], b[2]) for a, b in zip(resumed, plain[6:], strict=True))


@pytest.mark.parametrize(
    "extra,key",
    [
        ({"data.bucketing": True}, "data.bucketing"),
        ({"data.validation_split": 0.2}, "data.validation_split"),
        ({"data.repeats": 2}, "data.repeats"),
        ({"data.cache_latents": True}, "data.cache_latents"),
        ({"data.shuffle_buffer": 0}, "data.shuffle_buffer"),
    ],
)
def test_what_a_stream_refuses_is_named(with_bad_row, extra, key):
    with pytest.raises(SdtuneError, match=key):
        _cfg(with_bad_row, **extra)


def test_parquet_files_stream_every_row(tmp_path):
    folder = _write(tmp_path, rows=6, parquet=True)
    cfg = _cfg(folder, **{"data.trigger": "sks"})
    assert len(scan_data_config(cfg.data).samples) == 6
    items = _items(cfg)  # one pass: a shuffled parquet stream pauses ~5 s as it closes
    assert sorted(_row(c) for _, c, _ in items) == [f"row{i}" for i in range(6)]
    assert all(c.startswith("sks, ") and p.shape == (3, 16, 16) for _, c, p in items)
    with pytest.raises(SdtuneError, match=r"no column 'caption'.*data\.caption_column"):
        scan_data_config(_cfg(folder, **{"data.caption_column": "caption"}).data)


def test_an_imagefolder_with_metadata_streams(tmp_path):
    for i in range(3):
        Image.new("RGB", (30, 30), (80 * i, 0, 0)).save(tmp_path / f"{i}.png")
    lines = [f'{{"file_name": "{i}.png", "text": "cap{i}"}}' for i in range(3)]
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    cfg = _cfg(tmp_path, **{"data.trigger": "sks"})
    assert sorted(c for _, c, _ in _items(cfg)) == ["sks, cap0", "sks, cap1", "sks, cap2"]


def test_inspect_checks_the_first_rows_only(clean_dir, capsys):
    from sdtune.cli.main import main

    args = [f"{k}={v}" for k, v in _cfg_values(clean_dir).items() if k != "model.path"]
    assert main(["data", "inspect", *args]) == 0
    out = capsys.readouterr().out
    assert "8 images usable" in out and "streamed: the first 8 rows were checked" in out
    assert f"one shuffled pass over the stream ({ROWS} rows)" in out


def test_bad_streams_are_one_line_errors(with_bad_row, tmp_path):
    with pytest.raises(SdtuneError, match=r"no column 'caption'.*data\.caption_column"):
        scan_data_config(_cfg(with_bad_row, **{"data.caption_column": "caption"}).data)
    (tmp_path / "x.parquet").write_bytes(b"PAR1 broken")
    with pytest.raises(SdtuneError, match=r"cannot be streamed") as err:
        scan_data_config(_cfg(tmp_path).data)
    assert "\n" not in str(err.value)


@pytest.mark.slow  # three short training runs; the data-level resume test above is fast
def test_a_streamed_run_resumes_exactly(tiny_sd1_dir, tmp_path, monkeypatch):
    import sdtune.train.loop as loop
    from sdtune.train.loop import train

    folder = _write(tmp_path / "data", rows=4)

    def cfg(out, **extra):
        values = {
            "model.path": str(tiny_sd1_dir),
            "data.resolution": 32,
            "data.random_flip": True,
            "data.shuffle_tags": True,
            "lora.rank": 2,
            "train.max_steps": 4,
            "train.checkpoint_every_n_steps": 3,
            "output.dir": str(out),
        }
        return _cfg(folder, **{**values, **extra})

    whole = train(cfg(tmp_path / "whole"))
    real, calls = loop.training_step, {"n": 0}

    def crashing(batch, run):  # 2 batches an epoch: the checkpoint is mid-way through epoch 1
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("simulated crash")
        return real(batch, run)

    monkeypatch.setattr(loop, "training_step", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg(tmp_path / "broken"))
    monkeypatch.undo()
    resumed = train(cfg(tmp_path / "broken", **{"train.resume": "latest"}))
    assert resumed.steps == whole.steps == 4
    a, b = load_file(str(resumed.adapter_path)), load_file(str(whole.adapter_path))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_streamed_items_carry_their_original_size_and_crop(clean_dir):
    # 40 x 32 rows, short side to 16: 20 x 16, the centre square starts (20 - 16) // 2 = 2 in.
    loader, stream = build_dataloader([], _cfg(clean_dir), load_tokenizer(1))
    stream.set_epoch(0)
    batch = next(iter(loader))
    assert batch["original_size"].tolist() == [[32, 40]] * 2
    assert batch["crop_top_left"].tolist() == [[0, 2]] * 2
    assert batch["target_size"].tolist() == [[16, 16]] * 2
