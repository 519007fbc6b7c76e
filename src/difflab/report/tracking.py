"""Experiment trackers through accelerate, as diffusers' training scripts use them (`--report-to`): scalars,
validation images and the run's configuration go to TensorBoard, Weights & Biases or trackio. All write locally
first: TensorBoard and trackio into `<out>/logs`, W&B in offline mode unless an API key is set."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from difflab.utils import DifflabError

TRACKERS = ("tensorboard", "wandb", "trackio")
REPORT_TO = ("none", *TRACKERS, "all")
REPORT_TO_HELP = "Trackers for loss, learning rate, gradient norm, step time and validation images: " + ", ".join(
    REPORT_TO
)
_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}


def trackers(report_to: str) -> list[str]:
    """The trackers `--report-to` names, each checked to be installed (a one-line error names the extra)."""
    if report_to not in REPORT_TO:
        raise DifflabError(f"--report-to {report_to!r}: choose one of {', '.join(REPORT_TO)}")
    names = list(TRACKERS) if report_to == "all" else [] if report_to == "none" else [report_to]
    import importlib.util

    missing = [n for n in names if importlib.util.find_spec(_MODULES[n]) is None]
    if missing:
        raise DifflabError(
            f"--report-to {report_to}: {', '.join(missing)} is not installed; pip install 'difflab[track]'"
        )
    if "wandb" in names and not os.environ.get("WANDB_API_KEY") and not os.environ.get("WANDB_MODE"):
        os.environ["WANDB_MODE"] = "offline"
        print("W&B: no API key, so the run is logged offline (`wandb sync` uploads it later)", flush=True)
    return names


def accelerator_kwargs(report_to: str, out_dir: str | os.PathLike) -> dict:
    """What `Accelerator(...)` needs to log to those trackers, under `<out_dir>/logs`."""
    names = trackers(report_to)
    return {"log_with": names, "project_dir": str(Path(out_dir) / "logs")} if names else {}


def flat_config(config: dict, prefix: str = "") -> dict:
    """A nested config as the flat str/number/bool mapping trackers accept."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


def log_images(accelerator, name: str, image: np.ndarray, step: int) -> None:
    """One uint8 (H, W, 3) image (a grid) to every tracker that takes images."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({name: image[None]}, step=step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({name: wandb.Image(image)}, step=step)
        elif tracker.name == "trackio":
            import trackio

            tracker.log({name: trackio.Image(image)}, step=step)


@contextmanager
def tracked(
    report_to: str, out_dir: str | os.PathLike, project: str, config: dict, cpu: bool
) -> Iterator[Callable[[dict, int], None] | None]:
    """`accelerator.log` of a tracked run (None when `report_to` is "none"), its config logged, ended on exit."""
    kwargs = accelerator_kwargs(report_to, out_dir)
    if not kwargs:
        yield None
        return
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=cpu, **kwargs)
    accelerator.init_trackers(project, flat_config(config))
    try:
        yield accelerator.log
    finally:
        accelerator.end_training()


def log_final_metrics(report_to: str, out_dir: str | os.PathLike, project: str, metrics: dict, step: int, cpu: bool):
    """Metrics measured after training (an evaluation) into the same trackers and run as the training's."""
    with tracked(report_to, out_dir, project, {}, cpu) as log:
        if log is not None:
            log(metrics, step)
