"""Run every benchmark script, then gather their markdown tables into results/README.md."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ["digits.py", "ddim.py", "clip.py", "personalize.py"]


def main() -> int:
    failed = []
    for script in SCRIPTS + [a for a in sys.argv[1:] if a.endswith(".py")]:
        if not (HERE / script).is_file():
            continue
        print(f"== {script}", flush=True)
        if subprocess.call([sys.executable, str(HERE / script)]) != 0:
            failed.append(script)
    tables = sorted((HERE / "results").glob("*.md"))
    body = "\n".join(p.read_text() for p in tables if p.name != "README.md")
    (HERE / "results" / "README.md").write_text("# Benchmark results\n\nWritten by `make bench`.\n\n" + body)
    if failed:
        print("failed:", ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
