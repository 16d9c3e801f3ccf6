"""The runs layer: jobs run as their own processes, one at a time per device, and what became of
them is read back from the workspace's files alone."""

from __future__ import annotations

import json
import time

import pytest

from sdtune.errors import SdtuneError
from sdtune.runs.jobs import (
    LOG_FILE,
    job_dir,
    job_status,
    list_jobs,
    read_job,
    resume_job,
    stop_job,
    submit,
)
from sdtune.runs.workspace import OutsideWorkspace, Workspace


def wait_for(ws, job_id, states, timeout=120):
    deadline = time.monotonic() + timeout
    while True:
        job = read_job(ws, job_id)
        status = job_status(ws, job)
        if status in states:
            return job, status
        assert time.monotonic() < deadline, f"job {job_id} still {status}"
        time.sleep(0.05)


def test_a_job_runs_in_its_own_process_and_its_end_is_recorded(tmp_path):
    ws = Workspace(tmp_path)
    ok = submit(ws, "generate", ["--version"], folder="generated/a")
    bad = submit(ws, "train", ["no-such-recipe.yaml"], folder="runs/bad")
    job, status = wait_for(ws, ok.id, ("finished", "failed"))
    assert status == "finished" and job.exit_code == 0 and job.pid
    assert "sdtune 0." in (job_dir(ws, ok.id) / LOG_FILE).read_text()
    job, status = wait_for(ws, bad.id, ("finished", "failed"))
    assert status == "failed" and job.exit_code == 2
    log = (job_dir(ws, bad.id) / LOG_FILE).read_text()
    assert "no-such-recipe.yaml" in log
    # one device runs one job at a time: the second started only after the first ended
    first, second = read_job(ws, ok.id), read_job(ws, bad.id)
    assert first.ended <= second.started


def test_a_queued_job_can_be_cancelled_and_never_starts(tmp_path):
    ws = Workspace(tmp_path)
    jobs = [submit(ws, "generate", ["--version"], folder=f"g/{i}") for i in range(3)]
    assert stop_job(ws, jobs[2].id) == "cancelled"
    wait_for(ws, jobs[1].id, ("finished",))
    time.sleep(0.3)  # give a wrongly started third job the time to show
    third = read_job(ws, jobs[2].id)
    assert job_status(ws, third) == "cancelled" and third.started is None
    assert [j.id for j in list_jobs(ws)] == [j.id for j in jobs]


def test_only_stopped_failed_or_interrupted_training_runs_resume(tmp_path):
    ws = Workspace(tmp_path)
    job = submit(ws, "generate", ["--version"], folder="g/x")
    wait_for(ws, job.id, ("finished",))
    with pytest.raises(SdtuneError, match="cannot be resumed"):
        resume_job(ws, job.id)
    with pytest.raises(SdtuneError, match="nothing to stop"):
        stop_job(ws, job.id)


def test_a_job_whose_process_vanished_counts_as_interrupted(tmp_path):
    ws = Workspace(tmp_path)
    job = submit(ws, "generate", ["--version"], folder="g/x")
    wait_for(ws, job.id, ("finished",))
    path = job_dir(ws, job.id) / "job.json"
    data = json.loads(path.read_text())
    data.update(ended=None, exit_code=None, pid=2**22 + 12345)  # killed before its end was written
    path.write_text(json.dumps(data))
    assert job_status(ws, read_job(ws, job.id)) == "interrupted"


@pytest.mark.parametrize("bad", ["../x", "a/../../x", "/etc/passwd", "link/secret"])
def test_paths_outside_the_workspace_are_refused(tmp_path, bad):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("no")
    ws = Workspace(tmp_path / "ws")
    (ws.root / "link").symlink_to(outside)
    with pytest.raises(OutsideWorkspace):
        ws.resolve(bad)


def test_paths_inside_the_workspace_resolve(tmp_path):
    ws = Workspace(tmp_path)
    (tmp_path / "a").mkdir()
    assert ws.resolve("a") == tmp_path.resolve() / "a"
    assert ws.resolve(str(tmp_path / "a")) == tmp_path.resolve() / "a"
    assert ws.relative(ws.resolve("a/b.txt")) == "a/b.txt"
    with pytest.raises(SdtuneError, match="does not exist"):
        ws.resolve("nothing", must_exist=True)
    with pytest.raises(SdtuneError, match="job ids"):
        job_dir(ws, "../etc")
