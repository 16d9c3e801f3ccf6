"""The web app: `create_app(workspace)` builds the FastAPI application that `sdtune ui` serves."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

from fastapi import FastAPI, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from sdtune import __version__
from sdtune.errors import SdtuneError
from sdtune.runs.workspace import OutsideWorkspace, Workspace
from sdtune.ui import security

STATIC_DIR = Path(__file__).parent / "static"
MAX_UPLOAD_BYTES = 32 * 1024 * 1024
UPLOADS_DIR = "uploads"


def create_app(workspace: str | Path, host: str = "127.0.0.1", token: str | None = None) -> FastAPI:
    ws = Workspace(workspace)
    app = FastAPI(title="sdtune", version=__version__, docs_url=None, redoc_url=None)
    app.state.ws, app.state.host, app.state.token = ws, host, token

    @app.middleware("http")
    async def guard(request: Request, call_next):
        refusal = security.check_request(request, host, token)
        return refusal if refusal is not None else await call_next(request)

    @app.exception_handler(OutsideWorkspace)
    async def outside(request: Request, exc: OutsideWorkspace):
        return JSONResponse({"error": str(exc)}, status_code=403)

    @app.exception_handler(SdtuneError)
    async def bad_input(request: Request, exc: SdtuneError):
        return JSONResponse({"error": " ".join(str(exc).split())}, status_code=400)

    @app.get("/")
    def index():
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.post("/api/login")
    async def login(request: Request):
        given = (await request.json()).get("token", "")
        if token is None or not security.hmac.compare_digest(given.encode(), token.encode()):
            return JSONResponse({"error": "wrong token"}, status_code=401)
        response = JSONResponse({"ok": True})
        response.set_cookie(security.TOKEN_COOKIE, token, httponly=True, samesite="strict")
        return response

    @app.get("/api/info")
    def info():
        return {"version": __version__, "workspace": str(ws.root), "token": token is not None}

    @app.get("/api/file")
    def file(path: str, download: bool = False):
        real = ws.resolve(path, must_exist=True)
        if not real.is_file():
            raise SdtuneError(f"'{path}' is a folder, not a file")
        name = real.name if download else None
        return FileResponse(real, filename=name, headers={"Cache-Control": "no-cache"})

    @app.get("/api/thumb")
    def thumb(path: str, size: int = 256):
        real = ws.resolve(path, must_exist=True)
        from sdtune.data.thumbnails import thumbnail

        size = max(32, min(size, 1024))
        made = thumbnail(ws.root / ".sdtune" / "thumbs", real, size=size)
        return FileResponse(made, headers={"Cache-Control": "max-age=3600"})

    @app.post("/api/upload")
    async def upload(file: UploadFile):
        data = await file.read(MAX_UPLOAD_BYTES + 1)
        if len(data) > MAX_UPLOAD_BYTES:
            return JSONResponse(
                {"error": f"uploads are limited to {MAX_UPLOAD_BYTES // 2**20} MiB"},
                status_code=413,
            )
        return {"path": save_upload(ws, data, file.filename or "upload")}

    from sdtune.ui import data_api, generate_api, runs_api

    app.include_router(runs_api.router)
    app.include_router(data_api.router)
    app.include_router(generate_api.router)
    return app


def save_upload(ws: Workspace, data: bytes, name: str) -> str:
    """Decode an uploaded image with the training decoder, save it as PNG under uploads/."""
    from sdtune.data.images import ImageDecodeError, load_image

    try:
        image = load_image(io.BytesIO(data))
    except ImageDecodeError as exc:
        raise SdtuneError(f"'{name}' is not an image sdtune can read: {exc}") from None
    folder = ws.root / UPLOADS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{hashlib.sha256(data).hexdigest()[:16]}.png"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        image.save(tmp, format="PNG")
        tmp.replace(path)
    return ws.relative(path)


def workspace_of(request: Request) -> Workspace:
    return request.app.state.ws
