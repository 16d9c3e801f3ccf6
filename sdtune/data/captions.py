"""Captions: read the sidecar, fall back to a template, make sure the trigger word is there."""

from __future__ import annotations

from pathlib import Path


def read_sidecar(image_path: Path, caption_ext: str) -> str | None:
    """The caption file beside an image (`photo.jpg` -> `photo.txt`), or None if there is none."""
    sidecar = image_path.with_suffix(caption_ext)
    if not sidecar.is_file():
        return None
    text = sidecar.read_bytes().decode("utf-8", errors="replace")
    text = " ".join(text.split())  # newlines and runs of spaces become single spaces
    return text or None


def build_caption(raw: str | None, image_path: Path, template: str, trigger: str) -> str:
    """The training caption: sidecar text or the filled template, with the trigger word in front."""
    caption = raw if raw is not None else template.format(trigger=trigger, name=image_path.stem)
    caption = caption.strip()
    if trigger and trigger not in caption:
        caption = f"{trigger}, {caption}" if caption else trigger
    return caption
