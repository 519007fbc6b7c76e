"""What `--precision auto` chooses between, on this machine: milliseconds per digits training step (batch 32),
judge training step (batch 128) and guided sampling forward (500 images x 2 branches), in fp32 and bf16
autocast, contiguous and channels-last, and fp32 under torch.compile (its compile time apart). Candidates are
timed interleaved (median of 5 after a warm-up), as `difflab.precision.measure` does, and each one's output (the
gradient of a training step, the guided ε) is compared with fp32's from the same random state, beside the job's
tolerance: what `auto` would keep."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402
from difflab.digits.classifier import JUDGE_TOLERANCE, ClassifierConfig, DigitClassifier  # noqa: E402
from difflab.digits.sample import SAMPLE_TOLERANCE, guided_digits_eps, make_conds  # noqa: E402
from difflab.digits.train import PRESETS, TRAIN_TOLERANCE, TrainConfig  # noqa: E402
from difflab.nets.digits_unet import DigitsUNet  # noqa: E402
from difflab.precision import CANDIDATES, Precision, measure  # noqa: E402

CPU = torch.device("cpu")


def gradient(model: torch.nn.Module) -> torch.Tensor:
    grads = torch.cat([q.grad.flatten() for q in model.parameters() if q.grad is not None])
    model.zero_grad(set_to_none=True)
    return grads


def diffusion_step(p: Precision, models: dict):
    net = models.setdefault(p.label, p.prepare(DigitsUNet(PRESETS["cpu"])))
    schedule = TrainConfig.default_schedule().build()
    x0, cond = torch.randn(32, 3, 28, 28), make_conds([0] * 32, [i % 10 for i in range(32)])
    with p.autocast(CPU):
        loss = schedule.training_loss(lambda x, t: net(x, t, cond), p.input(x0), min_snr_gamma=5.0)
    loss.backward()
    return gradient(net)


def judge_step(p: Precision, models: dict):
    model = models.setdefault(p.label, p.prepare(DigitClassifier(ClassifierConfig("bench"))))
    with p.autocast(CPU):
        F.cross_entropy(model(p.input(torch.randn(128, 3, 28, 28))), torch.arange(128) % 10).backward()
    return gradient(model)


def sampling_forward(p: Precision, models: dict):
    net = models.setdefault(p.label, p.prepare(DigitsUNet(PRESETS["cpu"]).eval()))
    cond = make_conds([0] * 500, [i % 10 for i in range(500)])
    with torch.inference_mode(), p.autocast(CPU):
        return guided_digits_eps(lambda x, t, c: net(p.input(x), t, c), cond, 5.5, 1.0, net.null_cond)(
            torch.randn(500, 3, 28, 28), torch.full((500,), 250)
        )


def compiled(job, models: dict) -> tuple[float, float]:
    """(compile + first call seconds, median ms per call after) for fp32 under torch.compile."""
    p = Precision("fp32")
    job(p, models)  # build the eager model under the same label, then compile it in place
    models[p.label] = torch.compile(models[p.label])
    start = time.perf_counter()
    job(p, models)
    first = time.perf_counter() - start
    return first, measure(lambda c: job(c, models), (p,))[0][p.label]


def main() -> None:
    torch.manual_seed(0)
    rows = []
    for name, job, tolerance in (
        ("digits train step, batch 32", diffusion_step, TRAIN_TOLERANCE),
        ("judge train step, batch 128", judge_step, JUDGE_TOLERANCE),
        ("sampling forward, 500 x 2 branches", sampling_forward, SAMPLE_TOLERANCE),
    ):
        models: dict = {}
        ms, errors = measure(lambda p, j=job, m=models: j(p, m), CANDIDATES)
        base = ms["fp32"]
        rows += [
            [name, label, round(v, 1), round(base / v, 2), f"{errors[label]:.2%}", f"{tolerance:.0%}"]
            for label, v in ms.items()
        ]
        try:
            first, after = compiled(job, {})
            rows.append(
                [
                    name,
                    f"fp32 + torch.compile (compile + first call {first:.0f} s)",
                    round(after, 1),
                    round(base / after, 2),
                    "-",
                    f"{tolerance:.0%}",
                ]
            )
        except Exception as e:  # no compiler on the machine, or an unsupported op: say so in the table
            rows.append([name, f"fp32 + torch.compile failed: {e.__class__.__name__}", "-", "-", "-", "-"])
    write_results(
        "precision",
        ["job", "precision", "ms per call", "speed-up vs fp32", "relative error vs fp32", "job's tolerance"],
        rows,
        "Median of 5 interleaved calls after a warm-up (forward + backward for the training steps); random-weight "
        "nets. `--precision auto` keeps the fastest of the four eager candidates within the job's tolerance if it "
        "beats fp32 by 10 %. The errors of a trained model's guided ε are in the README (Precision).",
    )


if __name__ == "__main__":
    main()
