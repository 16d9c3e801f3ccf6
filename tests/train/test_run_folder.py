"""The run folder's bookkeeping without a model: what counts as a complete checkpoint, pruning
that a kill cannot tear, leftovers cleaned at the next start, earlier runs kept aside, and the
final files moved into place only once all of them are written."""

import os
import shutil

import pytest
import torch

from sdtune.adapters.io import check_finite
from sdtune.errors import SdtuneError
from sdtune.train import checkpoint as ckpt
from sdtune.train.outputs import (
    FINAL_STAGING,
    begin_final_files,
    commit_final_files,
    move_earlier_run_aside,
    prepare_output_dir,
    remove_leftovers,
    run_is_complete,
)


def _state(step):
    return {"progress": {"step": step, "epoch": 0, "batch_in_epoch": 0}, "trainable": []}


def _write_adapter(folder):
    torch.save({"w": torch.ones(3)}, folder / ckpt.ADAPTER_FILE)  # stands in for the adapter


def _save(root, step, keep=0):
    return ckpt.save_checkpoint(root, step, _state(step), _write_adapter, keep)


def _names(root):
    return [p.name for p in ckpt.list_checkpoints(root)]


def test_a_folder_counts_as_complete_only_with_every_file_it_lists(tmp_path):
    for step in (1, 2, 3):
        _save(tmp_path, step)
    folders = ckpt.list_checkpoints(tmp_path)
    listed = (folders[0] / ckpt.COMPLETE_MARKER).read_text().split()
    assert ckpt.STATE_FILE in listed and ckpt.ADAPTER_FILE in listed
    (folders[0] / ckpt.ADAPTER_FILE).unlink()  # as a kill in an old-style delete left it
    for name in os.listdir(folders[1]):  # only the marker left
        if name != ckpt.COMPLETE_MARKER:
            (folders[1] / name).unlink()
    with open(folders[2] / ckpt.STATE_FILE, "r+b") as f:  # torn: shorter than listed
        f.truncate(10)
    assert _names(tmp_path) == []
    with pytest.raises(SdtuneError, match="not a complete checkpoint"):
        ckpt.resolve_resume(tmp_path, str(folders[0]))
    assert ckpt.remove_checkpoint_leftovers(tmp_path) == [f.name for f in folders]
    assert os.listdir(tmp_path / ckpt.CHECKPOINTS_DIR) == []


def test_a_kill_during_pruning_leaves_no_half_deleted_checkpoint_that_counts(tmp_path, monkeypatch):
    for step in (1, 2):
        _save(tmp_path, step, keep=2)
    real = shutil.rmtree

    def killed_half_way(path, *args, **kwargs):  # deletes one file, then the process dies
        os.unlink(os.path.join(path, ckpt.ADAPTER_FILE))
        raise KeyboardInterrupt  # as far as the folder is concerned, a kill

    monkeypatch.setattr(ckpt.shutil, "rmtree", killed_half_way)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 3, keep=2)
    monkeypatch.setattr(ckpt.shutil, "rmtree", real)
    left = sorted(os.listdir(tmp_path / ckpt.CHECKPOINTS_DIR))
    assert left == [".pruning-step-000001", "step-000002", "step-000003"]
    assert _names(tmp_path) == ["step-000002", "step-000003"]
    assert ckpt.remove_checkpoint_leftovers(tmp_path) == [".pruning-step-000001"]
    assert sorted(os.listdir(tmp_path / ckpt.CHECKPOINTS_DIR)) == ["step-000002", "step-000003"]


def test_torn_writes_are_removed_at_the_next_start(tmp_path):
    _save(tmp_path, 1)
    torn = tmp_path / ckpt.CHECKPOINTS_DIR / ".tmp-step-000002"
    torn.mkdir()
    (torn / ckpt.STATE_FILE).write_bytes(b"half")
    remove_leftovers(tmp_path)
    assert os.listdir(tmp_path / ckpt.CHECKPOINTS_DIR) == ["step-000001"]


