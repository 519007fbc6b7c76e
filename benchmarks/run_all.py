"""Run every benchmark script, then gather their markdown tables into results/README.md."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Every script here but the shared helpers; each writes results/<name>.json and results/<name>.md.
SCRIPTS = sorted(p.name for p in HERE.glob("*.py") if not p.name.startswith("_") and p.name != "run_all.py")


def main() -> int:
    failed = []
    for script in sys.argv[1:] or SCRIPTS:
        print(f"== {script}", flush=True)
        if subprocess.call([sys.executable, str(HERE / script)]) != 0:
            failed.append(script)
    # Names starting with "." are scratch runs (`--name .x`, ignored by git): they stay out of the gathered tables.
    tables = sorted(p for p in (HERE / "results").glob("*.md") if not p.name.startswith("."))
    body = "\n".join(p.read_text() for p in tables if p.name != "README.md")
    (HERE / "results" / "README.md").write_text("# Benchmark results\n\nWritten by `make bench`.\n\n" + body)
    if failed:
        print("failed:", ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
