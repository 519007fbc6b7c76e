"""Digits data and judge: generation, PNG writing, loading, classifier training and inference speed."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import best_time, write_results  # noqa: E402
from difflab.digits import synth  # noqa: E402
from difflab.digits.classifier import ClassifierConfig, DigitClassifier, augment  # noqa: E402
from difflab.digits.data import generate_split, load_split, make_dataset  # noqa: E402
from difflab.precision import Precision  # noqa: E402

N = 2000


def main() -> None:
    rows = []
    synth.load_photos(), synth.load_glyphs(), synth.load_mnist()  # one-off set-up, timed separately below
    for domain in ("mnistm", "svhn"):
        t = best_time(lambda: generate_split(domain, N, seed=0), repeats=2)
        rows.append([f"generate {domain} (arrays only)", N, t, N / t])
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        make_dataset(tmp, n_per_domain=N, n_test_per_domain=N // 5, seed=0)
        t = time.perf_counter() - start
        n_all = 2 * (N + N // 5)
        rows.append(["make_dataset, both domains (incl. PNG files)", n_all, t, n_all / t])
        for f in Path(tmp).rglob(".*.cache.npz"):
            f.unlink()
        start = time.perf_counter()
        load_split(tmp, "svhn", "train")
        t = time.perf_counter() - start
        rows.append(["load_split, PNG decode (cold)", N, t, N / t])
        t = best_time(lambda: load_split(tmp, "svhn", "train"), repeats=3)
        rows.append(["load_split, from .npz cache", N, t, N / t])

    device = torch.device("cpu")
    model = DigitClassifier(ClassifierConfig(domain="svhn"))
    opt = torch.optim.AdamW(model.parameters())
    images = torch.randint(0, 256, (128, 28, 28, 3), dtype=torch.uint8)
    labels = torch.randint(0, 10, (128,))
    gen = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    for n_threads, bf16 in ((threads, False), (threads, True), (1, False), (1, True)):
        torch.set_num_threads(n_threads)

        def step():
            x = augment(model.preprocess(images), gen)
            with Precision("bf16" if bf16 else "fp32").autocast(device):
                loss = F.cross_entropy(model(x), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()

        t = best_time(lambda: [step() for _ in range(10)], repeats=3)
        rows.append(
            [
                f"classifier train step, batch 128, {'bf16' if bf16 else 'fp32'}, {n_threads} thread(s)",
                1280,
                t,
                1280 / t,
            ]
        )
    torch.set_num_threads(threads)
    batch = np.random.default_rng(0).integers(0, 256, (2000, 28, 28, 3), dtype=np.uint8)
    t = best_time(lambda: model.predict(batch), repeats=3)
    rows.append(["classifier predict (fp32)", 2000, t, 2000 / t])
    write_results(
        "digits_data",
        ["operation", "images", "seconds", "images/s"],
        rows,
        notes="Shared 2-core machine under load from other processes: wall times include that contention, "
        "which hits multi-threaded small kernels hardest.",
    )


if __name__ == "__main__":
    main()
