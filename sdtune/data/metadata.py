"""Captions from `metadata.jsonl` or `metadata.csv` at the top of the dataset folder.

This is the Hugging Face `imagefolder` convention: one row per image, a column naming the file
relative to the folder (`data.image_column`, default `file_name`) and a caption column
(`data.caption_column`, default `text`). Only the top-level metadata file is read; per-split
metadata in sub-folders is not. A metadata file written by someone else must not reach files
outside the dataset, so `../x.png` and absolute paths are refused unless
`data.allow_outside_paths` is set.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdtune.data.captions import CaptionNotes, clean_caption_from, decode_text
from sdtune.errors import SdtuneError

METADATA_NAMES = ("metadata.jsonl", "metadata.csv")


@dataclass(frozen=True)
class MetadataEntry:
    path: Path  # absolute and normalised, so it compares equal to the same file found on disk
    caption: str | None  # cleaned; None means "use the template"
    where: str  # "metadata.jsonl line 3", for messages


def find_metadata(root: Path) -> Path | None:
    """The folder's metadata file, if any; two of them would be ambiguous, so that is an error."""
    found = [root / name for name in METADATA_NAMES if (root / name).is_file()]
    if len(found) > 1:
        raise SdtuneError(
            f"dataset folder '{root}' has both {found[0].name} and {found[1].name}; keep one"
        )
    return found[0] if found else None


def read_metadata(
    path: Path,
    root: Path,
    image_column: str = "file_name",
    caption_column: str = "text",
    allow_outside_paths: bool = False,
    notes: CaptionNotes | None = None,
) -> tuple[list[MetadataEntry], list[str]]:
    """The rows of a metadata file as entries, plus notes about rows that were ignored."""
    text, was_utf8 = decode_text(path.read_bytes())
    if not was_utf8 and notes is not None:
        notes.not_utf8.append(str(path))
    rows = _jsonl_rows(text, path) if path.suffix == ".jsonl" else _csv_rows(text, path)
    entries: dict[Path, MetadataEntry] = {}
    ignored: list[str] = []
    has_caption_column = False
    for line, row in rows:
        where = f"{path.name} line {line}"
        if image_column not in row:
            raise SdtuneError(
                f"{path} line {line} has no '{image_column}' column "
                f"(it has: {', '.join(map(str, row)) or 'nothing'}); set data.image_column"
            )
        image = _resolve(row[image_column], root, path, line, allow_outside_paths)
        has_caption_column |= caption_column in row
        caption = _caption(row.get(caption_column), path, line, notes)
        if image in entries:
            ignored.append(f"{where} lists {image.name} again ({entries[image].where} is used)")
            continue
        entries[image] = MetadataEntry(image, caption, where)
    if entries and not has_caption_column:
        raise SdtuneError(
            f"{path} has no '{caption_column}' column; set data.caption_column to the column "
            "that holds the captions"
        )
    return list(entries.values()), ignored


def _jsonl_rows(text: str, path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SdtuneError(f"{path} line {number} is not valid JSON: {exc.msg}") from None
        if not isinstance(row, dict):
            raise SdtuneError(f"{path} line {number} must be a JSON object, got {line.strip()!r}")
        yield number, row


def _csv_rows(text: str, path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        for row in reader:
            if any(value for value in row.values()):
                yield reader.line_num, {k: v for k, v in row.items() if k is not None}
    except csv.Error as exc:
        raise SdtuneError(f"{path} line {reader.line_num} is not valid CSV: {exc}") from None


def _resolve(file_name: Any, root: Path, path: Path, line: int, allow_outside: bool) -> Path:
    """The absolute image path a row names, refusing paths that leave the dataset folder."""
    if not isinstance(file_name, str) or not file_name.strip():
        raise SdtuneError(f"{path} line {line}: the image column must be a file name")
    name = os.path.normpath(file_name.strip())
    outside = os.path.isabs(name) or name == ".." or name.startswith(".." + os.sep)
    if outside and not allow_outside:
        raise SdtuneError(
            f"{path} line {line} names '{file_name}', outside the dataset folder '{root}'; "
            "move the image into the folder or set data.allow_outside_paths=true"
        )
    return Path(os.path.abspath(root / name))


def _caption(value: Any, path: Path, line: int, notes: CaptionNotes | None) -> str | None:
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise SdtuneError(f"{path} line {line}: the caption must be text, got {value!r}")
    return clean_caption_from(value, f"{path.name} line {line}", notes)
