"""Images and captions from a Hugging Face `datasets` dataset instead of a folder.

`data.dataset` is a folder written by `save_to_disk`, or a dataset name that `load_dataset`
finds (from the local cache when offline). Rows are read lazily: a sample keeps only its row
number, and the dataset is memory-mapped once per process, so large datasets cost no RAM.
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from sdtune.data.captions import CaptionNotes, build_caption, clean_caption_from
from sdtune.data.images import ImageDecodeError, load_image
from sdtune.errors import SdtuneError


@dataclass(frozen=True)
class DatasetRow:
    """Where one image lives in a dataset; picklable, so data-loader workers can open it."""

    source: str
    split: str
    column: str
    row: int

    def load(self) -> Image.Image:
        return load_image_value(
            open_dataset(self.source, self.split, self.column)[self.row][self.column]
        )


def load_image_value(value) -> Image.Image:
    """Decode what an image column holds: {"bytes", "path"} (an undecoded datasets.Image),
    raw bytes, a file path, or an already decoded PIL image."""
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, (bytes, bytearray)):
        return load_image(io.BytesIO(value))
    if isinstance(value, dict) and value.get("bytes"):
        return load_image(io.BytesIO(value["bytes"]))
    path = value.get("path") if isinstance(value, dict) else value
    if not path or not isinstance(path, str):
        raise ImageDecodeError("the row holds no image")
    return load_image(path)


def select_split(loaded, source: str, split: str):
    """The `split` of a DatasetDict (a plain Dataset is its own split)."""
    import datasets

    if not isinstance(loaded, datasets.DatasetDict):
        return loaded
    if split not in loaded:
        raise SdtuneError(
            f"data.dataset '{source}' has no split '{split}' "
            f"(it has: {', '.join(loaded)}); set data.dataset_split"
        )
    return loaded[split]


@functools.lru_cache(maxsize=4)
def open_dataset(source: str, split: str, image_column: str):
    """The dataset split, with images left undecoded so each is decoded (safely) on demand."""
    import datasets

    try:
        if Path(source).is_dir():
            loaded = datasets.load_from_disk(source)
        else:
            loaded = datasets.load_dataset(source, split=split)
    except Exception as exc:  # datasets raises many types; the user needs one line
        raise SdtuneError(f"data.dataset '{source}' cannot be loaded: {exc}") from None
    loaded = select_split(loaded, source, split)
    if image_column not in loaded.column_names:
        raise SdtuneError(
            f"data.dataset '{source}' has no column '{image_column}' "
            f"(it has: {', '.join(loaded.column_names)}); set data.image_column"
        )
    if isinstance(loaded.features[image_column], datasets.Image):
        loaded = loaded.cast_column(image_column, datasets.Image(decode=False))
    return loaded


def scan_hf_rows(
    source: str,
    split: str,
    image_column: str,
    caption_column: str,
    caption_template: str,
    trigger: str,
    tag_separator: str,
    notes: CaptionNotes,
):
    """Yield (label, DatasetRow, caption) for good rows and (label, None, reason) for bad ones."""
    dataset = open_dataset(source, split, image_column)
    if caption_column not in dataset.column_names:
        raise SdtuneError(
            f"data.dataset '{source}' has no column '{caption_column}' "
            f"(it has: {', '.join(dataset.column_names)}); set data.caption_column"
        )
    captions = dataset[caption_column]
    for row in range(len(dataset)):
        label = Path(f"{source}[{split}][{row}]")
        ref = DatasetRow(source, split, image_column, row)
        try:
            ref.load()
        except ImageDecodeError as exc:
            yield label, None, str(exc)
            continue
        value = captions[row]
        raw = clean_caption_from(str(value), label, notes) if value is not None else None
        yield label, ref, build_caption(raw, label, caption_template, trigger, tag_separator)
