"""Driving the OHIF Viewer (v3.13) in headless Chromium from the tests: what a radiologist would click, and
what the page then shows. Debian's ``chromium`` through Playwright (no browser download)."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [  # a closed network: no background connections; software GL (SwiftShader)
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
]
ERROR_TEXTS = ("Something went wrong", "Error boundary", "Failed to load")


@dataclass
class OhifPage:
    """One browser page on the viewer; ``console`` and ``errors`` collect what the page logged."""

    page: object
    shots: Path
    console: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def open(self, url: str, timeout_ms: int = 120_000) -> None:
        """Open ``url`` and wait until the first image is drawn (OHIF logs ``studyToFirstImage``)."""
        with self.page.expect_console_message(lambda m: "studyToFirstImage" in m.text, timeout=timeout_ms):
            self.page.goto(url)
        self.skip_tour()

    def skip_tour(self) -> None:
        skip = self.page.get_by_text("Skip all")
        if skip.count():
            skip.first.click()

    def thumbnails(self, modality: str):
        """The study browser's series of ``modality`` (thumbnails and list items), in their order."""
        return self.page.get_by_text(modality, exact=True)

    def open_series(self, modality: str, index: int = 0, settle_ms: int = 5000) -> None:
        self.thumbnails(modality).nth(index).dblclick()
        self.page.wait_for_timeout(settle_ms)

    def answer(self, question: str, button: str, timeout_ms: int = 30_000) -> None:
        """Wait for a prompt with ``question`` and press ``button``."""
        self.page.get_by_text(question).first.wait_for(timeout=timeout_ms)
        self.page.get_by_role("button", name=button).first.click()

    def viewport_text(self) -> str:
        return self.page.locator("[data-cy=viewport-grid]").inner_text()

    def next_measurement(self, settle_ms: int = 2500) -> None:
        """The SR viewport's ">" (next measurement group)."""
        self.page.locator("[data-cy=viewport-grid] div.cursor-pointer:has(svg.rotate-180)").first.click()
        self.page.wait_for_timeout(settle_ms)

    def open_panel(self, data_cy: str, settle_ms: int = 1500) -> str:
        """Open a right-hand panel by its button (e.g. ``panelSegmentation-btn``); the panel's text."""
        self.page.locator(f"[data-cy={data_cy}]").first.click()
        self.page.wait_for_timeout(settle_ms)
        return self.page.locator("[data-cy=side-panel-header-right]").locator("xpath=../..").inner_text()

    def screenshot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path))
        return path

    def visible_errors(self) -> list[str]:
        """Error toasts or boundaries on the page now, and the page errors logged so far."""
        body = self.page.inner_text("body")
        return [t for t in ERROR_TEXTS if t in body] + list(self.errors)


@contextlib.contextmanager
def ohif_page(shots: Path, width: int = 1600, height: int = 1000) -> Iterator[OhifPage]:
    from playwright.sync_api import sync_playwright

    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            view = OhifPage(page, shots)
            page.on("console", lambda m: view.console.append(f"{m.type}: {m.text}"))
            page.on("pageerror", lambda e: view.errors.append(f"page error: {e}"))
            yield view
        finally:
            (shots / "console.txt").write_text("\n".join(view.console if "view" in locals() else []))
            browser.close()
