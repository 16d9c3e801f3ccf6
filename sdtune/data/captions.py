"""Captions, in one fixed order.

At scan time (static, the same every epoch):
  1. the caption from metadata.jsonl/csv or the sidecar file (`photo.txt`), cleaned;
  2. else `data.caption_template` with `{trigger}` and `{name}` filled in;
  3. the trigger word put in front, unless the caption already has it.
Per item and epoch, in the Dataset (seeded by (seed, epoch, index) only):
  4. tag shuffle: tags split on `data.tag_separator`, the first `data.keep_tags` stay in place;
  5. tag dropout: each other tag dropped with probability `data.tag_dropout`;
  6. caption dropout: the whole caption becomes "" with probability `data.caption_dropout`,
     which trains the unconditional prediction used by classifier-free guidance.

Captions longer than the text encoder's window are counted and reported once before training,
then truncated, unless `data.max_token_length` (150 or 225) encodes them in several windows of
75 tokens (sdtune.data.prompts); past that length they are truncated too.
"""

from __future__ import annotations

import logging
import random
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sdtune.errors import SdtuneError, quote

logger = logging.getLogger("sdtune.data")

# Invisible characters that are not control characters but break tokenization all the same.
_INVISIBLE = {"\u200b", "\ufeff", "\u2060"}
_EXAMPLES = 5  # file names shown per kind of caption problem in the report


@dataclass
class CaptionNotes:
    """Caption files that needed fixing, so the report can say what was changed and where."""

    not_utf8: list[str] = field(default_factory=list)
    control_chars: list[str] = field(default_factory=list)
    empty: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        kinds = [
            (self.not_utf8, "not UTF-8 (read as Windows-1252)"),
            (self.control_chars, "had control or invisible characters (removed)"),
            (self.empty, "were empty (template used instead)"),
        ]
        out = []
        for paths, what in kinds:
            if paths:
                names = ", ".join(paths[:_EXAMPLES])
                more = f" and {len(paths) - _EXAMPLES} more" if len(paths) > _EXAMPLES else ""
                out.append(f"  {len(paths)} captions {what}: {names}{more}")
        return out


def decode_text(data: bytes) -> tuple[str, bool]:
    """Bytes to text: UTF-8 (BOM allowed), else Windows-1252, the usual non-UTF-8 caption file.

    Returns (text, was_utf8). Bytes that Windows-1252 lacks become U+FFFD.
    """
    try:
        return data.decode("utf-8-sig"), True
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace"), False


def clean_caption(text: str) -> tuple[str, bool]:
    """Collapse whitespace to single spaces and drop control characters; (text, had_controls)."""
    had_controls = False
    kept = []
    for ch in text:
        if ch.isspace():
            kept.append(" ")
        elif unicodedata.category(ch) == "Cc" or ch in _INVISIBLE:
            had_controls = True
        else:
            kept.append(ch)
    return " ".join("".join(kept).split()), had_controls


def clean_caption_from(
    text: str, source: str | Path, notes: CaptionNotes | None, was_utf8: bool = True
) -> str | None:
    """Clean one caption and record what was wrong with it; None when nothing is left."""
    cleaned, had_controls = clean_caption(text)
    if notes is not None:
        if not was_utf8:
            notes.not_utf8.append(str(source))
        if had_controls:
            notes.control_chars.append(str(source))
        if not cleaned:
            notes.empty.append(str(source))
    return cleaned or None


def read_sidecar(
    image_path: Path, caption_ext: str, notes: CaptionNotes | None = None
) -> str | None:
    """The caption file beside an image (`photo.jpg` -> `photo.txt`), or None if none/empty."""
    sidecar = image_path.with_suffix(caption_ext)
    if not sidecar.is_file():
        return None
    text, was_utf8 = decode_text(sidecar.read_bytes())
    return clean_caption_from(text, sidecar, notes, was_utf8)


def build_caption(
    raw: str | None, image_path: Path, template: str, trigger: str, separator: str = ","
) -> str:
    """The static caption: given text or the filled template, with the trigger word in front."""
    if raw is None:
        try:
            raw = template.format(trigger=trigger, name=image_path.stem)
        except (KeyError, IndexError, ValueError, AttributeError) as exc:
            raise SdtuneError(
                f"data.caption_template {quote(template)} cannot be filled ({quote(exc)}); "
                "only {trigger} and {name} are known, write {{ and }} for literal braces"
            ) from None
    caption = raw.strip()
    if trigger and trigger not in caption:
        caption = prepend_tag(trigger, caption, separator)
    return caption


