"""One walk through every page of the app in a real browser, as a user would: shared by the
browser test and by scripts/ui_screenshots.py (which keeps a screenshot of each page)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

DATASET = "datasets/toy-rings"


def find_chromium() -> str | None:
    """Debian's chromium (apt-get install chromium), or SDTUNE_CHROMIUM."""
    for candidate in (os.environ.get("SDTUNE_CHROMIUM"), "chromium", "chromium-browser"):
        if candidate and (
            path := shutil.which(candidate) or (Path(candidate).is_file() and candidate)
        ):
            return str(path)
    return None


def launch(playwright, executable: str):
    return playwright.chromium.launch(
        executable_path=executable,
        args=[
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
        ],
    )


def walk_every_page(page, url: str, workspace: Path, shot: Callable[[str], None]) -> None:
    page.set_default_timeout(60_000)
    page.goto(f"{url}/#dataset")
    # Dataset: the sample set, a caption edited in place and saved to its sidecar
    page.click("#ds-sample")
    page.wait_for_selector(".ds-item >> nth=15")
    card = page.locator(".ds-item").first
    name = card.get_attribute("data-path")
    card.locator("textarea").fill("sks, a ring edited in the browser")
    card.locator("textarea").press("Tab")
    card.locator(".saved", has_text="saved").wait_for()
    sidecar = (workspace / DATASET / name).with_suffix(".txt")
    assert sidecar.read_text(encoding="utf-8").strip() == "sks, a ring edited in the browser"
    page.fill("#ds-res", "64")
    page.click("#ds-buckets")
    page.wait_for_selector(".ds-item .crop")
    shot("dataset")

    # New run: the toy recipe's form, a bad value reported as typed, then a 20-step run
    page.click("nav a[data-page=newrun]")
    page.wait_for_selector(
        '#nr-recipe option[value="workspace:recipes/toy-lora.yaml"]', state="attached"
    )
    page.select_option("#nr-recipe", "workspace:recipes/toy-lora.yaml")
    page.fill("#nr-name", "browser-run")
    rank = page.locator('[data-key="lora.rank"]')
    rank.fill("0")
    page.wait_for_selector(".field.bad >> text=lora.rank")
    rank.fill("8")
    page.wait_for_function("!document.querySelector('.field.bad')")
    page.wait_for_function(
        "document.querySelector('#nr-command').textContent.includes('runs/browser-run')"
    )
    page.wait_for_function(
        "!document.querySelector('#nr-estimate').textContent.includes('…')", timeout=120_000
    )
    shot("new-run")
    page.click("#nr-start")

    # Runs: live loss chart, stop (a checkpoint first), resume, the sample grid, finished
    page.wait_for_selector("#run-status.running", timeout=120_000)
    page.wait_for_function(
        "Number(document.querySelector('#chart-loss').dataset.points) >= 1", timeout=120_000
    )
    page.click("#run-stop")
    page.wait_for_selector("#run-status.stopped", timeout=120_000)
    page.click("#run-resume")
    page.wait_for_selector("#run-status.finished", timeout=240_000)
    page.wait_for_selector("#run-samples img")
    page.wait_for_function("Number(document.querySelector('#chart-loss').dataset.points) >= 20")
    shot("runs")

    # Results: the adapter's summary and card; "try it" opens Generate with the adapter
    page.click("#run-open-result")
    page.wait_for_function("document.querySelector('#res-summary').textContent.length > 20")
    shot("results")
    page.click("#res-try")
    page.wait_for_selector('[data-key="lora"]')
    assert "runs/browser-run" in page.input_value('[data-key="lora"]')
    page.fill('[data-key="prompt"]', "a photo of a red sks ring on a white background")
    page.fill('[data-key="steps"]', "4")
    page.click("#gen-start")
    page.wait_for_selector(".gal-item img", timeout=180_000)
    parameters = page.inner_text(".gal-item pre")
    assert "a red sks ring" in parameters and "Steps: 4" in parameters

    # Inpaint with the mask brush: an input image, a stroke across it, one image repainted
    page.select_option('[data-key="mode"]', "inpaint")
    page.set_input_files("#gen-image-file", str(workspace / DATASET / name))
    page.wait_for_selector("#gen-mask[data-ready]")
    page.locator("#gen-mask").scroll_into_view_if_needed()
    box = page.locator("#gen-mask").bounding_box()
    page.mouse.move(box["x"] + 5, box["y"] + box["height"] / 2)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] - 5, box["y"] + box["height"] / 2, steps=8)
    page.mouse.up()
    page.wait_for_function("window.sdtuneMaskPath && window.sdtuneMaskPath()")
    page.click("#gen-start")
    page.wait_for_selector(".gal-item >> nth=1", timeout=180_000)
    newest = page.inner_text(".gal-item pre")
    assert "Mode: inpaint" in newest and "Mask: " in newest
    shot("generate")
