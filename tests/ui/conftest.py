"""Fixtures of the dashboard tests: headless Chromium (Debian's `chromium` package driven by
Playwright through `executable_path`; no browser download), a folder for screenshots
(`test-artifacts/ui/`, git-ignored), and the servers the pages are read from."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.worker.helpers import ROOT

CHROMIUM = os.environ.get("DIGIN_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]  # fmt: skip
ARTIFACTS = ROOT / "test-artifacts" / "ui"
PAGE_TIMEOUT_MS = 30_000  # a page or element that does not come is a failure, not a hang
JOB_TIMEOUT_MS = 240_000  # a digits job on a busy 2-core machine


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One Chromium per test file. Playwright's sync API keeps its event loop running in this
    thread while it is open, so it is closed at the end of each file: a later file in the same
    process (`pytest -n 2` hands out whole files) may call `asyncio.run`."""
    if shutil.which(CHROMIUM) is None and not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is a dev dependency")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh browser context (no cookies) and page; console errors fail the test."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(PAGE_TIMEOUT_MS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        yield page
    finally:
        context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def screenshot(page: Any, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def natural_widths(page: Any, selector: str = "main img") -> list[int]:
    """naturalWidth of every image matching `selector`, once each has loaded or failed."""
    page.wait_for_function(
        "sel => Array.from(document.querySelectorAll(sel)).every(i => i.complete)", arg=selector
    )
    return page.eval_on_selector_all(selector, "els => els.map(e => e.naturalWidth)")
