"""A dry run of the data: what training would see, without loading a model.

Buckets (or square crops), how many images each gets and how many are cropped or blown up,
skipped files, and caption statistics (sources, lengths, captions over the 77-token window,
the most common tags): the things to fix before spending GPU hours.
"""

from __future__ import annotations

from collections import Counter

from sdtune.config import RunConfig
from sdtune.data.captions import CaptionAugment, count_long_captions, count_tags
from sdtune.data.multi import items_per_epoch, resolve_sources, source_label
from sdtune.data.sources import scan_data_config
from sdtune.data.streaming import known_rows


def describe_data(cfg: RunConfig) -> str:
    """The dry-run report of `cfg.data` as text."""
    from sdtune.models.tokenizer import load_tokenizer

    report = scan_data_config(cfg.data)
    samples, d = report.samples, cfg.data
    tokenizer = load_tokenizer(1)
    lines = [report.summary(), ""]
    lines += _size_lines(samples, cfg)
    lines += [
        "",
        *_caption_lines(samples, d, tokenizer, d.max_token_length, per_epoch=not d.sources),
    ]
    for index, source in enumerate(resolve_sources(d) if d.sources else []):
        own = [s for s in samples if s.source == index]
        lines += ["", f"source {source_label(source, index)}:"]
        lines += [
            f"  {line}" for line in _caption_lines(own, source, tokenizer, d.max_token_length)
        ]
    if d.dataset_streaming:
        rows = known_rows(d)
        known = f"{rows} rows" if rows is not None else "rows not known before reading"
        lines.append(f"\none epoch: one shuffled pass over the stream ({known})")
    elif d.sources:
        parts = " + ".join(f"{len(p.report.samples)} x {p.repeats}" for p in report.parts)
        lines.append(f"\none epoch: {items_per_epoch(samples, d)} items ({parts} repeats)")
    else:
        epoch = len(samples) * d.repeats
        lines.append(f"\none epoch: {epoch} items ({len(samples)} images x {d.repeats} repeats)")
    return "\n".join(lines)


def _caption_lines(
    samples, d, tokenizer, max_token_length: int, per_epoch: bool = True
) -> list[str]:
    """Caption lengths, captions over the token window, the trigger, the per-epoch caption
    augmentation (said per source when there are several) and the common tags."""
    captions = [s.caption for s in samples]
    words = [len(c.split()) for c in captions]
    long, example, window = count_long_captions(
        captions, [s.image_path for s in samples], tokenizer, max_token_length
    )
    lines = [
        f"captions: words per caption min {min(words)}, mean {sum(words) / len(words):.1f}, "
        f"max {max(words)}; over {window} tokens: {long}" + (f" (e.g. {example})" if long else ""),
    ]
    if d.trigger:
        missing = sum(d.trigger not in c for c in captions)
        lines.append(f"trigger '{d.trigger}': in {len(captions) - missing} of {len(captions)}")
    augment = CaptionAugment.from_config(d)
    if per_epoch and augment.active:
        lines.append(
            f"per epoch: shuffle_tags {augment.shuffle_tags} (keep {augment.keep_tags}), "
            f"tag_dropout {augment.tag_dropout}, caption_dropout {augment.caption_dropout}"
        )
    tags = count_tags(captions, d.tag_separator)
    top = ", ".join(f"{t} ({n})" for t, n in tags.most_common(10))
    lines.append(f"most common tags: {top}")
    return lines


def _size_lines(samples, cfg: RunConfig) -> list[str]:
    from sdtune.train.setup import assign_buckets

    d = cfg.data
    sizes = [s.size for s in samples if s.size]
    if not d.bucketing:
        small = sum(min(w, h) < d.resolution for w, h in sizes)
        return [
            f"square crops of {d.resolution} px ({'centre' if d.center_crop else 'random'}); "
            f"images upscaled to reach it: {small}"
        ]
    buckets = assign_buckets(samples, cfg)
    exact = sum(s.size == b for s, b in zip(samples, buckets, strict=True))
    lines = [
        f"buckets ({'padded' if d.pad else 'cropped'} to fit; {exact} images exactly "
        "their bucket size):"
    ]
    for (w, h), n in sorted(Counter(buckets).items()):
        lines.append(f"  {w:>5} x {h:<5} {n:>5} images")
    return lines
