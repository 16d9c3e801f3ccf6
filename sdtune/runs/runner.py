"""`python -m sdtune.runs.runner WORKSPACE [--device NAME]`: run a device's queued jobs in turn.

One runner per device and workspace holds `.sdtune/runner-<device>.lock` while it lives; a second
one exits at once. For each queued job, oldest first, it starts `python -m sdtune ARGV` with the
output in the job's `job.log`, records its pid, waits, and records its exit code. When the queue
is empty it exits; a job queued while it was leaving starts a new runner.
"""

from __future__ import annotations

import argparse
import fcntl
import signal
import subprocess
import sys
import time

from sdtune.runs.jobs import (
    LOG_FILE,
    Job,
    ensure_runner,
    job_dir,
    job_environment,
    list_jobs,
    queue_lock,
    read_job,
    runner_lock_path,
    update_job,
    write_job,
)
from sdtune.runs.workspace import Workspace


def start_next(ws: Workspace, device: str) -> tuple[Job, subprocess.Popen] | None:
    """Start the oldest queued job of `device`, recording its start and pid in one write."""
    with queue_lock(ws):
        queued = [j for j in list_jobs(ws) if j.device == device and j.started is None]
        queued = [j for j in queued if not j.cancelled]
        if not queued:
            return None
        job = queued[0]
        log = (job_dir(ws, job.id) / LOG_FILE).open("ab")
        log.write(f"$ sdtune {' '.join(job.argv)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            [sys.executable, "-m", "sdtune", *job.argv],
            cwd=ws.root,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=job_environment(),
        )
        log.close()
        job.started, job.pid, job.ended, job.exit_code = time.time(), proc.pid, None, None
        write_job(ws, job)
    return job, proc


def run_queue(ws: Workspace, device: str) -> int:
    """Run jobs until none waits; returns how many ran (0 when another runner serves)."""
    lock = runner_lock_path(ws, device).open("a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return 0
    current: list[subprocess.Popen] = []

    def forward(signum, frame):  # stopping the runner stops its job the same way
        for proc in current:
            proc.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    ran = 0
    try:
        while (started := start_next(ws, device)) is not None:
            job, proc = started
            current[:] = [proc]
            code = proc.wait()
            current.clear()
            if read_job(ws, job.id).pid == proc.pid:
                update_job(ws, job.id, ended=time.time(), exit_code=code)
            ran += 1
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()
    ensure_runner(ws, device)  # a job queued while this runner was leaving
    return ran


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdtune.runs.runner")
    parser.add_argument("workspace")
    parser.add_argument("--device", default="default")
    args = parser.parse_args(argv)
    run_queue(Workspace(args.workspace), args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
