"""A real `sdtune ui` process: killing it mid-run leaves the run going, and a restarted server
shows it live again; stop and resume through it."""

from __future__ import annotations

import json
import urllib.request

from ui_server import wait_until


def read_events(url: str, folder: str, want: int, timeout: float = 120) -> list[dict]:
    """Read the run's server-sent events until `want` of kind `run` arrived."""
    events = []
    with urllib.request.urlopen(f"{url}/api/run/events?folder={folder}", timeout=timeout) as stream:
        kind = None
        for raw in stream:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: ") and kind == "run":
                events.append(json.loads(line[6:]))
                if len(events) >= want:
                    return events
    return events


def test_a_run_outlives_a_killed_server_and_a_restarted_one_follows_it(server):
    first = server()
    first.post("/api/datasets/sample", {})
    overrides = {
        "train.max_steps": "400",
        "output.sample_prompts": "",
        "train.checkpoint_every_n_steps": "0",
    }
    started = first.post(
        "/api/runs",
        {"recipe": "workspace:recipes/toy-lora.yaml", "overrides": overrides, "name": "long"},
    )
    folder = started["folder"]

    def stepping(s):
        runs = {r["folder"]: r for r in s.get("/api/runs")}
        run = runs.get(folder)
        return run if run and run["status"] == "running" and run["step"] >= 1 else None

    before = wait_until(lambda: stepping(first), what="the first steps")
    first.kill()
    second = server()
    again = wait_until(lambda: stepping(second), what="the run, seen by the new server")
    assert again["job"] == before["job"]
    # the new server streams the run live: steps written after it started arrive
    steps_so_far = again["step"]
    events = read_events(second.url, folder, want=again["step"] + 5)
    assert max(e["step"] for e in events if e["event"] == "step") > steps_so_far
    assert second.post("/api/run/stop", {"folder": folder})["status"] == "stopping"
    stopped = wait_until(
        lambda: (r := second.get(f"/api/run?folder={folder}"))["status"] == "stopped" and r,
        what="the stop",
    )
    assert stopped["step"] < 400
    second.post("/api/run/resume", {"folder": folder})
    resumed = wait_until(
        lambda: (r := second.get(f"/api/run?folder={folder}"))["step"] > stopped["step"] and r,
        what="the resumed run's steps",
    )
    assert resumed["status"] == "running" and resumed["job"] == before["job"]
    second.post("/api/run/stop", {"folder": folder})
    wait_until(lambda: second.get(f"/api/run?folder={folder}")["status"] == "stopped", what="stop")
