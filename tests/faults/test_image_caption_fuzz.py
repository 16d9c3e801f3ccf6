"""Image and caption fuzzing through the folder scan: every bad file is skipped with a reason
(or its caption cleaned and reported); nothing crashes and the good images are still used."""

from __future__ import annotations

import io
import struct
import unicodedata
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from sdtune.data.images import IMAGE_EXTENSIONS
from sdtune.data.sources import scan_image_folder
from sdtune.errors import SdtuneError

FUZZ = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def _encoded(fmt: str, size=(48, 32)) -> bytes:
    img = Image.new("RGB", size)
    img.putdata(
        [(x * 5 % 256, y * 7 % 256, (x * y) % 256) for y in range(size[1]) for x in range(size[0])]
    )
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


SOURCES = {fmt: _encoded(fmt) for fmt in ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")}
SUFFIX = {
    "PNG": ".png",
    "JPEG": ".jpg",
    "GIF": ".gif",
    "WEBP": ".webp",
    "BMP": ".bmp",
    "TIFF": ".tif",
}


def _folder(root, bad: dict[str, bytes], captions: dict[str, bytes] | None = None):
    """A dataset folder with one good image (`good.png`) and the given files."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "good.png").write_bytes(SOURCES["PNG"])
    for name, data in bad.items():
        (root / name).write_bytes(data)
    for name, data in (captions or {}).items():
        (root / name).write_bytes(data)
    return root


def _scan_expecting_skips(root, bad_names):
    report = scan_image_folder(root)
    used = {s.image_path.name for s in report.samples}
    skipped = {p.name: reason for p, reason in report.skipped}
    assert "good.png" in used
    for name in bad_names:
        assert (name in skipped and skipped[name]) or name in used, (name, report.summary())
    return report


@FUZZ
@given(
    fmt=st.sampled_from(sorted(SOURCES)),
    cut=st.floats(min_value=0.0, max_value=0.99),
    flips=st.lists(st.tuples(st.floats(0, 0.999), st.integers(0, 255)), max_size=6),
)
def test_truncated_and_corrupted_images_are_skipped_or_decoded(tmp_path_factory, fmt, cut, flips):
    data = bytearray(SOURCES[fmt])
    for where, byte in flips:
        data[int(where * len(data))] = byte
    data = bytes(data[: max(1, int(cut * len(data)))]) if cut else bytes(data)
    name = "bad" + SUFFIX[fmt]
    root = _folder(tmp_path_factory.mktemp("imgs"), {name: data})
    _scan_expecting_skips(root, [name])


@FUZZ
@given(data=st.binary(max_size=300), suffix=st.sampled_from(IMAGE_EXTENSIONS))
def test_random_bytes_with_image_extensions_are_skipped(tmp_path_factory, data, suffix):
    root = _folder(tmp_path_factory.mktemp("imgs"), {"noise" + suffix: data})
    report = _scan_expecting_skips(root, ["noise" + suffix])
    assert "noise" + suffix in {p.name for p, _ in report.skipped}


def _png_with_header(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares `width` x `height` (the pixel data is one short row)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )


def _bomb() -> bytes:
    """A real decompression bomb: ~11 KB of PNG that decodes to 90 million pixels."""
    buf = io.BytesIO()
    Image.new("1", (9500, 9500)).save(buf, "PNG")
    return buf.getvalue()


def test_huge_dimensions_bombs_empty_files_and_tiny_images(tmp_path):
    bad = {
        "huge.png": _png_with_header(100_000, 100_000),  # 10^10 pixels declared
        "wide.png": _png_with_header(2**31 - 1, 1),
        "zero.png": _png_with_header(0, 0),
        "bomb.png": _bomb(),
        "empty.jpg": b"",
        "text.webp": b"not an image at all\n",
        "gif_header.gif": b"GIF89a\xff\xff\xff\xff" + b"\0" * 20,
    }
    root = _folder(tmp_path / "d", bad)
    (root / "one.png").write_bytes(_encoded("PNG", (1, 1)))
    report = _scan_expecting_skips(root, [*bad, "one.png"])
    skipped = {p.name: reason for p, reason in report.skipped}
    assert set(bad) <= set(skipped), report.summary()
    assert "limit" in skipped["huge.png"] and "limit" in skipped["bomb.png"]
    assert "empty" in skipped["empty.jpg"]
    for name in bad:  # every skip is named in the report the user sees
        assert name in report.summary()


def test_tiny_images_are_skipped_and_reported(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    (root / "one.png").write_bytes(_encoded("PNG", (1, 1)))
    (root / "thin.png").write_bytes(_encoded("PNG", (300, 4)))
    (root / "ok.png").write_bytes(_encoded("PNG", (8, 8)))
    report = scan_image_folder(root)
    assert [s.image_path.name for s in report.samples] == ["ok.png"]
    reasons = {p.name: r for p, r in report.skipped}
    assert reasons["one.png"].startswith("too small: 1x1") and "thin.png" in reasons


def test_a_folder_of_only_bad_images_is_one_error_naming_it(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    (root / "a.png").write_bytes(b"\x89PNG\r\n")
    (root / "b.jpg").write_bytes(SOURCES["JPEG"][:40])
    with pytest.raises(SdtuneError, match="none decodable") as info:
        scan_image_folder(root)
    assert "\n" not in str(info.value)


def _clean(caption: str) -> bool:
    return all(unicodedata.category(ch) != "Cc" for ch in caption) and "  " not in caption


@FUZZ
@given(raw=st.binary(max_size=400))
def test_sidecars_of_any_bytes_give_clean_captions(tmp_path_factory, raw):
    root = _folder(tmp_path_factory.mktemp("caps"), {}, {"good.txt": raw})
    report = scan_image_folder(root, trigger="sks")
    (sample,) = report.samples
    assert _clean(sample.caption) and sample.caption.startswith("sks")


def test_caption_problems_are_fixed_and_reported(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    names = ["latin1", "empty", "controls", "long", "nul"]
    for name in names:
        (root / f"{name}.png").write_bytes(SOURCES["PNG"])
    (root / "latin1.txt").write_bytes("caf\xe9 au lait".encode("cp1252"))
    (root / "empty.txt").write_bytes(b"")
    (root / "controls.txt").write_bytes(b"a\x1b[31m red\x07 dog\r\n\tsitting\x00")
    (root / "long.txt").write_bytes(("word " * 50_000).encode())
    (root / "nul.txt").write_bytes(b"\x00" * 64)
    report = scan_image_folder(root, caption_template="{trigger} {name}", trigger="sks")
    captions = {s.image_path.stem: s.caption for s in report.samples}
    assert set(captions) == set(names)
    assert all(_clean(c) for c in captions.values())
    assert captions["latin1"] == "sks, café au lait"
    assert captions["empty"] == "sks empty" and captions["nul"] == "sks nul"
    assert captions["controls"] == "sks, a[31m red dog sitting"
    assert len(captions["long"]) > 200_000  # kept; the tokenizer truncates it, with a warning
    summary = report.summary()
    assert "not UTF-8" in summary and "control" in summary and "empty" in summary
