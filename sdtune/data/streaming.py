"""Streaming a Hugging Face dataset (`data.dataset_streaming=true`): rows are read as training
goes, for sets too large to scan or to download first.

`data.dataset` is a hub name, a `save_to_disk` folder, a data file (.parquet, .arrow, .jsonl,
.csv) or a folder of them, or an `imagefolder`. Each epoch is one pass over a seeded shuffle
(a buffer of `data.shuffle_buffer` rows; `datasets` reshuffles with seed + epoch), and a row's
position `k` in that pass plays the part of the item index: its crop, caption augmentation and
noise come from (seed, epoch, k), as in `dataset.py`.

Several processes: every process reads the same shuffled stream and keeps the rows at
positions `k % world_size == rank`, and only whole groups of `world_size` rows, so all processes
run the same number of batches (DDP waits forever for one that runs out early) and a step sees
the same rows as one process with the whole batch. (`datasets.distributed.split_dataset_by_node`
hands whole shards to processes instead, whose lengths differ.) Each process reads every row
but decodes only its own. Data-loader workers take whole batches in turn, so the loader yields
the same batches with or without workers.

Resume is exact: a resumed run replays the same shuffle and skips, without decoding them, the
rows of this epoch it already trained on. It assumes the data did not change in between.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from pathlib import Path

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from sdtune.data.captions import CaptionAugment, build_caption, caption_rng, clean_caption_from
from sdtune.data.hf import load_image_value, select_split
from sdtune.data.images import IMAGE_EXTENSIONS, ImageDecodeError
from sdtune.data.sources import Sample, ScanReport
from sdtune.data.transforms import (
    apply_fit,
    compute_size_conditioning,
    compute_square_fit,
    to_tensor,
)
from sdtune.errors import SdtuneError

logger = logging.getLogger("sdtune.data")

EPOCH_STRIDE = 1 << 32  # draw = epoch * EPOCH_STRIDE + position: an epoch of < 4e9 rows
_FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".jsonl": "json", ".csv": "csv"}
PREVIEW_ROWS = 8  # rows read before the model loads, to check columns and images


def open_stream(source: str, split: str):
    """The dataset as a `datasets.IterableDataset`, unshuffled; any loading error is one line."""
    import datasets

    path = Path(source)
    try:
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return select_split(
                datasets.load_from_disk(source), source, split
            ).to_iterable_dataset()
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        if path.is_dir() and any(p.suffix.lower() in IMAGE_EXTENSIONS for p in files):
            return datasets.load_dataset(  # images with a metadata.jsonl/csv: an imagefolder
                "imagefolder", data_dir=source, split=split, streaming=True
            )
        data = [p for p in files if p.suffix in _FILE_BUILDERS]
        if data:
            builder = _FILE_BUILDERS[data[0].suffix]
            data = [str(p) for p in data if p.suffix == data[0].suffix]
            return datasets.load_dataset(
                builder, data_files={split: data}, split=split, streaming=True
            )
        return datasets.load_dataset(source, split=split, streaming=True)
    except SdtuneError:
        raise
    except Exception as exc:  # datasets raises many types; the user needs one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SdtuneError(f"data.dataset '{source}' cannot be streamed: {first}") from None


def _undecoded(stream, image_column: str):
    """Images left as bytes, so they are decoded by sdtune's safe decoder (and only when kept)."""
    import datasets

    features = stream.features or {}
    if isinstance(features.get(image_column), datasets.Image):
        stream = stream.cast_column(image_column, datasets.Image(decode=False))
    return stream


def _check_columns(row: dict, source: str, data_cfg) -> None:
    for key, column in (
        ("image_column", data_cfg.image_column),
        ("caption_column", data_cfg.caption_column),
    ):
        if column not in row:
            raise SdtuneError(
                f"data.dataset '{source}' has no column '{column}' "
                f"(it has: {', '.join(row)}); set data.{key}"
            )


def scan_stream_preview(data_cfg) -> ScanReport:
    """Check a streamed dataset before the model loads: its columns and first rows' images."""
    d, report = data_cfg, ScanReport()
    stream = _undecoded(open_stream(d.dataset, d.dataset_split), d.image_column)
    for k, row in enumerate(_rows(stream, PREVIEW_ROWS)):
        if k == PREVIEW_ROWS:
            break
        _check_columns(row, d.dataset, d)
        label = Path(f"{d.dataset}[{d.dataset_split}] row {k}")
        try:
            size = load_image_value(row[d.image_column]).size
        except ImageDecodeError as exc:
            report.skipped.append((label, str(exc)))
            continue
        caption = _static_caption(row, label, d, report)
        report.samples.append(Sample(label, caption, size=size))
    if not report.samples:
        raise SdtuneError(
            f"data.dataset '{d.dataset}' split '{d.dataset_split}': none of the first "
            f"{PREVIEW_ROWS} rows holds a decodable image"
        )
    report.notes.append(
        f"streamed: the first {len(report.samples) + len(report.skipped)} rows were checked; "
        "the rest are read during training (a bad row then reuses the last good one)"
    )
    return report


