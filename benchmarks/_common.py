"""Shared by the benchmark scripts: timing and writing results as JSON + a markdown table."""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    from difflab.precision import cpu_name

    info = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def best_time(
    fn: Callable[[], object], repeats: int = 3, warmup: int = 1, clock: Callable[[], float] = time.perf_counter
) -> float:
    """Minimum time of `fn` over `repeats` runs after `warmup` runs (seconds). Wall time by default;
    `clock=time.process_time` gives CPU time, which barely moves when other jobs share the cores."""

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        sync()
        times.append(clock() - t0)
    return min(times)


def write_results(
    name: str, header: Sequence[str], rows: Sequence[Sequence[object]], notes: str = "", extra: dict | None = None
) -> Path:
    """Write `results/<name>.json` and `results/<name>.md` (a markdown table) and print the table."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": name,
        "machine": machine(),
        "header": list(header),
        "rows": [list(r) for r in rows],
        "notes": notes,
        **(extra or {}),
    }
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")

    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    m = machine()
    device = m["gpu"] + " (GPU)" if "gpu" in m else "no GPU"
    lines = [
        f"### {name}",
        "",
        f"Machine: {m['cpu']}, {m['threads']} threads, {device}, torch {m['torch']}.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    if notes:
        lines += ["", notes]
    text = "\n".join(lines) + "\n"
    (RESULTS / f"{name}.md").write_text(text)
    print(text)
    return RESULTS / f"{name}.json"
