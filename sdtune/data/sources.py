"""Where training images come from: a folder (sidecars or a metadata file) or a HF dataset.

Every image is decoded once at scan time, so a bad file is named before the model loads, not
halfway through training. Captions come from `metadata.jsonl`/`metadata.csv` for the images it
lists (their sidecars are ignored), from sidecars for the others, else from the template.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from sdtune.data.captions import CaptionNotes, build_caption, read_sidecar
from sdtune.data.hf import scan_hf_rows
from sdtune.data.images import IMAGE_EXTENSIONS, ImageDecodeError, load_image
from sdtune.data.metadata import MetadataEntry, find_metadata, read_metadata
from sdtune.errors import SdtuneError

MIN_IMAGE_SIDE = 8  # pixels; smaller images are skipped and reported


@dataclass(frozen=True)
class Sample:
    image_path: Path  # the file, or a label such as `data[train][3]` for a dataset row
    caption: str
    ref: Any = None  # where the image is when it is not a file: an object with .load()
    size: tuple[int, int] | None = None  # (width, height) upright, when known from the scan
    source: int = 0  # position in data.sources (its repeats and caption settings); 0 without

    def load(self) -> Image.Image:
        return self.ref.load() if self.ref is not None else load_image(self.image_path)


@dataclass
class ScanReport:
    """What a scan found: usable samples, the files it skipped with reasons, caption fixes."""

    samples: list[Sample] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    caption_sources: Counter[str] = field(default_factory=Counter)
    caption_notes: CaptionNotes = field(default_factory=CaptionNotes)
    notes: list[str] = field(default_factory=list)
    metadata_path: Path | None = None
    parts: list[SourceScan] = field(default_factory=list)  # one per data.sources entry

    def summary(self) -> str:
        lines = [f"{len(self.samples)} images usable, {len(self.skipped)} skipped"]
        lines += [f"  {part.line()}" for part in self.parts]
        if self.caption_sources:
            parts = [f"{n} from {src}" for src, n in sorted(self.caption_sources.items())]
            lines.append(f"  captions: {', '.join(parts)}")
        lines += self.caption_notes.lines()
        lines += [f"  note: {note}" for note in self.notes]
        lines += [f"  skipped {path}: {reason}" for path, reason in self.skipped]
        return "\n".join(lines)


@dataclass
class SourceScan:
    """What one entry of data.sources contributed: its label, weighting and own scan."""

    label: str
    repeats: int
    report: ScanReport

    def line(self) -> str:
        images, skipped = len(self.report.samples), len(self.report.skipped)
        return (
            f"source {self.label}: {images} images x {self.repeats} repeats = "
            f"{images * self.repeats} items per epoch, {skipped} skipped"
        )


def scan_data_config(data_cfg) -> ScanReport:
    """Scan what a `DataConfig` describes: each of `sources`, else `dataset` if set, else `dir`."""
    if data_cfg.sources:
        from sdtune.data.multi import scan_sources  # multi.py builds on this module

        return scan_sources(data_cfg)
    if data_cfg.dataset_streaming:
        from sdtune.data.streaming import scan_stream_preview  # it builds on this module too

        return scan_stream_preview(data_cfg)
    return scan_source(data_cfg)


def scan_source(data_cfg) -> ScanReport:
    """Scan one source: a dataset if `dataset` is set, else the folder `dir`."""
    d = data_cfg
    if d.dataset:
        return scan_hf_dataset(
            d.dataset,
            d.dataset_split,
            d.image_column,
            d.caption_column,
            d.caption_template,
            d.trigger,
            d.tag_separator,
        )
    return scan_image_folder(
        d.dir,
        d.caption_ext,
        d.recursive,
        d.caption_template,
        d.trigger,
        d.tag_separator,
        image_column=d.image_column,
        caption_column=d.caption_column,
        allow_outside_paths=d.allow_outside_paths,
    )


def scan_image_folder(
    folder: str | Path,
    caption_ext: str = ".txt",
    recursive: bool = True,
    caption_template: str = "{trigger}",
    trigger: str = "",
    tag_separator: str = ",",
    *,
    image_column: str = "file_name",
    caption_column: str = "text",
    allow_outside_paths: bool = False,
) -> ScanReport:
    """Find every decodable image under `folder` and its caption; list the ones that fail."""
    root = check_folder(folder)
    report = ScanReport()
    files = list_folder_images(
        root,
        recursive,
        report,
        image_column=image_column,
        caption_column=caption_column,
        allow_outside_paths=allow_outside_paths,
    )
    count = len(files) + len(report.skipped)
    for path, entry in files:
        try:
            size = load_image(path).size  # decoded now, so a bad file is reported before training
        except ImageDecodeError as exc:
            report.skipped.append((path, str(exc)))
            continue
        if problem := size_problem(size):
            report.skipped.append((path, problem))
            continue
        if entry is not None:
            raw, source = entry.caption, report.metadata_path.name
        else:
            raw, source = read_sidecar(path, caption_ext, report.caption_notes), "sidecars"
        if raw is None:
            source = "the template"
        report.caption_sources[source] += 1
        caption = build_caption(raw, path, caption_template, trigger, tag_separator)
        report.samples.append(Sample(path, caption, size=size))
    if not report.samples:
        _raise_empty(root, count, recursive)
    return report


def list_folder_images(
    root: Path,
    recursive: bool,
    report: ScanReport,
    *,
    image_column: str = "file_name",
    caption_column: str = "text",
    allow_outside_paths: bool = False,
) -> list[tuple[Path, MetadataEntry | None]]:
    """The image files under `root` and the ones its metadata file lists, in path order, each
    with its metadata entry (None: caption from the sidecar). Listed files that are not there
    go to `report.skipped`; the metadata file, its notes and caption fixes to `report`."""
    report.metadata_path = find_metadata(root)
    listed: dict[Path, MetadataEntry] = {}
    if report.metadata_path is not None:
        entries, ignored = read_metadata(
            report.metadata_path,
            root,
            image_column,
            caption_column,
            allow_outside_paths,
            report.caption_notes,
        )
        listed = {e.path: e for e in entries}
        report.notes += ignored
    found = find_image_files(root, recursive)
    shown = {**{k: k for k in listed}, **found}  # as found on disk where possible
    files = []
    for key in sorted(shown):
        entry, path = listed.get(key), shown[key]
        if entry is not None and not path.is_file():
            report.skipped.append((path, f"listed in {entry.where} but the file does not exist"))
        else:
            files.append((path, entry))
    return files


def check_folder(folder: str | Path) -> Path:
    """`folder` as a Path, or an SdtuneError if it is missing or not a folder."""
    root = Path(folder)
    if not root.exists():
        raise SdtuneError(f"dataset folder '{root}' does not exist")
    if not root.is_dir():
        raise SdtuneError(f"dataset path '{root}' is not a folder")
    return root


def find_image_files(root: Path, recursive: bool = True) -> dict[Path, Path]:
    """Image files under `root` by extension: {absolute path: path as found under root}."""
    pattern = "**/*" if recursive else "*"
    return {
        Path(os.path.abspath(p)): p
        for p in root.glob(pattern)
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    }


def size_problem(size: tuple[int, int]) -> str | None:
    """Why an image of `size` (width, height) is skipped, or None when it is big enough."""
    if min(size) < MIN_IMAGE_SIDE:  # a thumbnail or a tracking pixel teaches nothing
        return f"too small: {size[0]}x{size[1]} px (at least {MIN_IMAGE_SIDE} a side)"
    return None


def scan_hf_dataset(
    source: str,
    split: str = "train",
    image_column: str = "image",
    caption_column: str = "text",
    caption_template: str = "{trigger}",
    trigger: str = "",
    tag_separator: str = ",",
) -> ScanReport:
    """Every row of a Hugging Face dataset whose image decodes, with its caption."""
    report = ScanReport()
    rows = scan_hf_rows(
        source,
        split,
        image_column,
        caption_column,
        caption_template,
        trigger,
        tag_separator,
        report.caption_notes,
    )
    for label, ref, text in rows:
        if ref is None:
            report.skipped.append((label, text))
        else:
            report.samples.append(Sample(label, text, ref))
    if not report.samples:
        raise SdtuneError(
            f"data.dataset '{source}' split '{split}' has no usable images "
            f"({len(report.skipped)} rows, none decodable)"
        )
    return report


def _raise_empty(root: Path, count: int, recursive: bool) -> None:
    found = f"{count} image files, none decodable" if count else "no image files"
    raise SdtuneError(
        f"dataset folder '{root}' is empty: {found} "
        f"(looked for {', '.join(IMAGE_EXTENSIONS)}{', recursively' if recursive else ''})"
    )


def split_validation(samples: list, fraction: float, seed: int) -> tuple[list, list]:
    """(training samples, held-out samples): a seeded choice of at least one image if asked."""
    if fraction <= 0 or len(samples) < 2:
        return samples, []
    count = min(len(samples) - 1, max(1, round(len(samples) * fraction)))
    held = set(random.Random(seed).sample(range(len(samples)), count))
    return (
        [s for i, s in enumerate(samples) if i not in held],
        [s for i, s in enumerate(samples) if i in held],
    )
