"""Screenshots of every tab of `difflab app` on the embedded defaults, at 1280 px and a phone's 390 px, for the README
(docs/app/), and the seconds from each button's click to its answer, twice (the first loads the models), into
benchmarks/results/app_response_times.json.

    .venv/bin/python scripts/app_screenshots.py            # needs `make demo`, the [app,browser] extras, chromium
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import torch

from difflab.app.browse import click_through, launch, system_browser
from difflab.app.models import AppConfig
from difflab.app.ui import example_digits, serve

OUT = Path("docs/app")


def cpu() -> str:
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def main() -> None:
    from playwright.sync_api import sync_playwright

    if system_browser() is None:
        sys.exit("no Chromium: apt-get install chromium")
    OUT.mkdir(parents=True, exist_ok=True)
    example = example_digits(1)[0]  # a held-out digit, uploaded to the CLIP tab and inverted in the DDIM tab
    app, url = serve(AppConfig(), 7861, block=False)
    timings = {}
    with sync_playwright() as playwright:
        browser = launch(playwright)
        for attempt, width in (("first (loads the models)", 1280), ("again", 1280), ("phone", 390)):
            page = browser.new_page()
            timings[f"{attempt}, {width} px"] = click_through(page, url, example, width, shots=OUT)
            page.close()
        browser.close()
    app.close()
    machine = f"{cpu()}, {torch.get_num_threads()} threads"
    Path("benchmarks/results/app_response_times.json").write_text(
        json.dumps({"machine": machine, "seconds": timings}, indent=2) + "\n"
    )
    print(machine)
    for run, seconds in timings.items():
        print(run, {tab: round(s, 2) for tab, s in seconds.items()})


if __name__ == "__main__":
    main()
