"""Automatic captions: an image-to-text model (BLIP-style) writes a sidecar beside each image.

A folder of photos without captions trains a LoRA that only knows its trigger word; a short
machine caption per image ("a man sitting on a bench") lets the trigger word take the identity
and the caption take everything else. The captions land in the same sidecar files training reads
(`photo.jpg` -> `photo.txt`), so the user can read and fix them before training.

Nothing the user wrote is lost: an existing non-empty sidecar is kept unless `overwrite=True`,
and every write goes to a temporary name that is renamed into place.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdtune.data.captions import clean_caption, decode_text
from sdtune.data.files import save_atomic
from sdtune.data.images import IMAGE_EXTENSIONS, ImageDecodeError, load_image
from sdtune.data.metadata import find_metadata
from sdtune.errors import SdtuneError, first_line

logger = logging.getLogger("sdtune.data")

DEFAULT_CAPTION_MODEL = "Salesforce/blip-image-captioning-base"
# What a model needs from the hub: configs, tokenizer files and safetensors weights (hub repos
# often also hold .bin/.h5 copies of the weights, which would double the download).
_HUB_FILES = ["*.json", "*.txt", "*.model", "*.safetensors"]


@dataclass
class CaptionReport:
    """What a captioning run did to each image: written, kept as it was, or failed (with why)."""

    written: list[tuple[Path, str]] = field(default_factory=list)  # (image, caption written)
    kept: list[Path] = field(default_factory=list)  # had a caption already
    failed: list[tuple[Path, str]] = field(default_factory=list)  # (image, reason)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [
            f"{len(self.written)} captions written, {len(self.kept)} existing captions kept, "
            f"{len(self.failed)} images failed"
        ]
        lines += [f"  note: {note}" for note in self.notes]
        lines += [f"  failed {path}: {reason}" for path, reason in self.failed]
        return "\n".join(lines)


@dataclass
class Captioner:
    """A loaded image-to-text model and its processor, ready to caption batches of images."""

    model: Any
    processor: Any
    device: str
    max_new_tokens: int = 30

    def caption(self, images: Sequence[Any]) -> list[str]:
        """One cleaned caption per PIL image (may be "" if the model says nothing)."""
        import torch

        inputs = self.processor(images=list(images), return_tensors="pt").to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        with torch.inference_mode():
            ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens)
        texts = self.processor.batch_decode(ids, skip_special_tokens=True)
        return [clean_caption(text)[0] for text in texts]


def caption_folder(
    folder: str | Path,
    model: str | Path = DEFAULT_CAPTION_MODEL,
    caption_ext: str = ".txt",
    prefix: str = "",
    overwrite: bool = False,
    batch_size: int = 4,
    max_new_tokens: int = 30,
    recursive: bool = True,
    device: str | None = None,
    progress: bool = True,
) -> CaptionReport:
    """Caption every image under `folder` that has no caption yet; return what happened to each.

    `prefix` (e.g. the trigger word, "sks, ") goes in front of every caption written. The model
    is loaded only when some image needs a caption, so a second run over a done folder is quick.
    """
    root = Path(folder)
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise SdtuneError(f"image folder '{root}' {what}")
    if batch_size < 1 or max_new_tokens < 1:
        raise SdtuneError("batch_size and max_new_tokens must be at least 1")
    if not caption_ext.startswith("."):
        caption_ext = "." + caption_ext
    report = CaptionReport()
    todo = []
    for path in find_images(root, recursive):
        if not overwrite and has_caption(path.with_suffix(caption_ext)):
            report.kept.append(path)
        else:
            todo.append(path)
    metadata = find_metadata(root)
    if metadata is not None:
        report.notes.append(
            f"{metadata.name} is present: training takes the captions of the images it lists "
            "from it, not from sidecars"
        )
    if not todo:
        return report
    captioner = load_captioner(model, device, max_new_tokens)
    for batch in _progress(_batches(todo, batch_size), len(todo), progress):
        images, paths = [], []
        for path in batch:
            try:
                images.append(load_image(path))
                paths.append(path)
            except ImageDecodeError as exc:
                report.failed.append((path, str(exc)))
        if not images:
            continue
        for path, text in zip(paths, captioner.caption(images), strict=True):
            _write_one(path, caption_ext, text, prefix, overwrite, report)
    return report


def find_images(root: Path, recursive: bool = True) -> list[Path]:
    """Image files under `root` (by extension), sorted so runs are reproducible."""
    pattern = "**/*" if recursive else "*"
    return sorted(
        p for p in root.glob(pattern) if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    )


def has_caption(sidecar: Path) -> bool:
    """True if the sidecar exists with some text; an empty placeholder file may be filled."""
    if not sidecar.exists():
        return False
    if not sidecar.is_file():
        return True  # a folder of that name: never touch it
    return bool(decode_text(sidecar.read_bytes())[0].strip())


def with_prefix(prefix: str, caption: str) -> str:
    """`prefix` then the caption, with a space between unless the prefix ends in one."""
    if not prefix:
        return caption
    if not caption or prefix[-1].isspace():
        return (prefix + caption).strip()
    return f"{prefix} {caption}"


def load_captioner(
    model: str | Path, device: str | None = None, max_new_tokens: int = 30
) -> Captioner:
    """Load an image-to-text model from a local folder or a Hugging Face hub id.

    A hub id that is neither cached nor reachable, or a path that does not exist, is a one-line
    `SdtuneError` saying what to do, not a stack of hub exceptions.
    """
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = _resolve_model(model)
    device = _check_device(device)
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    try:
        processor = AutoProcessor.from_pretrained(folder)
        net = AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype)
    except (OSError, ValueError, KeyError) as exc:  # missing files, or not this kind of model
        raise SdtuneError(
            f"{folder}: cannot load as an image-to-text model with its processor "
            f"({first_line(exc)})"
        ) from None
    return Captioner(net.to(device).eval(), processor, device, max_new_tokens)


def _resolve_model(model: str | Path) -> Path:
    """The local folder to load: `model` itself, or the snapshot of a hub id (cached or fetched).

    A path-looking name that does not exist is an error naming it; a hub id that is neither
    cached nor reachable is an error saying how to get it.
    """
    text = str(model)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise SdtuneError(f"captioning model '{text}' is a file; pass the model's folder")
        return path
    looks_like_path = (
        isinstance(model, Path)
        or text.startswith((".", "/", "~", "\\"))
        or text.count("/") > 1
        or "\\" in text
        or (len(text) > 1 and text[1] == ":")  # a Windows drive
    )
    if looks_like_path:
        raise SdtuneError(f"captioning model folder '{text}' does not exist")
    return _download(text)


def _check_device(device: str | None) -> str:
    """The device to run on: cuda when there is one, unless told; a bad name is named."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise SdtuneError(f"device '{device}' is not a torch device; use cpu or cuda") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise SdtuneError(f"device '{device}' was asked for but no CUDA GPU is available")
    return device


