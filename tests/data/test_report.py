from PIL import Image

from sdtune.cli.main import main


def test_data_inspect_reports_buckets_skips_and_captions(tmp_path, capsys):
    for i, size in enumerate([(200, 70), (70, 200), (130, 130), (60, 60)]):
        Image.new("RGB", size, "red").save(tmp_path / f"img{i}.png")
        (tmp_path / f"img{i}.txt").write_text("sks, red square, studio light")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    (tmp_path / "img1.txt").write_text(", ".join(["a very long caption"] * 30))
    code = main(
        [
            "data",
            "inspect",
            f"data.dir={tmp_path}",
            "data.resolution=128",
            "data.bucketing=true",
            "data.trigger=sks",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "4 images usable, 1 skipped" in out and "broken.png" in out
    assert "64 x 192" in out and "192 x 64" in out and "128 x 128" in out
    assert "64 x 64" in out  # the 60 px image gets a smaller bucket, not an upscale
    assert "over 77 tokens: 1" in out and "trigger 'sks': in 4 of 4" in out
    assert "red square (3)" in out
    assert "not needed" not in out  # only the data section is asked for: no model.path
    square = main(["data", "inspect", f"data.dir={tmp_path}", "data.resolution=128"])
    assert square == 0 and "images upscaled to reach it: 3" in capsys.readouterr().out
    # the 120-token caption fits when captions are encoded in windows of 75 tokens
    windows = main(["data", "inspect", f"data.dir={tmp_path}", "data.max_token_length=150"])
    assert windows == 0 and "over 152 tokens: 0" in capsys.readouterr().out
