"""A dataset folder as an editor sees it: images with their captions, edits written back.

What is listed is what training would read: the same files (sdtune.data.sources), the same
caption text (a metadata file's caption where it lists the image, else the cleaned sidecar),
the same reasons for skipping a file. Sizes are read from image headers, not decoded, so a
thousand photos list in well under a second; `verify=True` decodes each one as the scan
before training does and so also finds files torn past their header.

Edits go to caption sidecars only, through a temporary file renamed into place
(sdtune.data.files), and only for images inside the folder: the images are never written.
Images whose caption comes from metadata.jsonl/csv are edited there, not here.

`bucket_plan` is the dry run of the crops: for each image, the region training keeps, in the
original image's pixels, computed by the same functions the training transform uses.
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from sdtune.config import DataConfig
from sdtune.data.buckets import assign_sample_buckets
from sdtune.data.captions import clean_caption, count_tags, prepend_tag, read_sidecar
from sdtune.data.files import save_atomic
from sdtune.data.images import IMAGE_EXTENSIONS, ImageDecodeError, load_image, probe_image
from sdtune.data.metadata import find_metadata, read_metadata
from sdtune.data.sources import (
    Sample,
    ScanReport,
    check_folder,
    list_folder_images,
    scan_data_config,
    size_problem,
    split_validation,
)
from sdtune.data.transforms import Fit, compute_bucket_fit, compute_square_fit
from sdtune.errors import SdtuneError, quote, quote_path


@dataclass
class DatasetItem:
    """One image training would use."""

    path: str  # relative to the folder, with forward slashes
    caption: str  # the text training reads (cleaned), "" when there is none
    has_caption: bool  # False: training falls back to data.caption_template
    width: int  # upright (EXIF orientation applied), as training sees it
    height: int
    caption_source: str = "sidecar"  # "sidecar", or the metadata file's name (edit it there)


@dataclass
class SkippedFile:
    """An image file training would skip, with the reason its scan gives."""

    path: str
    reason: str


@dataclass
class DatasetView:
    """The images of a folder and the files skipped, in path order."""

    folder: str
    items: list[DatasetItem] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)
    metadata: str = ""  # name of the metadata file whose captions win over sidecars, if any
    notes: list[str] = field(default_factory=list)  # e.g. metadata rows that were ignored


@dataclass
class BucketBox:
    """What training makes of one image: its size, and the region of it that is kept."""

    path: str  # relative to data.dir (or its source's dir) where it lies inside, else as given
    width: int  # the original, upright
    height: int
    bucket: tuple[int, int]  # (width, height) the image is brought to: bucket or training square
    crop: tuple[float, float, float, float]  # (x0, y0, x1, y1) kept, original pixels
    placed: tuple[int, int, int, int]  # where the resized image lies in the bucket (padding)
    upscaled: bool  # blown up past its own size
    padded: bool  # part of the bucket is padding (data.pad)
    random_crop: bool  # the crop moves each epoch: `crop` is its size, shown at the centre
    source: int = 0  # position in data.sources
    held_out: bool = False  # a validation image (data.validation_split): never trained on


def list_dataset(
    folder: str | Path, caption_ext: str = ".txt", recursive: bool = True, *, verify: bool = False
) -> DatasetView:
    """The images of `folder` with their captions and sizes, and the files training skips.

    Sizes come from image headers; `verify` decodes every image instead (as the scan before
    training does: a torn file is then skipped here too, at the cost of a full decode).
    """
    return _view(check_folder(folder), caption_ext, recursive, verify)


def _view(root: Path, caption_ext: str, recursive: bool, verify: bool, **columns) -> DatasetView:
    """`list_dataset`, with the metadata options of a DataConfig (`image_column`, ...)."""
    check_caption_ext(caption_ext)
    report = ScanReport()
    files = list_folder_images(root, recursive, report, **columns)
    view = DatasetView(str(root), notes=list(report.notes))
    view.metadata = report.metadata_path.name if report.metadata_path else ""
    for path, entry in files:
        try:
            size = load_image(path).size if verify else probe_image(path)
        except ImageDecodeError as exc:
            view.skipped.append(SkippedFile(_relative(path, root), str(exc)))
            continue
        if problem := size_problem(size):
            view.skipped.append(SkippedFile(_relative(path, root), problem))
            continue
        if entry is not None:
            raw, source = entry.caption, view.metadata
        else:
            raw, source = read_sidecar(path, caption_ext), "sidecar"
        view.items.append(
            DatasetItem(_relative(path, root), raw or "", raw is not None, *size, source)
        )
    view.skipped += [SkippedFile(_relative(p, root), why) for p, why in report.skipped]
    view.skipped.sort(key=lambda s: s.path)
    return view


def save_caption(
    folder: str | Path, image_rel_path: str, text: str, caption_ext: str = ".txt"
) -> Path:
    """Write the caption sidecar of one image of `folder` (atomically, UTF-8); its path.

    Refuses a path that leads outside `folder` (absolute, `..`, a symbolic link out), one that
    is not an image file there, and an image whose caption comes from a metadata file.
    """
    root = check_folder(folder)
    check_caption_ext(caption_ext)
    image = resolve_image(root, image_rel_path)
    _refuse_metadata_captions(root, [image])
    sidecar = image.with_suffix(caption_ext)
    _save_sidecar(sidecar, text)
    return sidecar


def set_trigger(
    folder: str | Path,
    trigger: str,
    replace: str | None = None,
    caption_ext: str = ".txt",
    *,
    separator: str = ",",
    recursive: bool = True,
) -> int:
    """Put `trigger` in every caption of `folder`; the number of sidecars written.

    Without `replace`: `trigger` becomes the first tag (`trigger, ...`) of every caption that
    lacks it as a whole word, and the only tag of images without a caption (their sidecar is
    created). With `replace`: every whole-word occurrence of `replace` becomes `trigger`.
    Captions are rewritten as training reads them (cleaned, UTF-8); each file atomically.
    Nothing is written when an image leads outside the folder or a metadata file holds
    captions of its images (the same refusals as `save_caption`).
    """
    trigger = _one_line(trigger, "trigger")
    old = _one_line(replace, "replace") if replace is not None else None
    view = list_dataset(folder, caption_ext, recursive)
    root = Path(folder)
    images = [resolve_image(root, item.path) for item in view.items]  # all checked before writing
    _refuse_metadata_captions(root, images)
    has_trigger = _word_pattern(trigger)
    written = 0
    for item, image in zip(view.items, images, strict=True):
        if old is None:
            new = item.caption
            if not has_trigger.search(new):
                new = prepend_tag(trigger, new, separator)
        else:
            new = _word_pattern(old).sub(lambda _: trigger, item.caption)
        if new != item.caption:
            try:
                _save_sidecar(image.with_suffix(caption_ext), new)
            except SdtuneError as exc:
                raise SdtuneError(f"{exc} ({written} captions were changed before it)") from None
            written += 1
    return written


def tag_frequency(
    folder: str | Path, separator: str = ",", caption_ext: str = ".txt", *, recursive: bool = True
) -> list[tuple[str, int]]:
    """Each tag of the folder's captions (split on `separator`) and how many times it occurs,
    most common first, ties in name order."""
    return rank_tags(list_dataset(folder, caption_ext, recursive), separator)


def rank_tags(view: DatasetView, separator: str = ",") -> list[tuple[str, int]]:
    """`tag_frequency` of a listing already made."""
    counts = count_tags((item.caption for item in view.items), separator)
    return sorted(counts.items(), key=lambda tag_count: (-tag_count[1], tag_count[0]))


def bucket_plan(cfg: DataConfig, *, verify: bool = True, seed: int = 0) -> list[BucketBox]:
    """For each usable image of a `DataConfig`, the size and region training gives it.

    Scans as training does: every image decoded once, so this costs what the scan before
    training costs. With `verify=False` a folder's image sizes are read from their headers
    instead (as `list_dataset` does; far faster on photos, and the same sizes, but a file torn
    past its header is planned instead of skipped). Centre crops and padding are exact; a random
    crop moves each epoch, so its box is drawn at the centre and marked `random_crop`. Random
    flips are not shown. With data.validation_split, the images training holds out (drawn with
    `seed`, the run's train.seed) are marked `held_out`, with the centred square the validation
    loss sees, and the buckets are those of the images that train.
    """
    d = cfg
    samples = _samples(d, verify)
    training, held = split_validation(samples, d.validation_split, seed)
    held_ids = {id(sample) for sample in held}
    roots = [Path(r) for r in [d.dir, *(s.dir for s in d.sources)] if r]
    mode = "pad" if d.pad else ("center" if d.center_crop else "random")
    buckets = assign_sample_buckets(training, d) if d.bucketing else [None] * len(training)
    bucket_of = {id(sample): bucket for sample, bucket in zip(training, buckets, strict=True)}
    rng = random.Random(0)  # unused: every fit below is centred or padded
    plan = []
    for sample in samples:
        size = sample.size or sample.load().size  # dataset rows carry no size from the scan
        bucket = bucket_of.get(id(sample))
        if bucket is None:  # the training square, or the validation loader's centred square
            fit = compute_square_fit(size, d.resolution, True, rng)
        else:
            fit = compute_bucket_fit(size, bucket, "center" if mode == "random" else mode, rng)
        moves = mode == "random" and id(sample) not in held_ids
        box = _box(_shown_path(sample.image_path, roots), fit, moves, sample)
        plan.append(dataclasses.replace(box, held_out=id(sample) in held_ids))
    return plan


def _samples(d: DataConfig, verify: bool) -> list[Sample]:
    """The samples training would read, or, for a plain folder without `verify`, the same
    files with their sizes from the headers."""
    if verify or d.sources or d.dataset or d.dataset_streaming:
        return scan_data_config(d).samples
    root = check_folder(d.dir)
    view = _view(
        root,
        d.caption_ext,
        d.recursive,
        False,
        image_column=d.image_column,
        caption_column=d.caption_column,
        allow_outside_paths=d.allow_outside_paths,
    )
    return [Sample(root / i.path, i.caption, size=(i.width, i.height)) for i in view.items]


def _box(path: str, fit: Fit, random_crop: bool, sample) -> BucketBox:
    left, top = fit.offset
    placed = (
        (0, 0, *fit.size) if fit.cover else (left, top, left + fit.resized[0], top + fit.resized[1])
    )
    return BucketBox(
        path=path,
        width=fit.source[0],
        height=fit.source[1],
        bucket=fit.size,
        crop=tuple(round(v, 3) for v in fit.source_box()),
        placed=placed,
        upscaled=fit.resized[0] > fit.source[0] or fit.resized[1] > fit.source[1],
        padded=not fit.cover and fit.resized != fit.size,
        random_crop=random_crop and fit.cover,
        source=sample.source,
    )


def resolve_image(root: Path, image_rel_path: str) -> Path:
    """The image file `image_rel_path` names inside `root` (as training finds it, links not
    followed), or an SdtuneError if it leads outside `root` or is not an image file there."""
    text = str(image_rel_path).replace("\\", "/")
    rel = PurePosixPath(text)
    if not text or rel.is_absolute() or re.match(r"^[A-Za-z]:", text):
        raise SdtuneError(
            f"image path {quote_path(image_rel_path)} must be relative to the dataset folder '{root}'"
        )
    if ".." in rel.parts:
        raise SdtuneError(
            f"image path {quote_path(image_rel_path)} leads outside the dataset folder '{root}' "
            "(no '..' allowed)"
        )
    path = root.joinpath(*rel.parts)
    if not path.resolve().is_relative_to(root.resolve()):
        raise SdtuneError(
            f"image path {quote_path(image_rel_path)} leads outside the dataset folder '{root}' "
            f"through a symbolic link (to '{path.resolve()}')"
        )
    if path.suffix.lower() not in IMAGE_EXTENSIONS or not path.is_file():
        what = "no such file" if not path.exists() else "not an image file"
        raise SdtuneError(
            f"image path {quote_path(image_rel_path)} is not an image of the dataset folder '{root}' "
            f"({what}; images end in {', '.join(IMAGE_EXTENSIONS)})"
        )
    return path


def check_caption_ext(caption_ext: str) -> None:
    """A caption extension sdtune may write: `.txt`, `.caption`; never an image's."""
    if not re.fullmatch(r"\.[A-Za-z0-9_-]+", caption_ext) or caption_ext.lower() in (
        IMAGE_EXTENSIONS
    ):
        raise SdtuneError(
            f"caption extension {quote(caption_ext)} is not usable: give a dot and a name that "
            "is not an image type, e.g. '.txt'"
        )


def _refuse_metadata_captions(root: Path, images: list[Path]) -> None:
    """An SdtuneError if the folder's metadata file holds the caption of one of `images`."""
    metadata = find_metadata(root)
    if metadata is None:
        return
    listed = {entry.path for entry in read_metadata(metadata, root)[0]}
    for image in images:
        if Path(os.path.abspath(image)) in listed:
            raise SdtuneError(
                f"the caption of '{image}' comes from {metadata} (its sidecar is not read); "
                f"edit it there, or remove {metadata.name} to use sidecar files"
            )


def _save_sidecar(sidecar: Path, text: str) -> None:
    data = (text if text.endswith("\n") else text + "\n").encode("utf-8")
    try:
        save_atomic(sidecar, data)
    except OSError as exc:
        raise SdtuneError(f"cannot write caption file '{sidecar}': {exc.strerror or exc}") from None


def _one_line(text: str, what: str) -> str:
    cleaned = clean_caption(text)[0]
    if not cleaned:
        raise SdtuneError(f"{what} {quote(text)} is empty; give a word such as 'sks'")
    return cleaned


def _word_pattern(word: str) -> re.Pattern[str]:
    """`word` standing alone: not inside a longer word (`sks` is not in `sksdog`)."""
    return re.compile(rf"(?<!\w){re.escape(word)}(?!\w)")


def _relative(path: Path, root: Path) -> str:
    """`path` relative to `root` with forward slashes, else the whole path."""
    return _inside(path, root) or Path(path).as_posix()


def _inside(path: Path, root: Path) -> str | None:
    for base in (root, Path(os.path.abspath(root))):
        try:
            return Path(path).relative_to(base).as_posix()
        except ValueError:
            continue
    return None


def _shown_path(path, roots: list[Path]) -> str:
    if not isinstance(path, Path):
        return str(path)  # a dataset row's label
    for root in roots:
        if (shown := _inside(path, root)) is not None:
            return shown
    return path.as_posix()
