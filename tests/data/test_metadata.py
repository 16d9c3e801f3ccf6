import json

import pytest
from PIL import Image

from sdtune.config import load_config
from sdtune.data.sources import scan_data_config, scan_image_folder
from sdtune.errors import SdtuneError


def _image(path, colour="red"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), colour).save(path)


def _jsonl(folder, rows):
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_jsonl_captions_win_over_sidecars_for_listed_files(tmp_path):
    _image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("sidecar caption, ignored")
    _image(tmp_path / "sub" / "b.png")
    _image(tmp_path / "c.png")  # not listed: its sidecar is used
    (tmp_path / "c.txt").write_text("c from sidecar")
    _jsonl(
        tmp_path,
        [
            {"file_name": "a.png", "text": "a from metadata"},
            {"file_name": "sub/b.png", "text": "b\u0007 from\tmetadata"},
            {"file_name": "gone.png", "text": "missing"},
            {"file_name": "a.png", "text": "listed twice"},
        ],
    )
    report = scan_image_folder(tmp_path, trigger="sks")
    captions = {s.image_path.name: s.caption for s in report.samples}
    assert captions == {
        "a.png": "sks, a from metadata",
        "b.png": "sks, b from metadata",
        "c.png": "sks, c from sidecar",
    }
    summary = report.summary()
    assert [p.name for p, _ in report.skipped] == ["gone.png"]
    assert "metadata.jsonl line 3 but the file does not exist" in summary
    assert "metadata.jsonl line 4 lists a.png again (metadata.jsonl line 1 is used)" in summary
    assert "2 from metadata.jsonl, 1 from sidecars" in summary
    assert "1 captions had control" in summary and "metadata.jsonl line 2" in summary


def test_csv_with_other_column_names_through_the_config(tmp_path):
    _image(tmp_path / "x.png")
    _image(tmp_path / "y.png")
    (tmp_path / "metadata.csv").write_bytes(
        b'image,caption\r\nx.png,"red, square, caf\xe9"\r\ny.png,\r\n'  # Windows-1252 bytes
    )
    cfg = load_config(
        None,
        {
            "model.path": "m",
            "data.dir": str(tmp_path),
            "data.image_column": "image",
            "data.caption_column": "caption",
            "data.caption_template": "a photo of {name}",
        },
    )
    report = scan_data_config(cfg.data)
    captions = {s.image_path.name: s.caption for s in report.samples}
    assert captions == {"x.png": "red, square, café", "y.png": "a photo of y"}
    assert "not UTF-8" in report.summary() and "metadata.csv" in report.summary()
    cfg.data.caption_column = "text"
    with pytest.raises(SdtuneError, match="no 'text' column.*data.caption_column"):
        scan_data_config(cfg.data)


@pytest.mark.parametrize("name", ["../outside.png", "sub/../../outside.png", "/abs/outside.png"])
def test_paths_outside_the_folder_are_refused_unless_allowed(tmp_path, name):
    data = tmp_path / "data"
    _image(data / "in.png")
    _image(tmp_path / "outside.png")
    if name.startswith("/"):
        name = str(tmp_path / "outside.png")
    _jsonl(data, [{"file_name": "in.png", "text": "in"}, {"file_name": name, "text": "out"}])
    with pytest.raises(SdtuneError, match="line 2 names .* outside .* data.allow_outside_paths"):
        scan_image_folder(data)
    report = scan_image_folder(data, allow_outside_paths=True)
    assert sorted(s.caption for s in report.samples) == ["in", "out"]


def test_metadata_errors_name_the_file_and_line(tmp_path):
    _image(tmp_path / "a.png")
    _jsonl(tmp_path, [{"file_name": "a.png", "text": "ok"}, '{"file_name": "a.png", text}'])
    with pytest.raises(SdtuneError, match=r"metadata.jsonl line 2 is not valid JSON"):
        scan_image_folder(tmp_path)
    _jsonl(tmp_path, ['["a.png", "a list"]'])
    with pytest.raises(SdtuneError, match="line 1 must be a JSON object"):
        scan_image_folder(tmp_path)
    _jsonl(tmp_path, [{"image": "a.png", "text": "x"}])
    with pytest.raises(SdtuneError, match="line 1 has no 'file_name' column.*data.image_column"):
        scan_image_folder(tmp_path)
    (tmp_path / "metadata.csv").write_text("file_name,text\na.png,x\n")
    with pytest.raises(SdtuneError, match="both metadata.jsonl and metadata.csv"):
        scan_image_folder(tmp_path)
