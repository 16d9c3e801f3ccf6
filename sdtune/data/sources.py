"""Where training images come from. For now: a folder of images with caption sidecars."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sdtune.data.captions import build_caption, read_sidecar
from sdtune.data.images import IMAGE_EXTENSIONS, ImageDecodeError, load_image
from sdtune.errors import SdtuneError


@dataclass(frozen=True)
class Sample:
    image_path: Path
    caption: str


@dataclass
class ScanReport:
    """What a scan found: usable samples and the files it had to skip, with reasons."""

    samples: list[Sample] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"{len(self.samples)} images usable, {len(self.skipped)} skipped"]
        lines += [f"  skipped {path}: {reason}" for path, reason in self.skipped]
        return "\n".join(lines)


def scan_image_folder(
    folder: str | Path,
    caption_ext: str = ".txt",
    recursive: bool = True,
    caption_template: str = "{trigger}",
    trigger: str = "",
    tag_separator: str = ",",
) -> ScanReport:
    """Find every decodable image under `folder` and its caption; list the ones that fail."""
    root = Path(folder)
    if not root.exists():
        raise SdtuneError(f"dataset folder '{root}' does not exist")
    if not root.is_dir():
        raise SdtuneError(f"dataset path '{root}' is not a folder")
    pattern = "**/*" if recursive else "*"
    paths = sorted(p for p in root.glob(pattern) if p.suffix.lower() in IMAGE_EXTENSIONS)
    report = ScanReport()
    for path in paths:
        if not path.is_file():
            continue
        try:
            load_image(path)  # decode once now, so a bad file is reported before training starts
        except ImageDecodeError as exc:
            report.skipped.append((path, str(exc)))
            continue
        raw = read_sidecar(path, caption_ext)
        caption = build_caption(raw, path, caption_template, trigger, tag_separator)
        report.samples.append(Sample(path, caption))
    if not report.samples:
        found = f"{len(paths)} image files, none decodable" if paths else "no image files"
        raise SdtuneError(
            f"dataset folder '{root}' is empty: {found} "
            f"(looked for {', '.join(IMAGE_EXTENSIONS)}{', recursively' if recursive else ''})"
        )
    return report
