import numpy as np
import pytest
from PIL import Image

from sdtune.data.images import ImageDecodeError, load_image, probe_image


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: viewers show it 20 wide, 40 tall
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert load_image(tmp_path / "rot.jpg").size == (20, 40)


def _png_with_exif_after_the_pixels(path, size, orientation):
    """A PNG whose eXIf chunk comes after IDAT, as some phone and editor exports write it."""
    import struct
    import zlib

    Image.new("RGB", size, "red").save(path)
    data = path.read_bytes()
    exif = Image.Exif()
    exif[0x0112] = orientation
    body = exif.tobytes()
    chunk = struct.pack(">I", len(body)) + b"eXIf" + body
    chunk += struct.pack(">I", zlib.crc32(b"eXIf" + body))
    end = data.rindex(b"IEND") - 4  # IEND's length field
    assert data.index(b"IDAT") < end
    path.write_bytes(data[:end] + chunk + data[end:])


def test_a_png_exif_after_the_pixels_turns_it_in_the_header_probe_too(tmp_path):
    path = tmp_path / "late.png"
    _png_with_exif_after_the_pixels(path, (40, 20), 6)
    assert load_image(path).size == (20, 40)  # what training sees
    assert probe_image(path) == (20, 40)  # what listings and the crop plan say, undecoded
    Image.new("RGB", (40, 20)).save(tmp_path / "plain.png")
    assert probe_image(tmp_path / "plain.png") == (40, 20)


def test_alpha_is_composited_on_the_background(tmp_path):
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    out = load_image(tmp_path / "clear.png", background=(0, 0, 255))
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (0, 0, 255)


@pytest.mark.parametrize("mode", ["P", "L", "LA", "CMYK", "I;16"])
def test_other_modes_become_rgb(tmp_path, mode):
    path = tmp_path / ("x.tiff" if mode in ("CMYK", "I;16") else "x.png")
    if mode == "I;16":
        Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)).save(path)
    else:
        Image.new(mode, (8, 8)).save(path)
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (8, 8)
    if mode == "I;16":
        assert out.getpixel((0, 0))[0] >= 250  # 16-bit white stays white, not clipped oddly


def test_corrupt_and_truncated_files_raise_decode_error(tmp_path):
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    with pytest.raises(ImageDecodeError):
        load_image(tmp_path / "junk.png")
    Image.new("RGB", (64, 64), "green").save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError):
        load_image(tmp_path / "cut.jpg")
