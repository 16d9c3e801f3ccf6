"""The web app's HTTP API: what it refuses (other hosts, no token, paths out of the workspace) and
that a run it starts is the run the CLI would make."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from safetensors import safe_open
from ui_server import HEADERS, wait_until

from sdtune.runs.workspace import Workspace
from sdtune.ui.app import create_app
from sdtune.ui.security import resolve_token


def test_a_loopback_server_answers_only_loopback_host_names(workspace):
    app = create_app(workspace)
    assert TestClient(app, base_url="http://127.0.0.1:7860").get("/api/info").status_code == 200
    assert TestClient(app, base_url="http://localhost:7860").get("/api/info").status_code == 200
    rebound = TestClient(app, base_url="http://attacker.example:7860")
    assert rebound.get("/api/info").status_code == 403


def test_changes_need_the_app_header_so_other_sites_cannot_forge_them(client):
    plain = TestClient(client.app, base_url="http://127.0.0.1:7860")
    response = plain.post("/api/datasets/sample")
    assert response.status_code == 403 and "x-sdtune" in response.json()["error"]
    assert not (client.app.state.ws.root / "datasets").exists()


def test_any_other_bind_needs_its_token(workspace):
    assert resolve_token("127.0.0.1", None) is None
    assert len(resolve_token("0.0.0.0", None)) >= 16  # a random one, printed at start
    with pytest.raises(Exception, match="at least 16"):
        resolve_token("0.0.0.0", "short")
    token = "t" * 24
    app = create_app(workspace, host="0.0.0.0", token=token)
    anyone = TestClient(app, base_url="http://192.0.2.7:7860", headers=HEADERS)
    assert anyone.get("/api/info").status_code == 401
    assert anyone.get("/api/info", headers={"X-Sdtune-Token": "t" * 23 + "x"}).status_code == 401
    assert anyone.get("/api/info", headers={"X-Sdtune-Token": token}).status_code == 200
    assert anyone.post("/api/login", json={"token": "wrong"}).status_code == 401
    assert anyone.post("/api/login", json={"token": token}).status_code == 200
    assert anyone.get("/api/info").status_code == 200  # the cookie login set
    assert anyone.get("/").status_code == 200  # the page itself asks for the token


def test_the_cli_prints_a_token_for_a_non_loopback_bind_and_refuses_requests_without_it(server):
    running = server("--host", "0.0.0.0")
    first = running.proc.stdout.readline() + running.proc.stdout.readline()
    assert "token: " in first
    token = first.split("token: ")[1].split()[0]
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{running.url}/api/runs", timeout=10)
    assert refused.value.code == 401
    request = urllib.request.Request(f"{running.url}/api/runs", headers={"X-Sdtune-Token": token})
    assert urllib.request.urlopen(request, timeout=10).status == 200


@pytest.fixture
def outside(tmp_path):
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "secret.txt").write_text("keep out")
    Image.new("RGB", (8, 8)).save(folder / "secret.png")
    return folder


def _listing(folder):
    return sorted((p.name, p.stat().st_mtime_ns) for p in folder.iterdir())


def test_no_request_reads_or_writes_outside_the_workspace(client, outside):
    ws: Workspace = client.app.state.ws
    (ws.root / "link").symlink_to(outside)
    client.post("/api/datasets/sample")
    before = _listing(outside)
    dataset = "datasets/toy-rings"
    attempts = [
        ("GET", "/api/file", {"path": "../outside/secret.txt"}),
        ("GET", "/api/file", {"path": str(outside / "secret.txt")}),
        ("GET", "/api/file", {"path": "link/secret.txt"}),
        ("GET", "/api/thumb", {"path": "link/secret.png"}),
        ("GET", "/api/dataset", {"dir": "link"}),
        ("GET", "/api/dataset", {"dir": "../outside"}),
        ("GET", "/api/dataset/buckets", {"dir": str(outside)}),
        ("GET", "/api/run", {"folder": "link"}),
        ("GET", "/api/run/result", {"folder": "../outside"}),
        (
            "POST",
            "/api/dataset/caption",
            {"dir": dataset, "image": "../../link/secret.png", "text": "x"},
        ),
        ("POST", "/api/dataset/caption", {"dir": "link", "image": "secret.png", "text": "x"}),
        ("POST", "/api/dataset/trigger", {"dir": "link", "trigger": "sks"}),
        ("POST", "/api/dataset/autocaption", {"dir": "../outside"}),
        (
            "POST",
            "/api/runs",
            {"recipe": "workspace:recipes/toy-lora.yaml", "overrides": {"data.dir": "link"}},
        ),
        ("POST", "/api/runs", {"recipe": "workspace:../outside/secret.txt", "overrides": {}}),
        ("POST", "/api/runs", {"recipe": "shipped:../../outside/x.yaml", "overrides": {}}),
        ("POST", "/api/runs", {"recipe": None, "overrides": {"output.dir": str(outside)}}),
        ("POST", "/api/run/stop", {"folder": "link"}),
        ("POST", "/api/run/resume", {"folder": "../outside"}),
        ("POST", "/api/run/convert", {"folder": "link"}),
        (
            "POST",
            "/api/generate",
            {"values": {"prompt": "x", "image": "link/secret.png", "mode": "img2img"}},
        ),
        (
            "POST",
            "/api/generate",
            {"values": {"prompt": "x", "lora": [str(outside / "secret.txt")]}},
        ),
        ("POST", "/api/generate", {"values": {"prompt": "x", "model": str(outside)}}),
        ("POST", "/api/generate", {"values": {"prompt": "x", "refiner": str(outside)}}),
        ("POST", "/api/generate", {"values": {"prompt": "x", "config_dir": str(outside)}}),
    ]
    for method, path, data in attempts:
        if method == "GET":
            response = client.get(path, params=data)
        else:
            response = client.post(path, json=data)
        assert 400 <= response.status_code < 500, (path, data, response.status_code, response.text)
        assert "keep out" not in response.text
    assert _listing(outside) == before
    assert (outside / "secret.txt").read_text() == "keep out"
    assert not (ws.root / ".sdtune" / "jobs").exists() or not list(
        (ws.root / ".sdtune" / "jobs").iterdir()
    )


def test_uploads_are_size_limited_and_decoded_safely(client, monkeypatch):
    import sdtune.ui.app as app_module

    buffer = io.BytesIO()
    Image.new("RGB", (16, 8), (200, 10, 10)).save(buffer, format="JPEG")
    saved = client.post("/api/upload", files={"file": ("a.jpg", buffer.getvalue(), "image/jpeg")})
    assert saved.status_code == 200
    path = client.app.state.ws.root / saved.json()["path"]
    assert Image.open(path).size == (16, 8) and path.suffix == ".png"
    broken = client.post(
        "/api/upload", files={"file": ("b.png", b"\x89PNG not really", "image/png")}
    )
    assert broken.status_code == 400 and "b.png" in broken.json()["error"]
    monkeypatch.setattr(app_module, "MAX_UPLOAD_BYTES", 100)
    big = client.post("/api/upload", files={"file": ("c.jpg", buffer.getvalue(), "image/jpeg")})
    assert big.status_code == 413


def test_captions_are_edited_in_place_and_the_images_never_touched(client):
    root = client.app.state.ws.root
    client.post("/api/datasets/sample")
    view = client.get("/api/dataset", params={"dir": "datasets/toy-rings"}).json()
    assert len(view["items"]) == 16 and view["skipped"] == []
    first = view["items"][0]
    image = root / "datasets/toy-rings" / first["path"]
    pixels = image.read_bytes()
    saved = client.post(
        "/api/dataset/caption",
        json={"dir": "datasets/toy-rings", "image": first["path"], "text": "sks, a blue ring"},
    )
    assert saved.status_code == 200, saved.text
    assert image.with_suffix(".txt").read_text(encoding="utf-8").strip() == "sks, a blue ring"
    assert image.read_bytes() == pixels
    changed = client.post(
        "/api/dataset/trigger",
        json={"dir": "datasets/toy-rings", "trigger": "zwx", "replace": "sks"},
    ).json()["changed"]
    assert changed == 16
    assert image.with_suffix(".txt").read_text(encoding="utf-8").startswith("zwx")
    captions = [p.read_text(encoding="utf-8") for p in (root / "datasets/toy-rings").glob("*.txt")]
    assert len(captions) == 16 and all("zwx" in c and "sks" not in c for c in captions)
    tags = dict(client.get("/api/dataset", params={"dir": "datasets/toy-rings"}).json()["tags"])
    assert tags["zwx"] == 1  # the edited caption's first tag


def test_the_form_reports_every_problem_with_the_cli_messages(client):
    recipe = "workspace:recipes/toy-lora.yaml"
    fine = client.post("/api/config/check", json={"recipe": recipe, "overrides": {}}).json()
    assert fine["messages"] == {}
    bad = client.post(
        "/api/config/check",
        json={
            "recipe": recipe,
            "overrides": {"lora.rank": "0", "train.learning_rate": "inf", "train.max_stepz": "3"},
        },
    ).json()["messages"]
    assert {"lora.rank", "train.learning_rate"} <= set(bad) and any(
        "max_steps" in m for m in bad.values()
    )
    cli = subprocess.run(
        [sys.executable, "-m", "sdtune", "train", "recipes/toy-lora.yaml", "lora.rank=0"],
        cwd=client.app.state.ws.root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 2 and bad["lora.rank"] in cli.stderr
    started = client.post("/api/runs", json={"recipe": recipe, "overrides": {"lora.rank": "0"}})
    assert started.status_code == 400 and not (client.app.state.ws.root / "runs").exists()


def _tensors(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_a_run_started_from_the_app_is_the_run_the_cli_makes(client):
    ws = client.app.state.ws
    client.post("/api/datasets/sample")
    overrides = {
        "train.max_steps": "6",
        "output.sample_prompts": "",
        "train.checkpoint_every_n_steps": "3",
    }
    started = client.post(
        "/api/runs",
        json={
            "recipe": "workspace:recipes/toy-lora.yaml",
            "overrides": overrides,
            "name": "ui run",
        },
    ).json()
    assert started["folder"] == "runs/ui-run"
    command = started["command"]
    assert command.startswith(f"cd {ws.root} && sdtune train recipes/toy-lora.yaml")

    def finished():
        runs = {r["folder"]: r for r in client.get("/api/runs").json()}
        run = runs.get("runs/ui-run")
        assert run is None or run["status"] in ("queued", "running", "finished"), run
        return run if run and run["status"] == "finished" else None

    run = wait_until(finished, what="the app's run to finish")
    assert run["step"] == 6 and run["adapter"].startswith("runs/ui-run/")
    items = [f"{k}={v}" for k, v in overrides.items()]
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "sdtune",
            "train",
            "recipes/toy-lora.yaml",
            *items,
            "output.dir=cli-run",
        ],
        cwd=ws.root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert cli.returncode == 0, cli.stderr[-2000:]
    ui_tensors, ui_meta = _tensors(ws.root / run["adapter"])
    cli_tensors, cli_meta = _tensors(ws.root / "cli-run" / "pytorch_lora_weights.safetensors")
    assert ui_tensors.keys() == cli_tensors.keys() and ui_tensors
    assert all(ui_tensors[k].equal(cli_tensors[k]) for k in ui_tensors)
    # the headers differ only in what tells the two runs apart: their folder and run id
    for meta in (ui_meta, cli_meta):
        meta.pop("run_id", None)
        config = json.loads(meta.pop("sdtune.config"))
        assert config["output"].pop("dir") in ("runs/ui-run", "cli-run")
        meta["config"] = config
    assert ui_meta == cli_meta
    result = client.get("/api/run/result", params={"folder": "runs/ui-run"}).json()
    assert "lora" in result["summary"].lower() and result["files"]
    assert "cli-run" in {r["folder"] for r in client.get("/api/runs").json()}  # found by its events
    # Results: the kohya file is checked against the consumers' key rules before it is written;
    # the toy base numbers its blocks unlike a full-size U-Net, so AUTOMATIC1111 would drop
    # layers, and the app passes on the refusal instead of writing a file that loses them
    converted = client.post("/api/run/convert", json={"folder": "runs/ui-run"})
    assert converted.status_code == 400, converted.text
    assert "AUTOMATIC1111 would not load" in converted.json()["error"]
    assert not (ws.root / "runs/ui-run/ui-run-kohya.safetensors").exists()
    # Generate: img2img from an uploaded image with the run's adapter at weight 0.8
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (30, 90, 200)).save(buffer, format="PNG")
    upload = client.post("/api/upload", files={"file": ("in.png", buffer.getvalue(), "image/png")})
    values = {
        "prompt": "a sks ring",
        "mode": "img2img",
        "image": upload.json()["path"],
        "steps": "3",
        "strength": "0.5",
        "lora": ["runs/ui-run:0.8"],
        "seed": "7",
    }
    job = client.post("/api/generate", json={"values": values}).json()["job"]

    def drawn():
        jobs = {j["id"]: j for j in client.get("/api/jobs", params={"kind": "generate"}).json()}
        assert jobs[job]["status"] in ("queued", "running", "finished"), jobs[job]["log"]
        return jobs[job]["status"] == "finished"

    wait_until(drawn, what="the img2img job")
    (item,) = [g for g in client.get("/api/gallery").json() if g["job"] == job]
    assert "Seed: 7" in item["parameters"] and "Denoising strength: 0.5" in item["parameters"]
    assert Image.open(ws.root / item["path"]).size == (64, 64)
