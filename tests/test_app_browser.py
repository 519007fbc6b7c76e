"""The app's page driven in headless Chromium (the system's browser): each tab's button gives an answer with its
images. `make test-browser` runs it; it is skipped, saying why, when no browser or no Playwright is installed."""

import pytest

from difflab.app.browse import click_through, launch, system_browser

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def browser():
    if system_browser() is None:
        pytest.skip("no Chromium installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (make test-browser)")
    with sync_api.sync_playwright() as playwright:
        browser = launch(playwright)
        yield browser
        browser.close()


@pytest.mark.parametrize("width", [1280, 390])
def test_every_tab_answers_in_the_browser(browser, tiny_app, tmp_path, random_images, width):
    image = tmp_path / "upload.png"
    random_images(1)[0].convert("RGB").save(image)
    page = browser.new_page()
    seconds = click_through(page, tiny_app.url, str(image), width, shots=tmp_path)
    assert set(seconds) == {"digits", "ddim", "invert", "clip", "personalize", "compose"}
    for tab in ("digits", "ddim", "clip", "personalize"):
        assert (tmp_path / f"app_{tab}_{width}.png").stat().st_size > 10_000
    page.close()
