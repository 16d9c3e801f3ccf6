import datasets
import numpy as np
import pytest
from PIL import Image

from sdtune.config import load_config
from sdtune.data.dataset import ImageCaptionDataset
from sdtune.data.sources import scan_data_config
from sdtune.errors import SdtuneError


@pytest.fixture
def saved_dataset(tmp_path):
    """Two good rows and one whose image bytes are garbage, saved with save_to_disk."""
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    rows = {
        "image": [
            Image.new("RGB", (64, 48), "red"),
            {"bytes": b"not an image", "path": None},
            Image.new("RGBA", (64, 64), (0, 0, 255, 128)),
        ],
        "caption": ["a red square", "broken", None],
    }
    split = datasets.Dataset.from_dict(rows, features=features)
    folder = tmp_path / "hf"
    datasets.DatasetDict({"train": split}).save_to_disk(str(folder))
    return folder


def _cfg(folder, **extra):
    overrides = {
        "model.path": "m",
        "data.dataset": str(folder),
        "data.image_column": "image",
        "data.caption_column": "caption",
        "data.trigger": "sks",
        "data.resolution": 32,
    }
    return load_config(None, {**overrides, **extra})


def test_rows_become_samples_and_bad_rows_are_reported(saved_dataset):
    report = scan_data_config(_cfg(saved_dataset).data)
    assert [s.caption for s in report.samples] == ["sks, a red square", "sks"]
    assert len(report.skipped) == 1 and "[train][1]" in str(report.skipped[0][0])
    assert "cannot decode" in report.summary()
    dataset = ImageCaptionDataset(report.samples, resolution=32)
    pixels = dataset[0]["pixel_values"]
    assert pixels.shape == (3, 32, 32)
    assert np.allclose(pixels[0].numpy(), 1.0, atol=0.02)  # red channel full


def test_dataset_mistakes_are_one_line_errors(saved_dataset, tmp_path):
    with pytest.raises(SdtuneError, match="no split 'test'.*data.dataset_split"):
        scan_data_config(_cfg(saved_dataset, **{"data.dataset_split": "test"}).data)
    with pytest.raises(SdtuneError, match="no column 'text'.*data.caption_column"):
        scan_data_config(_cfg(saved_dataset, **{"data.caption_column": "text"}).data)
    with pytest.raises(SdtuneError, match="no column 'file_name'.*data.image_column"):
        scan_data_config(_cfg(saved_dataset, **{"data.image_column": "file_name"}).data)
    with pytest.raises(SdtuneError, match="cannot be loaded"):
        scan_data_config(_cfg(tmp_path / "missing-name").data)


def test_trains_from_a_saved_dataset(saved_dataset, tiny_sd1_dir, tmp_path):
    from sdtune.train.loop import train

    cfg = _cfg(
        saved_dataset,
        **{
            "model.path": str(tiny_sd1_dir),
            "data.resolution": 64,
            "train.max_steps": 2,
            "train.batch_size": 2,
            "output.dir": str(tmp_path / "run"),
        },
    )
    result = train(cfg)
    assert result.steps == 2 and np.isfinite(result.last_loss)
