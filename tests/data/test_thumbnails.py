"""Thumbnails: made once per version of an image, upright, never half-written."""

from __future__ import annotations

import os
import threading

import pytest
from PIL import Image

from sdtune.data import files, thumbnails
from sdtune.data.thumbnails import thumbnail
from sdtune.errors import SdtuneError


@pytest.fixture
def decodes(monkeypatch):
    """How many times the thumbnailer decodes an image."""
    calls = []
    real = thumbnails.load_image

    def counting(path):
        calls.append(path)
        return real(path)

    monkeypatch.setattr(thumbnails, "load_image", counting)
    return calls


def test_longest_side_is_the_size_and_the_image_is_upright(tmp_path):
    Image.new("RGB", (600, 300), "red").save(tmp_path / "wide.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 400x200, shown 200 wide and 400 tall
    Image.new("RGB", (400, 200), "blue").save(tmp_path / "turned.jpg", exif=exif)
    Image.new("RGBA", (50, 40), (0, 0, 0, 0)).save(tmp_path / "small.png")
    with Image.open(thumbnail(tmp_path / "cache", tmp_path / "wide.png", 128)) as img:
        assert (img.format, img.size) == ("JPEG", (128, 64))
    with Image.open(thumbnail(tmp_path / "cache", tmp_path / "turned.jpg", 128)) as img:
        assert img.size == (64, 128)
    with Image.open(thumbnail(tmp_path / "cache", tmp_path / "small.png", 128)) as img:
        assert img.size == (50, 40)  # not enlarged
        assert min(img.getpixel((25, 20))) > 240  # transparency on white, as training sees it


def test_a_second_call_reuses_the_file_and_an_edited_image_gets_a_new_one(tmp_path, decodes):
    image = tmp_path / "a.png"
    Image.new("RGB", (300, 200), "red").save(image)
    first = thumbnail(tmp_path / "cache", image)
    made = first.stat().st_mtime_ns
    assert thumbnail(tmp_path / "cache", image) == first
    assert len(decodes) == 1 and first.stat().st_mtime_ns == made
    Image.new("RGB", (300, 200), "blue").save(image)
    os.utime(image, ns=(made + 10**9, made + 10**9))  # an edit within the same clock tick
    second = thumbnail(tmp_path / "cache", image)
    assert second != first and len(decodes) == 2
    with Image.open(second) as img:
        assert img.getpixel((10, 10))[2] > 200  # the new, blue content


def test_concurrent_calls_give_one_whole_file(tmp_path):
    image = tmp_path / "a.png"
    Image.new("RGB", (512, 384), "green").save(image)
    start, results = threading.Barrier(6), []

    def make():
        start.wait()
        results.append(thumbnail(tmp_path / "cache", image))

    threads = [threading.Thread(target=make) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and len(results) == 6
    with Image.open(results[0]) as img:
        img.load()  # a torn JPEG would fail here
        assert img.size == (256, 192)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [results[0].name]


def test_a_failed_write_leaves_no_thumbnail_and_the_next_call_makes_it(tmp_path, monkeypatch):
    image = tmp_path / "a.png"
    Image.new("RGB", (64, 64), "red").save(image)

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(files.os, "replace", full_disk)
        with pytest.raises(SdtuneError, match="No space left"):
            thumbnail(tmp_path / "cache", image)
    assert list((tmp_path / "cache").iterdir()) == []
    assert thumbnail(tmp_path / "cache", image).is_file()


def test_a_broken_or_missing_image_is_named(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(SdtuneError, match=r"bad\.png.*cannot decode"):
        thumbnail(tmp_path / "cache", tmp_path / "bad.png")
    with pytest.raises(SdtuneError, match=r"gone\.png"):
        thumbnail(tmp_path / "cache", tmp_path / "gone.png")


def test_the_thumbnail_appears_only_once_whole(tmp_path, monkeypatch):
    image = tmp_path / "a.png"
    Image.new("RGB", (300, 200), "red").save(image)
    cache = tmp_path / "cache"
    seen_while_writing = []
    real_fsync = files.os.fsync

    def fsync(fd):  # called once the bytes are written, before the rename
        seen_while_writing.append(sorted(p.suffix for p in cache.iterdir()))
        real_fsync(fd)

    monkeypatch.setattr(files.os, "fsync", fsync)
    path = thumbnail(cache, image)
    assert seen_while_writing == [[".tmp"]]  # the bytes went to a temporary name first
    with Image.open(path) as img:
        img.load()