def prepend_tag(tag: str, caption: str, separator: str = ",") -> str:
    """`tag` as the caption's first tag (`sks, a photo`); just `tag` for an empty caption."""
    return f"{tag}{tag_joiner(separator)}{caption}" if caption else tag


def tag_joiner(separator: str) -> str:
    """What goes between tags when sdtune writes them: the separator and a space (`, `)."""
    return separator if separator.isspace() else separator + " "


def count_tags(captions: Iterable[str], separator: str = ",") -> Counter[str]:
    """How often each tag (a caption split on `separator`, trimmed) appears in `captions`."""
    return Counter(t.strip() for c in captions for t in c.split(separator) if t.strip())


@dataclass(frozen=True)
class CaptionAugment:
    """Steps 4-6 of the caption order; all off by default."""

    shuffle_tags: bool = False
    keep_tags: int = 0
    tag_separator: str = ","
    tag_dropout: float = 0.0
    caption_dropout: float = 0.0

    @classmethod
    def from_config(cls, data_cfg) -> CaptionAugment:
        return cls(
            shuffle_tags=data_cfg.shuffle_tags,
            keep_tags=data_cfg.keep_tags,
            tag_separator=data_cfg.tag_separator,
            tag_dropout=data_cfg.tag_dropout,
            caption_dropout=data_cfg.caption_dropout,
        )

    @property
    def active(self) -> bool:
        return self.shuffle_tags or self.tag_dropout > 0 or self.caption_dropout > 0

    def apply(self, caption: str, rng: random.Random) -> str:
        """Shuffle and drop the tags after the kept ones, then maybe drop the whole caption."""
        if self.shuffle_tags or self.tag_dropout > 0:
            tags = [t.strip() for t in caption.split(self.tag_separator)]
            tags = [t for t in tags if t]
            kept, rest = tags[: self.keep_tags], tags[self.keep_tags :]
            if self.shuffle_tags:
                rng.shuffle(rest)
            if self.tag_dropout > 0:
                rest = [t for t in rest if rng.random() >= self.tag_dropout]
            caption = tag_joiner(self.tag_separator).join(kept + rest)
        if self.caption_dropout > 0 and rng.random() < self.caption_dropout:
            return ""
        return caption


def caption_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The random stream of one item in one epoch: a string seed hashes the same everywhere."""
    return random.Random(f"caption:{seed}:{epoch}:{index}")


def count_long_captions(
    captions: Sequence[str], sources: Sequence[Path], tokenizer, max_token_length: int | None = None
) -> tuple[int, Path | None, int]:
    """(number of captions cut off, one such file, the limit in tokens with begin and end).

    The limit is the tokenizer's window (77), or `max_token_length` caption tokens plus the
    begin and end tokens when captions are encoded in several windows (data.max_token_length).
    """
    window = int(getattr(tokenizer, "model_max_length", 77))
    if max_token_length is not None and max_token_length + 2 > window:
        window = max_token_length + 2
    if window > 10_000:  # a tokenizer without a real limit: nothing would be truncated
        return 0, None, window
    unique = sorted(set(captions))
    ids = tokenizer(unique, add_special_tokens=True, truncation=False, verbose=False).input_ids
    too_long = {text for text, seq in zip(unique, ids, strict=True) if len(seq) > window}
    hits = [src for text, src in zip(captions, sources, strict=True) if text in too_long]
    return len(hits), (hits[0] if hits else None), window


def warn_long_captions(
    captions: Sequence[str], sources: Sequence[Path], tokenizer, max_token_length: int = 75
) -> int:
    """Log one warning if some captions will be cut; return how many.

    With `max_token_length` 75 the cut is at the text encoder's window; with 150 or 225 the
    captions are encoded in windows (sdtune.data.prompts) and cut only past that length.
    """
    count, example, window = count_long_captions(captions, sources, tokenizer, max_token_length)
    if count:
        how = (
            "(set data.max_token_length=150 or 225 to encode them in windows)"
            if max_token_length <= 75
            else f"even in windows (data.max_token_length={max_token_length})"
        )
        logger.warning(
            "%d of %d captions are longer than %d tokens and will be truncated %s, "
            "e.g. the caption of %s",
            count,
            len(captions),
            window,
            how,
            example,
        )
    return count
