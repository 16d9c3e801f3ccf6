"""The training runs of a workspace, read from their folders: what the Runs page lists.

A run is a folder holding `events.jsonl` (any `sdtune train` writes one), or the folder of a
queued training job that has not written it yet. Runs started by the web app have a job that
says whether their process lives; a run started from a terminal has only its events, so it
counts as running while its events file changed in the last `QUIET_LIMIT_S` seconds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdtune.runs.jobs import STATE_DIR, Job, error_line, job_status, list_jobs
from sdtune.runs.workspace import Workspace
from sdtune.train.events import EVENTS_FILE, read_events

QUIET_LIMIT_S = 600
SEARCH_DEPTH = 3  # run folders this deep under the workspace are found


@dataclass
class RunSummary:
    folder: str  # workspace-relative: the run's address in the app
    name: str
    status: str  # queued, running, finished, stopped, failed, interrupted, cancelled
    job: str | None  # the job id, for runs started by the app
    created: float
    step: int = 0
    max_steps: int = 0
    loss: float | None = None
    adapter: str | None = None  # workspace-relative, once finished
    error: str | None = None


def find_run_folders(ws: Workspace) -> list[Path]:
    found = []
    for depth in range(1, SEARCH_DEPTH + 1):
        pattern = "/".join(["*"] * depth) + f"/{EVENTS_FILE}"
        for path in ws.root.glob(pattern):
            rel = path.parent.relative_to(ws.root).parts
            if rel[0] != STATE_DIR and not any(p.startswith("previous-") for p in rel):
                found.append(path.parent)
    return found


def latest_train_jobs(ws: Workspace) -> dict[str, Job]:
    """The newest training job of each run folder."""
    jobs: dict[str, Job] = {}
    for job in list_jobs(ws):
        if job.kind == "train":
            jobs[job.folder] = job
    return jobs


def status_from_events(events: list[dict[str, Any]], folder: Path) -> str:
    ends = {"finished": "finished", "stopped": "stopped", "failed": "failed"}
    if events and events[-1]["event"] in ends:
        return ends[events[-1]["event"]]
    changed = (folder / EVENTS_FILE).stat().st_mtime if (folder / EVENTS_FILE).exists() else 0
    return "running" if time.time() - changed < QUIET_LIMIT_S else "interrupted"


def summarize(ws: Workspace, folder: str, job: Job | None) -> RunSummary:
    path = ws.root / folder
    events = read_events(path)
    status = job_status(ws, job) if job is not None else status_from_events(events, path)
    created = job.created if job is not None else (events[0]["time"] if events else 0.0)
    summary = RunSummary(
        folder=folder,
        name=job.name if job is not None and job.name else Path(folder).name,
        status=status,
        job=job.id if job is not None else None,
        created=created,
    )
    for event in events:
        if event["event"] == "start":
            summary.max_steps = event["max_steps"]
        elif event["event"] == "step":
            summary.step, summary.loss = event["step"], event["loss"]
        elif event["event"] == "finished":
            summary.adapter = ws.name_of(event.get("adapter"))
            summary.step = event["step"]
    if status == "failed":
        summary.error = (
            error_line(ws, job)
            if job is not None
            else next((e.get("error") for e in reversed(events) if e["event"] == "failed"), None)
        )
    return summary


def list_runs(ws: Workspace) -> list[RunSummary]:
    """Every training run of the workspace, newest first."""
    jobs = latest_train_jobs(ws)
    folders = {ws.relative(p) for p in find_run_folders(ws)} | set(jobs)
    runs = [summarize(ws, folder, jobs.get(folder)) for folder in folders]
    return sorted(runs, key=lambda r: r.created, reverse=True)