def _download(repo_id: str) -> Path:
    """One snapshot call: it uses the cache offline and fails fast, where per-file loading
    would retry every config file against an unreachable hub for minutes."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES))
    except (OSError, ValueError) as exc:  # huggingface_hub's errors derive from these
        raise SdtuneError(
            f"cannot fetch captioning model '{repo_id}': it is not a local folder, not in the "
            f"Hugging Face cache, and the Hub cannot be reached; download it with "
            f"`hf download {repo_id}` on a machine with network, or pass a local folder with "
            f"--model [hub: {first_line(exc)}]"
        ) from None


def _write_one(
    path: Path, caption_ext: str, text: str, prefix: str, overwrite: bool, report: CaptionReport
) -> None:
    """Write one sidecar through a temporary file; never replace a caption unless asked."""
    if not text:
        report.failed.append((path, "the model produced an empty caption"))
        return
    sidecar = path.with_suffix(caption_ext)
    if not overwrite and has_caption(sidecar):  # written by someone else since the scan
        report.kept.append(path)
        return
    caption = with_prefix(prefix, text)
    try:
        save_atomic(sidecar, (caption + "\n").encode("utf-8"))
    except OSError as exc:
        report.failed.append((path, f"cannot write {sidecar}: {exc}"))
        return
    report.written.append((path, caption))


def _batches(items: list[Path], size: int) -> Iterator[list[Path]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _progress(batches: Iterator[list[Path]], total: int, enabled: bool) -> Iterator[list[Path]]:
    """A tqdm bar on a terminal; one log line per batch when output goes to a file or pipe."""
    if not enabled:
        yield from batches
        return
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        with tqdm(total=total, unit="img", desc="captioning") as bar:
            for batch in batches:
                yield batch
                bar.update(len(batch))
        return
    done = 0
    for batch in batches:
        yield batch
        done += len(batch)
        logger.info("captioned %d/%d images", done, total)
