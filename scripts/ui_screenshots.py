"""The README's screenshots of the web app: the browser test's walk through every page, with a
screenshot of each, on a fresh temporary workspace.

    .venv/bin/python scripts/ui_screenshots.py [--out scripts/ui_screenshots]

Needs Debian's chromium (apt-get install chromium). Takes a few minutes on a CPU: it trains
the toy recipe's 20 steps and generates one image, as the test does.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "ui"))
from browser_flow import find_chromium, launch, walk_every_page  # noqa: E402
from ui_server import Server  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(HERE / "ui_screenshots"))
    args = parser.parse_args()
    executable = find_chromium()
    if executable is None:
        print("no chromium found: apt-get install chromium", file=sys.stderr)
        return 2
    from playwright.sync_api import sync_playwright

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(Path(tmp) / "outputs").start()
        try:
            with sync_playwright() as playwright:
                browser = launch(playwright, executable)
                page = browser.new_page(viewport={"width": 1400, "height": 900})

                def shot(name: str) -> None:
                    path = out / f"{name}.png"
                    page.evaluate("document.activeElement && document.activeElement.blur()")
                    page.evaluate("window.scrollTo(0, 0)")
                    page.screenshot(path=str(path))
                    print(path)

                walk_every_page(page, server.url, server.workspace, shot)
                browser.close()
        finally:
            server.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
