"""Dataset page: the image folders of the workspace, captions edited in place, the trigger word
across a set, tag frequency, skipped files, the bucket dry run and the autocaptioner."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from fastapi import APIRouter, Request

from sdtune.errors import SdtuneError
from sdtune.runs import jobs
from sdtune.runs.workspace import Workspace
from sdtune.ui.app import workspace_of
from sdtune.ui.recipes import TOY_DATASET

router = APIRouter(prefix="/api")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
SKIP_DIRS = {".sdtune", "runs", "generated", "uploads", "recipes"}
MAX_DEPTH = 3


def image_folders(ws: Workspace) -> list[dict]:
    """Folders of the workspace (3 levels deep) that hold images, with their image count."""
    found = []
    for top, dirs, files in os.walk(ws.root):
        rel = Path(top).relative_to(ws.root)
        depth = len(rel.parts)
        dirs[:] = sorted(
            d for d in dirs if not d.startswith(".") and not (depth == 0 and d in SKIP_DIRS)
        )
        if depth >= MAX_DEPTH:
            dirs[:] = []
        count = sum(Path(f).suffix.lower() in IMAGE_SUFFIXES for f in files)
        if count and depth > 0:
            found.append({"dir": rel.as_posix(), "images": count})
    return found


def _dataset_dir(ws: Workspace, folder: str) -> Path:
    real = ws.resolve(folder, must_exist=True)
    if not real.is_dir():
        raise SdtuneError(f"'{folder}' is a file; a dataset is a folder of images")
    return real


@router.get("/datasets")
def datasets(request: Request):
    return image_folders(workspace_of(request))


@router.post("/datasets/sample")
async def sample_dataset(request: Request):
    """A small captioned set of rendered rings for the toy recipe (never over an existing one)."""
    from sdtune.data.synthetic import write_shape_dataset

    ws = workspace_of(request)
    folder = ws.root / TOY_DATASET
    if folder.exists() and any(folder.iterdir()):
        return {"dir": TOY_DATASET, "created": False}
    write_shape_dataset(folder, shape="ring", count=16, size=64, trigger="sks", seed=0)
    return {"dir": TOY_DATASET, "created": True}


@router.get("/dataset")
def dataset(request: Request, dir: str, caption_ext: str = ".txt"):
    from sdtune.data.editing import list_dataset, rank_tags

    ws = workspace_of(request)
    folder = _dataset_dir(ws, dir)
    view = list_dataset(folder, caption_ext=caption_ext)
    out = dataclasses.asdict(view)
    out["dir"] = ws.relative(folder)
    out["tags"] = rank_tags(view)[:50]
    return out


@router.post("/dataset/caption")
async def save_caption(request: Request):
    from sdtune.data.editing import save_caption

    ws = workspace_of(request)
    body = await request.json()
    folder = _dataset_dir(ws, body.get("dir", ""))
    ws.resolve(folder / str(body.get("image", "")), must_exist=True)
    path = save_caption(
        folder, str(body["image"]), str(body.get("text", "")), body.get("caption_ext", ".txt")
    )
    return {"sidecar": ws.relative(path)}


@router.post("/dataset/trigger")
async def set_trigger(request: Request):
    from sdtune.data.editing import set_trigger

    ws = workspace_of(request)
    body = await request.json()
    folder = _dataset_dir(ws, body.get("dir", ""))
    trigger = str(body.get("trigger", "")).strip()
    if not trigger:
        raise SdtuneError("give the trigger word to add (or to put in place of another)")
    changed = set_trigger(
        folder,
        trigger,
        replace=body.get("replace") or None,
        caption_ext=body.get("caption_ext", ".txt"),
    )
    return {"changed": changed}


@router.get("/dataset/buckets")
def buckets(
    request: Request,
    dir: str,
    resolution: int = 512,
    bucketing: bool = False,
    center_crop: bool = True,
    pad: bool = False,
    upscale: bool = False,
    validation_split: float = 0.0,
    seed: int = 0,
):
    from sdtune.config import DataConfig
    from sdtune.data.editing import bucket_plan

    ws = workspace_of(request)
    folder = _dataset_dir(ws, dir)
    if resolution < 8 or resolution % 8 or resolution > 4096:
        raise SdtuneError(f"data.resolution must be a positive multiple of 8, got {resolution}")
    if not 0 <= validation_split < 1:
        raise SdtuneError(f"data.validation_split must be in [0, 1), got {validation_split}")
    cfg = DataConfig(
        dir=str(folder),
        resolution=resolution,
        bucketing=bucketing,
        center_crop=center_crop,
        pad=pad,
        upscale=upscale,
        validation_split=validation_split,
    )
    plan = bucket_plan(cfg, seed=seed)  # paths relative to the folder
    return [dataclasses.asdict(box) for box in plan]


@router.post("/dataset/autocaption")
async def autocaption(request: Request):
    """Caption the images without one, as `sdtune caption` does, as a job with its log."""
    ws = workspace_of(request)
    body = await request.json()
    folder = ws.relative(_dataset_dir(ws, body.get("dir", "")))
    argv = ["caption", folder]
    if body.get("model"):
        argv += ["--model", str(body["model"])]
    if body.get("prefix"):
        argv += ["--prefix", str(body["prefix"])]
    job = jobs.submit(ws, "caption", argv, folder=folder, name=f"caption {folder}")
    return {"job": job.id}
