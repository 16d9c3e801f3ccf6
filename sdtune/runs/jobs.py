"""Jobs: an `sdtune` command line to run in its own process, queued per device.

A job is a folder `.sdtune/jobs/<id>/` of the workspace holding `job.json` (what to run and what
became of it) and `job.log` (the command's output). What it makes goes where its command puts it:
a training run into its `output.dir`, images into their `--out` folder. Every change to a
`job.json` is written whole (temporary file, then rename) under the workspace's queue lock, so the
web app and the runner never lose each other's updates.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sdtune.errors import SdtuneError
from sdtune.runs.workspace import Workspace
from sdtune.train.events import read_events, request_stop

STATE_DIR = ".sdtune"
JOB_FILE = "job.json"
LOG_FILE = "job.log"
KINDS = ("train", "generate", "caption")
# what a job can end as; "queued" and "running" are the states before that
ENDED = ("finished", "stopped", "failed", "interrupted", "cancelled")


@dataclass
class Job:
    id: str
    kind: str  # one of KINDS
    argv: list[str]  # arguments of `sdtune`, e.g. ["train", "recipe.yaml", "train.max_steps=20"]
    folder: str  # workspace-relative folder of what the job makes (a run folder, images)
    name: str = ""
    device: str = "default"  # jobs of one device run one at a time
    created: float = field(default_factory=time.time)
    started: float | None = None
    ended: float | None = None
    pid: int | None = None  # of the `sdtune` process
    exit_code: int | None = None
    cancelled: bool = False
    attempts: list[dict[str, Any]] = field(default_factory=list)  # earlier tries (resumed runs)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Job:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def jobs_dir(ws: Workspace) -> Path:
    return ws.root / STATE_DIR / "jobs"


def job_dir(ws: Workspace, job_id: str) -> Path:
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,100}", job_id) or job_id.startswith("."):
        raise SdtuneError(f"no job '{job_id}': job ids are letters, digits, '.', '_' and '-'")
    return jobs_dir(ws) / job_id


@contextlib.contextmanager
def queue_lock(ws: Workspace) -> Iterator[None]:
    """The workspace's lock for reading-then-writing job files (held for milliseconds)."""
    path = ws.root / STATE_DIR / "queue.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def write_job(ws: Workspace, job: Job) -> None:
    folder = job_dir(ws, job.id)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"{JOB_FILE}.tmp"
    tmp.write_text(json.dumps(asdict(job), indent=1), encoding="utf-8")
    os.replace(tmp, folder / JOB_FILE)


def read_job(ws: Workspace, job_id: str) -> Job:
    path = job_dir(ws, job_id) / JOB_FILE
    if not path.is_file():
        raise SdtuneError(f"no job '{job_id}' in the workspace")
    return Job.from_dict(json.loads(path.read_text(encoding="utf-8")))


def list_jobs(ws: Workspace) -> list[Job]:
    """Every job of the workspace, oldest first; an unreadable job file is skipped."""
    jobs = []
    for path in jobs_dir(ws).glob(f"*/{JOB_FILE}"):
        try:
            jobs.append(Job.from_dict(json.loads(path.read_text(encoding="utf-8"))))
        except (OSError, ValueError, TypeError):
            continue
    return sorted(jobs, key=lambda j: (j.created, j.id))


def update_job(ws: Workspace, job_id: str, **changes: Any) -> Job:
    with queue_lock(ws):
        job = read_job(ws, job_id)
        for key, value in changes.items():
            setattr(job, key, value)
        write_job(ws, job)
    return job


def new_job_id(kind: str, name: str = "") -> str:
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-")[:40] or kind
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{stem}-{uuid.uuid4().hex[:6]}"


def submit(
    ws: Workspace,
    kind: str,
    argv: list[str],
    folder: str,
    name: str = "",
    device: str = "default",
    job_id: str | None = None,
) -> Job:
    """Queue a job and make sure a runner serves its device; returns the queued job."""
    if kind not in KINDS:
        raise SdtuneError(f"job kind must be one of {', '.join(KINDS)}, got '{kind}'")
    job_id = job_id or new_job_id(kind, name)
    job_dir(ws, job_id)  # a valid id
    job = Job(id=job_id, kind=kind, argv=list(argv), folder=folder, name=name)
    job.device = device
    with queue_lock(ws):
        write_job(ws, job)
    ensure_runner(ws, device)
    return job


# --- what became of a job ---------------------------------------------------------------


