"""Where training images come from: a folder of images with caption sidecars or a metadata file.

Every image is decoded once at scan time, so a bad file is named before the model loads, not
halfway through training. Captions come from `metadata.jsonl`/`metadata.csv` for the images it
lists (their sidecars are ignored), from sidecars for the others, else from the template.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from sdtune.data.captions import CaptionNotes, build_caption, read_sidecar
from sdtune.data.images import IMAGE_EXTENSIONS, ImageDecodeError, load_image
from sdtune.data.metadata import MetadataEntry, find_metadata, read_metadata
from sdtune.errors import SdtuneError


@dataclass(frozen=True)
class Sample:
    image_path: Path
    caption: str


@dataclass
class ScanReport:
    """What a scan found: usable samples, the files it skipped with reasons, caption fixes."""

    samples: list[Sample] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    caption_sources: Counter[str] = field(default_factory=Counter)
    caption_notes: CaptionNotes = field(default_factory=CaptionNotes)
    notes: list[str] = field(default_factory=list)
    metadata_path: Path | None = None

    def summary(self) -> str:
        lines = [f"{len(self.samples)} images usable, {len(self.skipped)} skipped"]
        if self.caption_sources:
            parts = [f"{n} from {src}" for src, n in sorted(self.caption_sources.items())]
            lines.append(f"  captions: {', '.join(parts)}")
        lines += self.caption_notes.lines()
        lines += [f"  note: {note}" for note in self.notes]
        lines += [f"  skipped {path}: {reason}" for path, reason in self.skipped]
        return "\n".join(lines)


def scan_data_config(data_cfg) -> ScanReport:
    """Scan the source a `DataConfig` describes."""
    d = data_cfg
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
    root = Path(folder)
    if not root.exists():
        raise SdtuneError(f"dataset folder '{root}' does not exist")
    if not root.is_dir():
        raise SdtuneError(f"dataset path '{root}' is not a folder")
    report = ScanReport(metadata_path=find_metadata(root))
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
    pattern = "**/*" if recursive else "*"
    found = {
        Path(os.path.abspath(p)): p
        for p in root.glob(pattern)
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    }
    shown = {**{k: k for k in listed}, **found}  # as found on disk where possible
    for key in sorted(shown):
        entry = listed.get(key)
        path = shown[key]
        if entry is not None and not path.is_file():
            report.skipped.append((path, f"listed in {entry.where} but the file does not exist"))
            continue
        try:
            load_image(path)  # decode once now, so a bad file is reported before training starts
        except ImageDecodeError as exc:
            report.skipped.append((path, str(exc)))
            continue
        if entry is not None:
            raw, source = entry.caption, report.metadata_path.name
        else:
            raw, source = read_sidecar(path, caption_ext, report.caption_notes), "sidecars"
        if raw is None:
            source = "the template"
        report.caption_sources[source] += 1
        caption = build_caption(raw, path, caption_template, trigger, tag_separator)
        report.samples.append(Sample(path, caption))
    if not report.samples:
        _raise_empty(root, len(shown), recursive)
    return report


def _raise_empty(root: Path, count: int, recursive: bool) -> None:
    found = f"{count} image files, none decodable" if count else "no image files"
    raise SdtuneError(
        f"dataset folder '{root}' is empty: {found} "
        f"(looked for {', '.join(IMAGE_EXTENSIONS)}{', recursively' if recursive else ''})"
    )
