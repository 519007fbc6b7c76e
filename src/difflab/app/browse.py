"""Driving the app's page in the system's headless Chromium (Playwright, told where the browser is: it cannot
download its own here), for the browser test and the README's screenshots."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

# Per tab, its buttons in order: (an image input to fill first or None, the button, the note that fills in when the
# answer is on the page, a word of that answer).
TABS = {
    "Digits": [(None, "digits-go", "digits-note", "judge reads")],
    "DDIM": [(None, "ddim-go", "ddim-note", "lerp"), ("ddim-image", "invert-go", "invert-note", "MSE")],
    "CLIP": [("clip-image", "clip-go", "clip-note", "classes")],
    "Personalize": [
        (None, "personalize-go", "personalize-note", "Text score"),
        (None, "compose-go", "compose-note", "naive"),
    ],
}


def system_browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


def launch(playwright):
    return playwright.chromium.launch(executable_path=system_browser(), args=["--no-sandbox", "--disable-gpu"])


def click_through(page, url: str, image: str, width: int = 1280, shots: Path | None = None) -> dict[str, float]:
    """Open every tab at `width` px, press its buttons (uploading `image` where one is needed) and wait for each
    answer; with `shots`, a full-page screenshot per tab. Returns the seconds from each click to its answer."""
    from playwright.sync_api import expect

    page.set_viewport_size({"width": width, "height": 1000})
    page.goto(url)
    page.locator("#digits-go").wait_for()
    seconds = {}
    for tab, steps in TABS.items():
        open_tab(page, tab)
        for upload, button, note, answer in steps:
            if upload is not None:
                page.locator(f"#{upload} input[type=file]").set_input_files(image)
                page.locator(f"#{upload} img").first.wait_for()
            start = time.perf_counter()
            page.locator(f"#{button}").click()
            expect(page.locator(f"#{note}")).to_contain_text(answer, timeout=120_000)
            seconds[button.removesuffix("-go")] = time.perf_counter() - start  # the note comes with the images
        if shots is not None:
            page.wait_for_function("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
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
