"""Accuracy against Fréchet distance as digit guidance grows, on the default model of digits_seeds.py, beside
the real held-out digits judged the same way: what a generator as good as the data would score. Data, judges
and checkpoints are those of digits_seeds.py (trained there if missing).

    python benchmarks/digits_guidance.py --seeds 0 1 2
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402
from difflab.digits.sample import SampleConfig  # noqa: E402
from digits_seeds import data_and_judges, judge, seed_arguments, trained  # noqa: E402

GUIDANCE = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]


def main() -> None:
    args = seed_arguments(__doc__.splitlines()[0])
    rows = []
    for seed in args.seeds:
        data, judges = data_and_judges(seed)
        ckpt = trained("default", seed, data)[0]
        for g in GUIDANCE:
            r = judge(ckpt, SampleConfig(guidance_digit=g, precision="fp32"), seed, data, judges)
            m, s = r["mnistm"], r["svhn"]
            if g == GUIDANCE[0]:
                real = round((m["real_acc"] + s["real_acc"]) / 2, 4)
                rows.append([seed, "real held-out digits", m["real_acc"], s["real_acc"], real, 1.0, 1.0, 0.05, 0.05])
            rows.append([
                seed, g, m["acc"], s["acc"], round(r["acc"], 4), round(m["frechet_ratio"], 2),
                round(s["frechet_ratio"], 2), round(m["memorisation"], 3), round(s["memorisation"], 3),
            ])  # fmt: skip
            print(rows[-1], flush=True)
    header = [
        "seed", "digit guidance", "MNIST-M acc", "SVHN acc", "mean acc", "Fréchet ratio MNIST-M",
        "Fréchet ratio SVHN", "memorised MNIST-M", "memorised SVHN",
    ]  # fmt: skip
    note = (
        "The default model and sampler (DDIM-10, η = 1, trailing timesteps) of each seed with only the digit guidance "
        "changed, in fp32; 1,000 digits per row judged as in digits_seeds.md. The real held-out row: the seed's judges "
        "on its held-out split (2,000 images per domain, never seen in training); its Fréchet ratio is 1 and its "
        "memorisation 5 % by definition (the floor is an equally large real training sample; the memorisation "
        "threshold is the 5th percentile of held-out-to-training distances)."
    )
    write_results("digits_guidance", header, rows, note)


if __name__ == "__main__":
    main()