def pid_alive(pid: int | None) -> bool:
    """Whether `pid` is a live sdtune process (a recycled pid of another program is not)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():
        try:
            text = cmdline.read_bytes()
        except OSError:
            return False
        return b"sdtune" in text
    return True


def last_event(ws: Workspace, job: Job) -> dict[str, Any] | None:
    if job.kind != "train":
        return None
    events = read_events(ws.root / job.folder)
    return events[-1] if events else None


def job_status(ws: Workspace, job: Job) -> str:
    """queued, running, finished, stopped (on request; resumable), failed, interrupted
    (the process ended without saying how: killed, the machine restarted), cancelled."""
    if job.cancelled:
        return "cancelled"
    if job.started is None:
        return "queued"
    if job.ended is None and (pid_alive(job.pid) or _runner_finishing(ws, job)):
        return "running"
    last = last_event(ws, job)
    if last is not None and last["event"] == "stopped":
        return "stopped"
    if job.exit_code == 0 or (last is not None and last["event"] == "finished"):
        return "finished"
    if job.exit_code is not None or (last is not None and last["event"] == "failed"):
        return "failed"
    return "interrupted"


def _runner_finishing(ws: Workspace, job: Job) -> bool:
    """The job's process just ended and its runner, alive, is about to write how."""
    if not runner_alive(ws, job.device):
        return False
    started = [j for j in list_jobs(ws) if j.device == job.device and j.started is not None]
    return max(started, key=lambda j: j.started).id == job.id


def error_line(ws: Workspace, job: Job) -> str | None:
    """The one-line error of a failed job: its `failed` event, else its log's last error line."""
    last = last_event(ws, job)
    if last is not None and last["event"] == "failed":
        return last.get("error")
    log = job_dir(ws, job.id) / LOG_FILE
    if log.is_file():
        lines = [ln for ln in tail_lines(log, 50) if "error" in ln.lower()]
        if lines:
            return lines[-1]
    return None


def tail_lines(path: Path, count: int = 100, max_bytes: int = 64_000) -> list[str]:
    """The last `count` lines of a text file (reading at most `max_bytes` from its end)."""
    if not path.is_file():
        return []
    with path.open("rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - max_bytes))
        data = f.read()
    text = data.decode("utf-8", errors="replace").replace("\r", "\n")  # progress bars redraw
    return [line for line in text.splitlines() if line.strip()][-count:]


# --- stop, cancel, resume ------------------------------------------------------------------


def stop_job(ws: Workspace, job_id: str) -> str:
    """Cancel a queued job; ask a running one to stop (a training run checkpoints first)."""
    with queue_lock(ws):
        job = read_job(ws, job_id)
        if job.started is None and not job.cancelled:
            job.cancelled = True
            write_job(ws, job)
            return "cancelled"
    status = job_status(ws, job)
    if status != "running":
        raise SdtuneError(f"job '{job_id}' is {status}, not running; there is nothing to stop")
    if job.kind == "train":
        request_stop(ws.root / job.folder)
    else:
        os.kill(job.pid, signal.SIGTERM)
    return "stopping"


def resume_job(ws: Workspace, job_id: str) -> Job:
    """Queue a stopped, failed or interrupted training run again: it goes on from its latest
    checkpoint (`train.resume=latest`) in the same run folder."""
    with queue_lock(ws):
        job = read_job(ws, job_id)
        status = job_status(ws, job)
        if job.kind != "train" or status not in ("stopped", "failed", "interrupted"):
            raise SdtuneError(
                f"job '{job_id}' ({job.kind}, {status}) cannot be resumed; a training run that "
                "stopped, failed or was interrupted can"
            )
        job.attempts.append(
            {
                "started": job.started,
                "ended": job.ended,
                "exit_code": job.exit_code,
                "status": status,
            }
        )
        job.argv = [a for a in job.argv if not a.startswith("train.resume=")] + [
            "train.resume=latest"
        ]
        job.started = job.ended = job.pid = job.exit_code = None
        write_job(ws, job)
    ensure_runner(ws, job.device)
    return job


# --- the runner of a device -------------------------------------------------------------


def runner_lock_path(ws: Workspace, device: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", device)
    return ws.root / STATE_DIR / f"runner-{safe}.lock"


def runner_alive(ws: Workspace, device: str) -> bool:
    path = runner_lock_path(ws, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


def has_queued(ws: Workspace, device: str) -> bool:
    return any(j.device == device and j.started is None and not j.cancelled for j in list_jobs(ws))


def ensure_runner(ws: Workspace, device: str = "default") -> subprocess.Popen | None:
    """Start a runner for `device` when jobs wait and none runs. The runner is its own session,
    so it outlives the process that started it."""
    if not has_queued(ws, device) or runner_alive(ws, device):
        return None
    log = ws.root / STATE_DIR / f"runner-{device}.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sdtune.runs.runner", str(ws.root), "--device", device],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=job_environment(),
        )
    _reap_later(proc)
    return proc


def job_environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _reap_later(proc: subprocess.Popen) -> None:
    """Collect the runner's exit status when it ends, so it leaves no zombie behind."""
    import threading

    threading.Thread(target=proc.wait, daemon=True).start()
