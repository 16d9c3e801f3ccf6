"""Helpers of the web app's tests: a real `sdtune ui` server process on a free port, and
waiting for a condition without sleeping longer than needed."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

HEADERS = {"X-Sdtune": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`sdtune ui` in its own process; `url` answers once it is up."""

    def __init__(self, workspace: Path, *extra: str):
        self.workspace, self.extra = workspace, extra
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Server:
        cmd = [sys.executable, "-m", "sdtune", "ui", "--workspace", str(self.workspace)]
        cmd += ["--port", str(self.port), *self.extra]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        deadline = time.monotonic() + 60
        try:
            return self._wait_until_up(deadline)
        except BaseException:
            self.kill()  # a server that never answered is not left behind
            raise

    def _wait_until_up(self, deadline: float) -> Server:
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/api/info", timeout=2).read()
                return self
            except urllib.error.HTTPError:  # up, and asking for its token
                return self
            except OSError:
                assert self.proc.poll() is None, self.proc.stdout.read()
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.1)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def get(self, path: str):
        with urllib.request.urlopen(f"{self.url}{path}", timeout=30) as response:
            return json.loads(response.read())

    def post(self, path: str, body: dict):
        request = urllib.request.Request(
            f"{self.url}{path}",
            data=json.dumps(body).encode(),
            method="POST",
            headers={**HEADERS, "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())


def wait_until(check, timeout=180, what="the condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
