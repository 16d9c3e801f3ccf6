"""The web app under test: in-process through FastAPI's HTTP client, or as a real `sdtune ui`
server process on a free port (for the browser and for kill/restart)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from ui_server import HEADERS, Server

from sdtune.ui.app import create_app


@pytest.fixture
def workspace(tmp_path) -> Path:
    return tmp_path / "ws"


@pytest.fixture
def client(workspace) -> TestClient:
    from sdtune.runs.workspace import Workspace
    from sdtune.ui.recipes import ensure_toy_recipe

    ensure_toy_recipe(Workspace(workspace))
    return TestClient(create_app(workspace), base_url="http://127.0.0.1:7860", headers=HEADERS)


@pytest.fixture
def server(workspace):
    servers: list[Server] = []

    def start(*extra: str) -> Server:
        servers.append(Server(workspace, *extra).start())
        return servers[-1]

    yield start
    for s in servers:
        s.kill()
    # jobs a test left running are stopped, so nothing outlives the test session
    from sdtune.runs.jobs import list_jobs, pid_alive
    from sdtune.runs.workspace import Workspace

    if workspace.exists():
        for job in list_jobs(Workspace(workspace)):
            if pid_alive(job.pid):
                os.kill(job.pid, signal.SIGKILL)
