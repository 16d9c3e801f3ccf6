"""The app in headless Chromium, page by page: edit a caption and see the file change, start a
20-step run on the toy base, watch its loss chart and samples, stop and resume it, open its
result and generate an image with it. A failure saves a screenshot under test-artifacts/."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from browser_flow import find_chromium, launch, walk_every_page

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


def test_every_page_in_a_real_browser(server, workspace):
    executable = find_chromium()
    if executable is None:
        if os.environ.get("SDTUNE_REQUIRE_BROWSER") == "1":
            pytest.fail("no chromium found; apt-get install chromium (or set SDTUNE_CHROMIUM)")
        pytest.skip("no chromium (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    running = server()
    with sync_playwright() as playwright:
        browser = launch(playwright, executable)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        try:
            walk_every_page(page, running.url, workspace, shot=lambda name: None)
        except Exception:
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "browser-failure.png"), full_page=True)
            print(
                f"screenshot: {ARTIFACTS / 'browser-failure.png'}; notice: {page.inner_text('#notice')}"
            )
            raise
        finally:
            browser.close()
        assert errors == []