def _static_caption(row: dict, label: Path, d, report: ScanReport | None = None) -> str:
    """Steps 1-3 of the caption order (captions.py) for one row."""
    value = row.get(d.caption_column)
    notes = report.caption_notes if report is not None else None
    raw = clean_caption_from(str(value), label, notes) if value is not None else None
    if report is not None:
        report.caption_sources["the dataset" if raw is not None else "the template"] += 1
    return build_caption(raw, label, d.caption_template, d.trigger, d.tag_separator)


class StreamingImageDataset(IterableDataset):
    """Square training items from a streamed dataset; also the run's sampler (set_epoch,
    skip_next), since a stream has no indices to sample. See the module docstring."""

    def __init__(self, data_cfg, seed: int, batch_size: int, rank: int = 0, world_size: int = 1):
        self.d, self.seed, self.batch_size = data_cfg, seed, batch_size
        self.rank, self.world_size = rank, world_size
        self.augment = CaptionAugment.from_config(data_cfg)
        self.epoch, self._skip = 0, 0
        self._pass = (0, 0)  # (epoch, rows to skip) of the pass being read
        self.rows = known_rows(data_cfg)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip_next(self, count: int) -> None:
        """Skip this process's first `count` rows of the next pass (a resumed run)."""
        self._skip = count

    def start_pass(self) -> None:
        """Called in the main process before each pass, so workers copy the right epoch."""
        self._pass, self.epoch, self._skip = (self.epoch, self._skip), self.epoch + 1, 0

    def __len__(self) -> int:
        """Rows per epoch over all processes when the source says (else 0: unknown)."""
        return (self.rows or 0) // self.world_size * self.world_size

    def _mine(self, stream) -> Iterator[tuple[int, int, dict]]:
        """(local index, stream position, row) of this process's rows: whole groups only."""
        held, local = None, 0
        for k, row in enumerate(_rows(stream)):
            if k % self.world_size == self.rank:
                held = (k, row)
            if k % self.world_size == self.world_size - 1 and held is not None:
                yield local, held[0], held[1]
                local, held = local + 1, None

    def __iter__(self) -> Iterator[dict]:
        epoch, skip = self._pass
        worker = get_worker_info()
        wid, workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        d = self.d
        stream = _undecoded(open_stream(d.dataset, d.dataset_split), d.image_column)
        stream = stream.shuffle(seed=self.seed, buffer_size=d.shuffle_buffer)
        stream.set_epoch(epoch)
        last_good, waiting = None, []  # a bad row is replaced by the last good one (image and
        # caption), so every process still yields the same number of items
        for local, k, row in self._mine(stream):
            if local < skip or (local // self.batch_size) % workers != wid:
                continue
            label = Path(f"{d.dataset}[{d.dataset_split}] shuffled position {k} of epoch {epoch}")
            try:
                good = load_image_value(row[d.image_column]), row, label
            except ImageDecodeError as exc:
                logger.warning("streamed %s: %s; reusing the last good row", label, exc)
                if last_good is None:
                    waiting.append(k)
                    continue
                good = last_good
            last_good = good
            for early in waiting:
                yield self._item(*good, early, epoch)
            waiting = []
            yield self._item(*good, k, epoch)
        if waiting:
            raise SdtuneError(
                f"data.dataset '{d.dataset}': no streamed row holds a decodable image"
            )

    def _item(self, image, row: dict, label: Path, k: int, epoch: int) -> dict:
        draw = epoch * EPOCH_STRIDE + k
        rng = random.Random(self.seed * 1_000_003 + draw)
        fit = compute_square_fit(image.size, self.d.resolution, self.d.center_crop, rng)
        pixels = to_tensor(apply_fit(image, fit))
        flipped = self.d.random_flip and rng.random() < 0.5
        if flipped:
            pixels = pixels.flip(-1)
        caption = _static_caption(row, label, self.d)
        if self.augment.active:
            caption = self.augment.apply(caption, caption_rng(self.seed, epoch, k))
        item = {"pixel_values": pixels, "caption": caption, "draw": draw}
        return item | compute_size_conditioning(fit, flipped)


def _rows(stream, chunk: int = 64) -> Iterator[dict]:
    """The stream's rows in order. Read through `iter()`: plain iteration inside a data-loader
    worker makes `datasets` hand each worker only some shards, and the worker split is ours."""
    for batch in stream.iter(batch_size=chunk):
        columns = list(batch)
        for values in zip(*(batch[c] for c in columns), strict=True):
            yield dict(zip(columns, values, strict=True))


def known_rows(d) -> int | None:
    """The number of rows when it costs nothing to learn (a saved dataset, parquet footers)."""
    path = Path(d.dataset)
    try:
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            import datasets

            loaded = datasets.load_from_disk(d.dataset)
            return len(
                loaded[d.dataset_split] if isinstance(loaded, datasets.DatasetDict) else loaded
            )
        files = [path] if path.is_file() else sorted(path.rglob("*.parquet"))
        if files and all(p.suffix == ".parquet" for p in files):
            import pyarrow.parquet as pq

            return sum(pq.ParquetFile(p).metadata.num_rows for p in files)
    except Exception:  # only a count for the log; the stream itself reports real errors
        return None
    return None


class StreamLoader(DataLoader):
    """A DataLoader that starts the stream's next pass in the main process, before its workers
    take their copy of the dataset (they would otherwise all replay the first epoch)."""

    def __iter__(self):
        self.dataset.start_pass()
        return super().__iter__()
