"""What the web app costs: the Dataset page of a 1,000-image folder, and an idle server's CPU.

    .venv/bin/python scripts/bench_ui.py [--images 1000] [--idle-seconds 10]

Starts a real `sdtune ui` on a temporary workspace holding a folder of --images random PNGs
with captions, then measures:
- the Dataset page in headless Chromium (when `chromium` is installed): from navigation until
  every card is on the page and the thumbnails in view have loaded, with a cold thumbnail cache
  (the first visit makes them) and warm (a second visit); the ratio cold/warm;
- the same requests over plain HTTP (the listing, then every thumbnail), cold and warm;
- the server's CPU time over --idle-seconds with no page open, and with one page following a
  finished run's event stream: CPU seconds per wall second (0.01 = 1% of one core).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_dataset_page import make_folder  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=120) as response:
        return response.read()


def http_pass(url: str, folder: str) -> tuple[float, float, int]:
    start = time.perf_counter()
    view = json.loads(get(f"{url}/api/dataset?dir={folder}"))
    listed = time.perf_counter() - start
    for item in view["items"]:
        get(f"{url}/api/thumb?path={folder}/{item['path']}")
    return listed, time.perf_counter() - start, len(view["items"])


def browser_pass(page, url: str, count: int) -> float:
    start = time.perf_counter()
    page.goto(f"{url}/#dataset")
    page.wait_for_function(f"document.querySelectorAll('.ds-item').length >= {count}")
    page.wait_for_function(
        """() => [...document.querySelectorAll('.ds-item img')].filter((img) => {
             const r = img.getBoundingClientRect();
             return r.top < innerHeight && r.bottom > 0;
           }).every((img) => img.complete && img.naturalWidth > 0)"""
    )
    return time.perf_counter() - start


def idle_load(pid: int, seconds: float) -> float:
    before, start = cpu_seconds(pid), time.perf_counter()
    time.sleep(seconds)
    return (cpu_seconds(pid) - before) / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--side", type=int, default=256)
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ws = Path(tmp) / "ws"
        folder = "datasets/many"
        (ws / folder).mkdir(parents=True)
        make_folder(ws / folder, args.images, args.side)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = subprocess.Popen(
            [sys.executable, "-m", "sdtune", "ui", "--workspace", str(ws), "--port", str(port)],
            stdout=subprocess.DEVNULL,
        )
        try:
            for _ in range(600):
                try:
                    get(f"{url}/api/info")
                    break
                except OSError:
                    time.sleep(0.1)
            print(f"{args.images} images of {args.side // 2}-{args.side} px, sdtune ui on {url}")
            run_browser_or_http(url, folder, args.images)
            quiet = idle_load(server.pid, args.idle_seconds)
            print(f"idle, no page open: {quiet:.4f} CPU s per s ({100 * quiet:.2f}% of a core)")
            follow = following_load(url, ws, server.pid, args.idle_seconds)
            print(
                f"idle, one page following a finished run: {follow:.4f} CPU s per s "
                f"({100 * follow:.2f}% of a core)"
            )
        finally:
            server.terminate()
            server.wait()
    return 0


def run_browser_or_http(url: str, folder: str, count: int) -> None:
    sys.path.insert(0, str(Path(__file__).parents[1] / "tests" / "ui"))
    from browser_flow import find_chromium, launch

    executable = find_chromium()
    if executable is None:
        print("no chromium: the browser timing is left out (apt-get install chromium)")
        listed, cold, n = http_pass(url, folder)
        _, warm, _ = http_pass(url, folder)
        print(
            f"HTTP: listing {listed:.3f} s; listing + {n} thumbnails cold {cold:.2f} s, warm {warm:.2f} s"
        )
        return
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = launch(playwright, executable)
        times = []
        for _ in ("cold", "warm"):  # a fresh browser profile each time: only the server warms
            context = browser.new_context(viewport={"width": 1400, "height": 1000})
            times.append(browser_pass(context.new_page(), url, count))
            context.close()
        browser.close()
    cold, warm = times
    print(
        f"browser, Dataset page until {count} cards and the thumbnails in view: "
        f"cold cache {cold:.2f} s, warm {warm:.2f} s (cold/warm {cold / warm:.1f}x)"
    )
    listed, total, n = http_pass(url, folder)
    print(f"HTTP, warm: listing {listed:.3f} s; listing + all {n} thumbnails {total:.2f} s")


def following_load(url: str, ws: Path, pid: int, seconds: float) -> float:
    """CPU while one client holds an events stream open on a finished run of the workspace."""
    run = ws / "runs" / "done"
    run.mkdir(parents=True)
    (run / "events.jsonl").write_text(
        json.dumps({"event": "finished", "step": 1, "time": 0}) + "\n"
    )
    stop = threading.Event()

    def follow():
        with urllib.request.urlopen(
            f"{url}/api/run/events?folder=runs/done", timeout=seconds + 30
        ) as s:
            while not stop.is_set():
                s.readline()

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    time.sleep(1.0)
    load = idle_load(pid, seconds)
    stop.set()
    return load


if __name__ == "__main__":
    sys.exit(main())
