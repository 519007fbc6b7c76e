"""Driving the app's page in the system's headless Chromium (Playwright, told where the browser is: it cannot
download its own here), for the browser test and the README's screenshots."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

# Per tab: its button and the note that fills in when the answer is on the page.
TABS = {
    "Digits": ("digits-go", "digits-note", "judge reads"),
    "DDIM": ("ddim-go", "ddim-note", "lerp"),
    "CLIP": ("clip-go", "clip-note", "classes"),
    "Personalize": ("personalize-go", "personalize-note", "Text score"),
}


def system_browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


def launch(playwright):
    return playwright.chromium.launch(executable_path=system_browser(), args=["--no-sandbox", "--disable-gpu"])


def click_through(page, url: str, image: str, width: int = 1280, shots: Path | None = None) -> dict[str, float]:
    """Open every tab at `width` px, give the CLIP tab `image`, press the tab's button and wait for its answer;
    with `shots`, a full-page screenshot per tab. Returns the seconds from the click to the answer, per tab."""
    from playwright.sync_api import expect

    page.set_viewport_size({"width": width, "height": 1000})
    page.goto(url)
    page.locator("#digits-go").wait_for()
    seconds = {}
    for tab, (button, note, answer) in TABS.items():
        open_tab(page, tab)
        if tab == "CLIP":
            page.locator("#clip-image input[type=file]").set_input_files(image)
            page.locator("#clip-image img").first.wait_for()
        start = time.perf_counter()
        page.locator(f"#{button}").click()
        expect(page.locator(f"#{note}")).to_contain_text(answer, timeout=120_000)
        seconds[tab] = time.perf_counter() - start  # the note comes in the same update as the images
        if shots is not None:
            page.screenshot(path=str(shots / f"app_{tab.lower()}_{width}.png"), full_page=True)
    return seconds


def open_tab(page, name: str) -> None:
    """Click a tab; on a narrow screen gradio moves the last tabs into a "More tabs" menu."""
    tab = page.get_by_role("tab", name=name, exact=True)
    if tab.count() and tab.is_visible():
        tab.click()
        return
    page.get_by_label("More tabs").click()
    page.locator(".overflow-dropdown button", has_text=name).click()
