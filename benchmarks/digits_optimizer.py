"""What Muon costs beside AdamW in a digits training step: FLOPs by torch's FLOP counter (forward + backward, and the
optimiser step, whose Newton-Schulz iterations are matmuls), the steps that fit 45 TFLOP, and the wall time of a
step (fp32 and bf16 autocast, the optimiser alone), all measured in one run on this machine.

    python benchmarks/digits_optimizer.py [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import best_time, write_results  # noqa: E402
from difflab.digits.sample import make_conds  # noqa: E402
from difflab.digits.train import OPTIMIZERS, TrainConfig, make_optimizer, step_flops  # noqa: E402
from difflab.nets.digits_unet import DigitsUNet  # noqa: E402

STEPS_TIMED = 10


def timings(cfg: TrainConfig) -> tuple[float, float, float]:
    """Seconds per training step in fp32 and in bf16 autocast, and per optimiser step alone."""
    torch.manual_seed(0)
    net = DigitsUNet(cfg.net_config())
    opt, schedule = make_optimizer(net, cfg), cfg.schedule.build()
    x0 = torch.rand(cfg.batch_size, 3, 28, 28) * 2 - 1
    cond = make_conds([0] * cfg.batch_size, [i % 10 for i in range(cfg.batch_size)])

    def steps(bf16: bool) -> None:
        for _ in range(STEPS_TIMED):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = schedule.training_loss(lambda x, t: net(x, t, cond), x0)
            opt.zero_grad()
            loss.backward()
            opt.step()

    def optimiser_steps() -> None:
        for _ in range(STEPS_TIMED):
            opt.step()

    fp32, bf16 = best_time(lambda: steps(False)), best_time(lambda: steps(True))
    return fp32 / STEPS_TIMED, bf16 / STEPS_TIMED, best_time(optimiser_steps) / STEPS_TIMED


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base, rows = TrainConfig("unused", "unused"), []
    forward_backward = step_flops(replace(base, optimizer="adamw"))
    for name in OPTIMIZERS:
        cfg = replace(base, optimizer=name)
        flops = step_flops(cfg)
        fp32, bf16, opt_only = timings(cfg)
        rows.append([
            name, cfg.batch_size, round(forward_backward / 1e9, 2), round((flops - forward_backward) / 1e9, 2),
            int(45e12 // flops), round(1e3 * fp32, 1), round(1e3 * bf16, 1), round(1e3 * opt_only, 1),
        ])  # fmt: skip
    header = ["optimizer", "batch", "forward + backward GFLOP", "optimiser GFLOP", "steps in 45 TFLOP",
              "ms / step fp32", "ms / step bf16 autocast", "ms / optimiser step"]  # fmt: skip
    note = (
        "The default digits network and batch. FLOPs by torch's FlopCounterMode; AdamW's update is elementwise and "
        "counts none. Times: the best of 3 runs of 10 steps, nothing else running."
    )
    write_results("digits_optimizer", header, rows, note)


if __name__ == "__main__":
    main()
