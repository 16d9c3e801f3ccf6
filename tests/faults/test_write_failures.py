"""A write that fails (disk full, permission denied) stops the run with one line naming the file;
the previous checkpoint stays intact, is still what resume=latest picks, and resuming from it
finishes the run."""

from __future__ import annotations

import errno
import os

import pytest
import torch

import sdtune.adapters.io as adapter_io
import sdtune.train.checkpoint as ckpt
from sdtune.cli.main import main
from sdtune.train.checkpoint import list_checkpoints, load_training_state, resolve_resume


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared; one thread is faster and steadier here
    yield
    torch.set_num_threads(before)


def _args(tiny_sd1_dir, star_images, out, *extra):
    return [
        "train",
        f"model.path={tiny_sd1_dir}",
        f"data.dir={star_images}",
        "data.resolution=64",
        "train.batch_size=2",
        "train.max_steps=6",
        "train.checkpoint_every_n_steps=2",
        "lora.rank=4",
        "output.log_with=none",
        f"output.dir={out}",
        *extra,
    ]


def _fail_on_call(monkeypatch, module, name, n, code):
    real, calls = getattr(module, name), {"n": 0}

    def failing(obj, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            with open(path, "wb") as f:  # a partial file, as a full disk leaves behind
                f.write(b"\0" * 10)
            raise OSError(code, os.strerror(code), str(path))
        return real(obj, path, *args, **kwargs)

    monkeypatch.setattr(module, name, failing)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("sdtune")]  # not loading bars
    assert len(lines) == 1 and lines[0].startswith("sdtune train: error:"), err
    return lines[0]


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(
    tiny_sd1_dir, star_images, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "run"
    _fail_on_call(monkeypatch, ckpt.torch, "save", 2, errno.ENOSPC)  # the step-4 state file
    assert main(_args(tiny_sd1_dir, star_images, out)) == 2
    line = _one_error_line(capsys)
    assert "step 4" in line and "training_state.pt" in line and "step-000002" in line
    assert "No space left on device" in line
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(out)] == ["step-000002"]
    assert not list((out / "checkpoints").glob(".tmp-*"))  # the partial write is cleaned up
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    assert load_training_state(resolve_resume(out, "latest"))["progress"]["step"] == 2
    assert main(_args(tiny_sd1_dir, star_images, out, "train.resume=latest")) == 0
    assert (out / "pytorch_lora_weights.safetensors").is_file()


def test_permission_denied_on_the_final_adapter(
    tiny_sd1_dir, star_images, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "run"
    # adapter writes: checkpoints at steps 2 and 4, then the final adapter (the third)
    _fail_on_call(monkeypatch, adapter_io, "save_file", 3, errno.EACCES)
    assert main(_args(tiny_sd1_dir, star_images, out)) == 2
    line = _one_error_line(capsys)
    # The final files are staged in .final-tmp/ and moved in only when all are written.
    assert "pytorch_lora_weights.safetensors" in line and "cannot write" in line
    assert [p.name for p in list_checkpoints(out)] == ["step-000002", "step-000004"]
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    assert not (out / ".final-tmp").exists() and not (out / "config.yaml").exists()
    assert not list(out.glob("*.tmp"))
    for folder in list_checkpoints(out):
        assert load_training_state(folder)["progress"]["step"] in (2, 4)


def test_adapter_write_failure_keeps_the_earlier_file(tmp_path, monkeypatch):
    """An existing adapter file is untouched when rewriting it fails half-way."""
    from safetensors.torch import load_file

    from sdtune.adapters.io import write_safetensors
    from sdtune.errors import SdtuneError

    path = write_safetensors(tmp_path / "a.safetensors", {"x": torch.ones(3)}, {})
    _fail_on_call(monkeypatch, adapter_io, "save_file", 1, errno.ENOSPC)
    with pytest.raises(SdtuneError, match="cannot write .*a.safetensors"):
        write_safetensors(path, {"x": torch.zeros(3)}, {}, overwrite=True)
    assert torch.equal(load_file(str(path))["x"], torch.ones(3))
    assert not (tmp_path / "a.safetensors.tmp").exists()


def test_config_and_card_write_failures_are_one_line_errors(tmp_path, monkeypatch):
    import errno
    from pathlib import Path

    from sdtune.adapters.card import write_model_card
    from sdtune.config import load_config, save_config
    from sdtune.errors import SdtuneError

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    cfg = load_config(None, {"model.path": "m", "data.dir": "d"})
    with pytest.raises(SdtuneError, match="cannot write .*config.yaml.*No space left"):
        save_config(cfg, tmp_path / "config.yaml")
    with pytest.raises(SdtuneError, match="cannot write .*README.md.*No space left"):
        write_model_card(tmp_path, {"family": "sd1"})
    assert not list(tmp_path.iterdir())
