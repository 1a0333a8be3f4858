"""A real headless browser for console tests: Playwright driving Debian's chromium.

No `playwright install`: the browser is the system's ``/usr/bin/chromium`` (``.ci/run``
installs it). Without it the browser tests are skipped, unless
``CALLBRIDGE_REQUIRE_BROWSER`` is set (CI sets it), where they fail instead.

Screenshots go to the test's temporary directory, or to ``CALLBRIDGE_SCREENSHOT_DIR``
when set (``CALLBRIDGE_SCREENSHOT_DIR=docs/img`` refreshes the README's pictures).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from playwright.async_api import Browser, ConsoleMessage, Dialog, Page, async_playwright, expect

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
VIEWPORT = {"width": 1280, "height": 800}


def require_chromium() -> None:
    """Skip the test without the browser (fail instead under CALLBRIDGE_REQUIRE_BROWSER)."""
    if not Path(CHROMIUM).exists():
        why = f"{CHROMIUM} not installed (apt-get install chromium)"
        if os.environ.get("CALLBRIDGE_REQUIRE_BROWSER"):
            pytest.fail(why)
        pytest.skip(why)


async def launch() -> AsyncIterator[Browser]:
    """The browser for one test (an async generator for a fixture)."""
    require_chromium()
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


@dataclass
class Watched:
    """A page plus what it said: dialogs opened, script errors, console errors (CSP too)."""

    page: Page
    dialogs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def assert_clean(self) -> None:
        assert not self.dialogs, f"dialogs opened: {self.dialogs}"
        assert not self.errors, f"page errors: {self.errors}"


async def watched_page(browser: Browser) -> Watched:
    page = await browser.new_page(viewport=VIEWPORT)  # type: ignore[arg-type]
    w = Watched(page)

    async def on_dialog(dialog: Dialog) -> None:
        w.dialogs.append(f"{dialog.type}: {dialog.message}")
        await dialog.dismiss()

    def on_console(msg: ConsoleMessage) -> None:
        if msg.type == "error":
            w.errors.append(msg.text)

    page.on("dialog", on_dialog)
    page.on("console", on_console)
    page.on("pageerror", lambda exc: w.errors.append(str(exc)))
    return w


async def sign_in(page: Page, base_url: str, token: str, route: str = "") -> None:
    """Open the console and give it the token, as an operator does."""
    await page.goto(f"{base_url}/ui/{route}")
    await page.get_by_label("Admin token").fill(token)
    await page.get_by_role("button", name="Open the console").click()
    await expect(page.locator("#shell")).to_be_visible()


def screenshot_dir(tmp_path: Path) -> Path:
    target = os.environ.get("CALLBRIDGE_SCREENSHOT_DIR")
    path = Path(target) if target else tmp_path
    path.mkdir(parents=True, exist_ok=True)
    return path


async def screenshot(page: Page, tmp_path: Path, view: str) -> Path:
    """Save ``console-<view>.png`` of the whole page."""
    path = screenshot_dir(tmp_path) / f"console-{view}.png"
    await page.screenshot(path=str(path), full_page=True)
    return path