def test_overwrite_keeps_the_older_run_aside_where_no_lister_finds_it(tmp_path, caplog):
    old = tmp_path / "run"
    for step in (100, 110):
        _save(old, step)
    (old / "config.yaml").write_text("old: true\n")
    with caplog.at_level("WARNING", logger="sdtune.train"):
        prepare_output_dir(old, overwrite=True)
    assert sorted(os.listdir(old)) == ["previous-1"]
    assert "previous-1" in caplog.text
    assert _names(old) == [] and _names(old / "previous-1") == ["step-000100", "step-000110"]
    (old / "config.yaml").write_text("second: true\n")
    assert move_earlier_run_aside(old) == old / "previous-2"  # a third run keeps both
    assert sorted(os.listdir(old)) == ["previous-1", "previous-2"]
    assert (old / "previous-2" / "config.yaml").read_text() == "second: true\n"
    with pytest.raises(SdtuneError, match="already holds files"):
        prepare_output_dir(old, overwrite=False)


def test_final_files_replace_the_earlier_ones_only_once_all_are_written(tmp_path, monkeypatch):
    (tmp_path / "config.yaml").write_text("earlier\n")
    (tmp_path / ckpt.ADAPTER_FILE).write_bytes(b"earlier")
    staging = begin_final_files(tmp_path)
    (staging / ckpt.ADAPTER_FILE).write_bytes(b"new")
    # Killed before the marker: the folder keeps its earlier state, the next start rolls back.
    remove_leftovers(tmp_path)
    assert not (tmp_path / FINAL_STAGING).exists()
    assert (tmp_path / ckpt.ADAPTER_FILE).read_bytes() == b"earlier"
    staging = begin_final_files(tmp_path)
    (staging / ckpt.ADAPTER_FILE).write_bytes(b"new")
    (staging / "config.yaml").write_text("new\n")
    real = os.replace
    moved = []

    def killed_after_one_move(src, dst):
        if str(src).startswith(str(staging)) and str(dst).startswith(str(staging)):
            return real(src, dst)  # the marker
        if moved:
            raise KeyboardInterrupt
        moved.append(dst)
        return real(src, dst)

    monkeypatch.setattr(os, "replace", killed_after_one_move)
    with pytest.raises(KeyboardInterrupt):
        commit_final_files(tmp_path)
    monkeypatch.setattr(os, "replace", real)
    assert (tmp_path / ckpt.ADAPTER_FILE).read_bytes() == b"new"  # the config moves last
    assert (tmp_path / "config.yaml").read_text() == "earlier\n"
    assert not run_is_complete(tmp_path)  # something is still staged
    remove_leftovers(tmp_path)  # the marker was written: the next start finishes the moves
    assert (tmp_path / "config.yaml").read_text() == "new\n" and run_is_complete(tmp_path)


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_hostile_training_state_is_refused_in_one_line_without_running_it(tmp_path):
    folder = _save(tmp_path, 1)
    marker = tmp_path / "ran"
    torch.save({**_state(1), "x": _Payload(marker)}, folder / ckpt.STATE_FILE)
    ckpt.write_manifest(folder, "1")
    with pytest.raises(SdtuneError) as info:
        ckpt.load_training_state(folder)
    message = str(info.value)
    assert "holds code or objects other than tensors and was not loaded" in message
    assert "\n" not in message and "weights_only" not in message
    assert not marker.exists()
    torch.save([1, 2], folder / ckpt.STATE_FILE)  # plain data, not a training state
    ckpt.write_manifest(folder, "1")
    with pytest.raises(SdtuneError, match="cannot read .*not an sdtune training state"):
        ckpt.load_training_state(folder)


def test_nothing_non_finite_is_written(tmp_path):
    weights = {"a": torch.ones(4), "b": torch.tensor([1.0, float("nan"), float("inf")])}
    with pytest.raises(SdtuneError, match="2 of 7 values are NaN or infinite"):
        check_finite(weights, tmp_path / "x.safetensors")
    state = {**_state(1), "trainable": [torch.ones(2)], "ema": {"shadow": [torch.tensor([1e39])]}}
    with pytest.raises(SdtuneError, match="checkpoint of step 1 not saved.*ema.shadow"):
        ckpt.save_checkpoint(tmp_path, 1, state, _write_adapter, 0)
    assert os.listdir(tmp_path / ckpt.CHECKPOINTS_DIR) == []
