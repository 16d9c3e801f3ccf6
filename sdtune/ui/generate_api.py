"""Generate page: the generation form (declared once, in sdtune.generate.schema), jobs that run
`sdtune generate`, and the gallery of what they drew with the parameters in each PNG."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from sdtune.errors import SdtuneError
from sdtune.generate.schema import parse_lora
from sdtune.runs import jobs
from sdtune.runs.workspace import Workspace
from sdtune.ui.app import workspace_of
from sdtune.ui.recipes import is_hub_id

router = APIRouter(prefix="/api")
GENERATED_DIR = "generated"
FILE_OPTIONS = ("image", "mask", "depth_map", "config_dir")
GALLERY_LIMIT = 200


@router.get("/generate/form")
def generate_form():
    from sdtune.generate.schema import generation_form

    return generation_form()


def _confined(ws: Workspace, values: dict[str, Any]) -> dict[str, Any]:
    """The form's values with every file it names checked to lie in the workspace, named
    from it (jobs run in the workspace folder)."""
    values = {k: v for k, v in values.items() if v not in (None, "")}
    for key in FILE_OPTIONS:
        if key in values:
            values[key] = ws.relative(ws.resolve(str(values[key]), must_exist=True))
    loras = values.get("lora") or []
    if isinstance(loras, str):
        loras = [loras]
    checked = []
    for spec in loras:
        path, weight = parse_lora(str(spec))
        real = ws.relative(ws.resolve(path, must_exist=True))
        checked.append(real if weight == 1.0 else f"{real}:{weight:g}")
    if loras:
        values["lora"] = checked
    for key in ("model", "refiner"):  # a hub id, or a model in the workspace
        model = values.get(key)
        if model and not is_hub_id(ws, str(model)):
            values[key] = ws.relative(ws.resolve(str(model), must_exist=True))
    return values


def _messages(ws: Workspace, values: dict[str, Any]) -> dict[str, str]:
    """check_generation_values, with the workspace's files named as the server finds them."""
    from sdtune.generate.schema import check_generation_values

    here = dict(values)
    for key in (*FILE_OPTIONS, "model", "refiner"):
        if key in here and (ws.root / str(here[key])).exists():
            here[key] = str(ws.root / str(here[key]))
    if "lora" in here:
        here["lora"] = [str(ws.root / spec) for spec in here["lora"]]
    return check_generation_values(here)


@router.post("/generate/check")
async def check(request: Request):
    ws = workspace_of(request)
    values = _confined(ws, (await request.json()).get("values") or {})
    return {"messages": _messages(ws, values)}


@router.post("/generate")
async def generate(request: Request):
    from sdtune.generate.schema import generation_argv

    ws = workspace_of(request)
    values = _confined(ws, (await request.json()).get("values") or {})
    values.pop("out", None)
    messages = _messages(ws, values)
    if messages:
        raise SdtuneError(next(iter(messages.values())))
    job_id = jobs.new_job_id("generate", str(values.get("mode") or "txt2img"))
    folder = f"{GENERATED_DIR}/{job_id}"
    argv = ["generate", *generation_argv(values), "--out", folder]
    name = str(values.get("prompt", ""))[:60]
    job = jobs.submit(ws, "generate", argv, folder=folder, name=name, job_id=job_id)
    return {"job": job.id, "folder": folder}


@router.get("/gallery")
def gallery(request: Request):
    """The generated PNGs, newest first, each with the parameters written into it."""
    from PIL import Image

    ws = workspace_of(request)
    root = ws.root / GENERATED_DIR
    paths = sorted(root.glob("*/*.png"), key=lambda p: p.stat().st_mtime, reverse=True)
    items = []
    for path in paths[:GALLERY_LIMIT]:
        try:
            with Image.open(path) as image:
                parameters = image.text.get("parameters", "") if hasattr(image, "text") else ""
        except OSError:
            continue
        items.append({"path": ws.relative(path), "parameters": parameters, "job": path.parent.name})
    return items
