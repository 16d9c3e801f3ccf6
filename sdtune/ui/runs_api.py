"""New run, Runs and Results: recipes and the option form, launching, following (server-sent
events), stopping and resuming runs, and what a finished run holds."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from sdtune.errors import SdtuneError
from sdtune.runs import jobs
from sdtune.runs.overview import latest_train_jobs, list_runs, summarize
from sdtune.runs.workspace import Workspace
from sdtune.train.events import EventTail
from sdtune.ui import forms, recipes
from sdtune.ui.app import workspace_of

router = APIRouter(prefix="/api")
POLL_S = 0.5  # how often an open events stream looks for new lines
STATUS_S = 5.0  # how often it re-reads the run's status when nothing new was written
HEARTBEAT_S = 15.0


@router.get("/recipes")
def get_recipes(request: Request):
    return recipes.list_recipes(workspace_of(request))


@router.get("/config/form")
def config_form():
    return forms.config_form()


async def _run_request(request: Request) -> tuple[Workspace, str | None, dict[str, str], str]:
    ws = workspace_of(request)
    body = await request.json()
    overrides = {str(k): str(v) for k, v in (body.get("overrides") or {}).items()}
    recipes.check_paths(ws, overrides)
    return ws, recipes.recipe_argument(ws, body.get("recipe")), overrides, str(body.get("name", ""))


@router.post("/config/check")
async def check_config(request: Request):
    ws, recipe, overrides, _ = await _run_request(request)
    return {"messages": forms.config_messages(ws, recipe, overrides)}


@router.post("/config/command")
async def command(request: Request):
    ws, recipe, overrides, name = await _run_request(request)
    folder = recipes.run_folder_for(ws, name or "run")
    return {"command": recipes.command_line(ws, recipes.train_argv(recipe, overrides, folder))}


@router.post("/config/estimate")
async def estimate(request: Request):
    ws, recipe, overrides, _ = await _run_request(request)
    items = tuple([*([recipe] if recipe else []), *(f"{k}={v}" for k, v in overrides.items())])
    return await asyncio.to_thread(_estimate, str(ws.root), items)


@lru_cache(maxsize=64)
def _estimate(root: str, items: tuple[str, ...]) -> dict[str, Any]:
    """`sdtune estimate` in its own process (the server never imports torch)."""
    proc = subprocess.run(
        [sys.executable, "-m", "sdtune", "estimate", *items],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        env=jobs.job_environment(),
    )
    if proc.returncode != 0:
        return {"ok": False, "text": proc.stderr.strip().splitlines()[-1] if proc.stderr else ""}
    return {"ok": True, "text": proc.stdout.strip()}


@router.post("/runs")
async def start_run(request: Request):
    ws, recipe, overrides, name = await _run_request(request)
    messages = forms.config_messages(ws, recipe, overrides)
    if messages:
        first = next(iter(messages.values()))
        raise SdtuneError(f"{first} ({len(messages)} problem(s) in the form)")
    folder = recipes.run_folder_for(ws, name or "run")
    argv = recipes.train_argv(recipe, overrides, folder)
    job = jobs.submit(ws, "train", argv, folder=folder, name=name or Path(folder).name)
    return {"job": job.id, "folder": folder, "command": recipes.command_line(ws, argv)}


@router.get("/runs")
def runs(request: Request):
    return [vars(r) for r in list_runs(workspace_of(request))]


def _job_of(ws: Workspace, folder: str) -> jobs.Job | None:
    return latest_train_jobs(ws).get(folder)


def _run_folder(ws: Workspace, folder: str) -> str:
    """A run's folder, named from the workspace: one that exists, or a queued run's."""
    real = ws.resolve(folder)
    name = ws.relative(real)
    if not real.is_dir() and name not in latest_train_jobs(ws):
        raise SdtuneError(f"no run '{folder}' in the workspace")
    return name


@router.get("/run")
def run_detail(request: Request, folder: str):
    ws = workspace_of(request)
    folder = _run_folder(ws, folder)
    job = _job_of(ws, folder)
    detail = vars(summarize(ws, folder, job))
    detail["command"] = recipes.command_line(ws, job.argv) if job else None
    return detail


@router.post("/run/stop")
async def stop_run(request: Request):
    ws = workspace_of(request)
    folder = _run_folder(ws, (await request.json()).get("folder", ""))
    job = _job_of(ws, folder)
    if job is None:  # a run started from a terminal stops on its STOP file just the same
        from sdtune.train.events import request_stop

        request_stop(ws.root / folder)
        return {"status": "stopping"}
    return {"status": jobs.stop_job(ws, job.id)}


@router.post("/run/resume")
async def resume_run(request: Request):
    ws = workspace_of(request)
    folder = _run_folder(ws, (await request.json()).get("folder", ""))
    job = _job_of(ws, folder)
    if job is None:
        if not (ws.root / folder / "config.yaml").is_file():
            raise SdtuneError(f"'{folder}' has no config.yaml to resume from")
        argv = ["train", f"{folder}/config.yaml", f"output.dir={folder}", "train.resume=latest"]
        job = jobs.submit(ws, "train", argv, folder=folder, name=Path(folder).name)
        return {"job": job.id}
    return {"job": jobs.resume_job(ws, job.id).id}


def relative_event(ws: Workspace, event: dict[str, Any]) -> dict[str, Any]:
    """An event with its file paths made workspace-relative (what /api/file takes)."""
    out = dict(event)
    for key in ("grid", "adapter", "path", "checkpoint"):
        if isinstance(out.get(key), str):
            out[key] = ws.name_of(out[key]) or out[key]
    if isinstance(out.get("images"), list):
        out["images"] = [ws.name_of(p) or p for p in out["images"]]
    out.pop("config", None)
    return out


def _sse(kind: str, data: Any) -> str:
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n"


@router.get("/run/events")
async def run_events(request: Request, folder: str):
    """Every event of the run so far, then each new one as it is written; also the job's log
    lines (`log`) and its status when it changes (`status`)."""
    ws = workspace_of(request)
    folder = _run_folder(ws, folder)

    async def stream():
        tail = EventTail(ws.root / folder)
        log_offset, status, beat = 0, None, time.monotonic()
        job, checked = _job_of(ws, folder), 0.0
        while not await request.is_disconnected():
            sent = False
            for event in tail.read_new():
                yield _sse("run", relative_event(ws, event))
                sent = True
            if job is not None:
                lines, log_offset = _new_log_lines(
                    jobs.job_dir(ws, job.id) / jobs.LOG_FILE, log_offset
                )
                if lines:
                    yield _sse("log", lines)
                    sent = True
            # the status reads every job file and the whole events file: only when something
            # was written, or now and then (a process that died writes nothing)
            if sent or time.monotonic() - checked > STATUS_S:
                job, checked = _job_of(ws, folder), time.monotonic()
                now = vars(summarize(ws, folder, job))
                if now["status"] != status:
                    status = now["status"]
                    yield _sse("status", now)
                    sent = True
            if sent:
                beat = time.monotonic()
            elif time.monotonic() - beat > HEARTBEAT_S:
                yield ": keep-alive\n\n"
                beat = time.monotonic()
            await asyncio.sleep(POLL_S)

    return StreamingResponse(stream(), media_type="text/event-stream")


def _new_log_lines(path: Path, offset: int) -> tuple[list[str], int]:
    if not path.is_file():
        return [], offset
    with path.open("rb") as f:
        if offset == 0:  # a new reader starts with the last lines only
            f.seek(0, 2)
            offset = max(0, f.tell() - 16_000)
        f.seek(offset)
        data = f.read()
    complete = data[: data.rfind(b"\n") + 1]
    lines = complete.decode("utf-8", errors="replace").replace("\r", "\n").splitlines()
    return [ln for ln in lines if ln.strip()], offset + len(complete)


@router.get("/run/result")
def run_result(request: Request, folder: str):
    ws = workspace_of(request)
    folder = _run_folder(ws, folder)
    path = ws.root / folder
    result: dict[str, Any] = {"folder": folder, "summary": None, "card": None}
    try:
        from sdtune.adapters.inspect import inspect_adapter

        result["summary"] = inspect_adapter(path).format_table()
    except (SdtuneError, OSError, ValueError) as exc:
        result["summary_error"] = " ".join(str(exc).split())
    card = path / "README.md"
    result["card"] = card.read_text(encoding="utf-8") if card.is_file() else None
    result["samples"] = [ws.relative(p) for p in sorted(path.glob("samples/**/*.png"))]
    result["files"] = [ws.relative(p) for p in sorted(path.glob("*.safetensors"))]
    return result


@router.post("/run/convert")
async def convert_run(request: Request):
    """Write the run's adapter in the kohya layout (AUTOMATIC1111, ComfyUI), checked against
    the run's own base model."""
    ws = workspace_of(request)
    folder = _run_folder(ws, (await request.json()).get("folder", ""))
    out = f"{folder}/{Path(folder).name}-kohya.safetensors"
    argv = ["convert", folder, "--to", "kohya", "--out", out, "--overwrite"]
    base = _base_model(ws.root / folder)
    if base:
        argv += ["--model", base]
    proc = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "sdtune", *argv],
        cwd=ws.root,
        capture_output=True,
        text=True,
        timeout=600,
        env=jobs.job_environment(),
    )
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        raise SdtuneError(lines[-1] if lines else f"sdtune convert exited {proc.returncode}")
    return {"file": out, "output": proc.stdout.strip()}


def _base_model(folder: Path) -> str | None:
    config = folder / "config.yaml"
    if not config.is_file():
        return None
    import yaml

    data = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    return (data.get("model") or {}).get("path") or None


@router.get("/jobs")
def job_list(request: Request, kind: str | None = None):
    ws = workspace_of(request)
    out = []
    for job in jobs.list_jobs(ws):
        if kind is None or job.kind == kind:
            item = {**vars(job), "status": jobs.job_status(ws, job)}
            item["log"] = jobs.tail_lines(jobs.job_dir(ws, job.id) / jobs.LOG_FILE, 20)
            out.append(item)
    return out


@router.post("/job/stop")
async def stop_job(request: Request):
    ws = workspace_of(request)
    return {"status": jobs.stop_job(ws, str((await request.json()).get("id", "")))}
