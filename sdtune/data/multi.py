"""Several sources in one run (`data.sources`): each a folder or dataset with its own repeats
(how much it weighs per epoch) and caption settings.

A source is resolved into a full `DataConfig`: its own keys over the `data.*` options, so every
single-source function (scan, caption pipeline) serves it unchanged. Samples remember the
position of their source; the dataset reads their repeats and caption augmentation from it.
"""

from __future__ import annotations

import dataclasses

from sdtune.config import DataConfig
from sdtune.data.captions import CaptionAugment
from sdtune.data.sources import Sample, ScanReport, SourceScan, scan_source
from sdtune.errors import SdtuneError


def resolve_sources(data_cfg: DataConfig) -> list[DataConfig]:
    """One DataConfig per source (the config itself when `sources` is empty)."""
    if not data_cfg.sources:
        return [data_cfg]
    resolved = []
    for source in data_cfg.sources:
        own = {k: v for k, v in dataclasses.asdict(source).items() if v is not None}
        base = dataclasses.replace(data_cfg, sources=[], dir="", dataset="")
        resolved.append(dataclasses.replace(base, **own))
    return resolved


def source_label(data_cfg: DataConfig, index: int) -> str:
    """How reports name a source: its position and its folder or dataset."""
    return f"{index} ({data_cfg.dataset or data_cfg.dir})"


def scan_sources(data_cfg: DataConfig) -> ScanReport:
    """Scan every source and merge the results; each sample is tagged with its source."""
    merged = ScanReport()
    for index, source in enumerate(resolve_sources(data_cfg)):
        label = source_label(source, index)
        try:
            part = scan_source(source)
        except SdtuneError as exc:
            raise SdtuneError(f"data.sources[{index}]: {exc}") from None
        merged.samples += [dataclasses.replace(s, source=index) for s in part.samples]
        merged.skipped += part.skipped
        merged.caption_sources.update(part.caption_sources)
        for name in ("not_utf8", "control_chars", "empty"):
            getattr(merged.caption_notes, name).extend(getattr(part.caption_notes, name))
        merged.notes += [f"source {label}: {note}" for note in part.notes]
        merged.parts.append(SourceScan(label, source.repeats, part))
    return merged


def repeats_per_sample(samples: list[Sample], data_cfg: DataConfig) -> list[int]:
    """Each sample's repeats per epoch, from its source."""
    sources = resolve_sources(data_cfg)
    return [sources[s.source].repeats for s in samples]


def augments_per_sample(samples: list[Sample], data_cfg: DataConfig) -> list[CaptionAugment]:
    """Each sample's per-epoch caption augmentation, from its source."""
    augments = [CaptionAugment.from_config(d) for d in resolve_sources(data_cfg)]
    return [augments[s.source] for s in samples]


def items_per_epoch(samples: list[Sample], data_cfg: DataConfig) -> int:
    """Dataset items in one epoch: every sample times its source's repeats."""
    return sum(repeats_per_sample(samples, data_cfg))
