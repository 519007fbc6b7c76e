"""The personalization demo as a benchmark: build the miniature SD + CLIP stack (fixed work), run jobs 3 and 4 on
it, and tabulate the time of every stage and every measured effect against its goal.

    python benchmarks/personalize_demo.py                       # build + demo under runs/bench-personalize
    python benchmarks/personalize_demo.py --unet-steps 3000     # the same with a longer-trained UNet
    python benchmarks/personalize_demo.py --vae-edge-weight 3   # the VAE with its edge term
    python benchmarks/personalize_demo.py --from-run STACK DEMO # tabulate an earlier build and demo only
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

from _common import write_results
from difflab.demos.personalize_report import effect_rows


def run(out: Path, unet_steps: int | None, vae_edge_weight: float | None) -> tuple[Path, Path]:
    from difflab.demos.personalize import PersonalizeDemoConfig, run_demo
    from difflab.minisd.build import BuildConfig, build

    shutil.rmtree(out, ignore_errors=True)
    cfg = BuildConfig(out=str(out / "minisd"))
    if unet_steps:
        cfg.train.unet.steps = unet_steps
    if vae_edge_weight is not None:
        cfg.train.edge_weight = vae_edge_weight
    build(cfg)
    run_demo(PersonalizeDemoConfig(out=str(out / "demo"), stack=str(out / "minisd")))
    return out / "minisd", out / "demo"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-personalize"))
    parser.add_argument("--unet-steps", type=int, default=None)
    parser.add_argument("--vae-edge-weight", type=float, default=None)
    parser.add_argument("--from-run", nargs=2, type=Path, metavar=("STACK", "DEMO"))
    parser.add_argument("--name", default="personalize_demo")
    parser.add_argument("--note", default="", help="Appended to the table's notes (e.g. how the run was made).")
    args = parser.parse_args()
    stack, demo = args.from_run or run(args.out, args.unet_steps, args.vae_edge_weight)
    build_log = json.loads((stack / "build.json").read_text())
    metrics = json.loads((demo / "metrics.json").read_text())
    # A resumed build may have run its stages on different machines: each stage names its own.
    rows = [[f"build: {k}", f"{v['seconds']:.0f} s", v.get("machine", ""), ""] for k, v in build_log["stages"].items()]
    rows += [[f"demo: {k}", f"{v:.0f} s", "", ""] for k, v in metrics["seconds"].items() if k != "mini stack"]
    rows += effect_rows(metrics)
    sd_config = build_log["stages"]["sd"].get("config", build_log["config"])
    unet, channels = sd_config["train"]["unet"], sd_config["model"]["unet_channels"]
    build_s = sum(v["seconds"] for v in build_log["stages"].values())
    demo_s = sum(v for k, v in metrics["seconds"].items() if k != "mini stack")
    edge = build_log["config"]["train"].get("edge_weight", 0.0)
    notes = f"UNet {tuple(channels)} channels, {unet['steps']} steps of batch {unet['batch_size']}; "
    notes += f"VAE edge weight {edge}; build {build_s:.0f} s, "
    captions = "the references' own captions" if metrics["config"].get("ti_captions") else "the style templates"
    notes += f"personalization {demo_s:.0f} s; textual inversion on {captions}. {args.note}".rstrip()
    # Tokens in backticks: a bare <new1> is an HTML tag to a markdown renderer.
    rows = [[re.sub(r"(<[^<>\s]+>)", r"`\1`", str(v)) for v in row] for row in rows]
    write_results(
        args.name,
        ["stage or effect", "measured", "goal (build: machine)", "met / gain"],
        rows,
        notes,
        {"build": build_log["stages"], "metrics": metrics},
    )


if __name__ == "__main__":
    main()
