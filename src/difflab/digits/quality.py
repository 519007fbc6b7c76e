"""Quality beyond accuracy: a generator that copies its training images scores 1.0 on accuracy, so the
generated digits of each domain are also compared with real held-out ones.

- Fréchet distance between the judge's penultimate features of generated and held-out images (FID's
  formula in the judge's feature space), beside the same distance from an equally large sample of the
  training split to the held-out split: the floor a perfect generator would reach.
- Memorisation rate: the fraction of generated images whose nearest training image (pixel L2) is closer
  than the 5th percentile of held-out-to-training nearest distances, i.e. 5 % for real unseen images.
- Diversity per digit: mean pairwise feature distance of generated images over that of held-out images.
- The judge's accuracy on the real held-out images: what a generator indistinguishable from the real data
  would score. Where it is below the generated digits' accuracy, the generator draws clearer digits than the
  data has, and that distance shows in the Fréchet distance.
"""

from __future__ import annotations

import numpy as np
import torch

from difflab.digits.classifier import accuracy

MEMORISATION_PERCENTILE = 5.0


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2(Σ_a Σ_b)^½) for feature rows `a` and `b`.

    Tr((Σ_a Σ_b)^½) is the sum of the square roots of the eigenvalues of Σ_a^½ Σ_b Σ_a^½, a symmetric
    matrix, so only symmetric eigen-decompositions are needed (stable also for rank-deficient Σ)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(cov_a)
    root_a = (v * np.sqrt(w.clip(min=0))) @ v.T
    cross = np.sqrt(np.linalg.eigvalsh(root_a @ cov_b @ root_a).clip(min=0)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * cross)


def nearest_distances(queries: np.ndarray, pool: np.ndarray, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """L2 distance from each uint8 image in `queries` to its nearest image in `pool`, and that image's index."""
    pool_t = torch.as_tensor(pool.reshape(len(pool), -1), dtype=torch.float32) / 255
    dists, index = [], []
    for i in range(0, len(queries), chunk):
        q = torch.as_tensor(queries[i : i + chunk].reshape(-1, pool_t.shape[1]), dtype=torch.float32) / 255
        d, j = torch.cdist(q, pool_t).min(dim=1)
        dists.append(d)
        index.append(j)
    return torch.cat(dists).numpy(), torch.cat(index).numpy()


def mean_pairwise_distance(features: np.ndarray) -> float:
    if len(features) < 2:
        return float("nan")
    d = torch.cdist(torch.as_tensor(features), torch.as_tensor(features))
    return float(d.sum() / (len(features) * (len(features) - 1)))


def domain_quality(
    judge,
    generated: np.ndarray,
    gen_labels: np.ndarray,
    train: np.ndarray,
    heldout: np.ndarray,
    heldout_labels: np.ndarray,
    seed: int = 0,
    gallery: int = 8,
) -> dict:
    """All the measures for one domain; `judge` is the domain's `DigitClassifier`."""
    rng = np.random.default_rng(seed)
    train_sample = train[rng.choice(len(train), size=min(len(generated), len(train)), replace=False)]
    gen_feats, held_feats = judge.embed(generated), judge.embed(heldout)
    gen_nn, gen_idx = nearest_distances(generated, train)
    held_nn, _ = nearest_distances(heldout, train)
    threshold = float(np.percentile(held_nn, MEMORISATION_PERCENTILE))
    closest = np.argsort(gen_nn)[:gallery]
    diversity = {}
    for digit in range(10):
        g, h = gen_feats[gen_labels == digit], held_feats[heldout_labels == digit]
        diversity[str(digit)] = (
            mean_pairwise_distance(g) / mean_pairwise_distance(h) if len(g) > 1 and len(h) > 1 else None
        )
    ratios = [r for r in diversity.values() if r is not None]
    return {
        "frechet_generated_vs_heldout": frechet_distance(gen_feats, held_feats),
        "frechet_train_vs_heldout": frechet_distance(judge.embed(train_sample), held_feats),
        "heldout_accuracy": accuracy(judge, heldout, heldout_labels),
        "n_generated": int(len(generated)),
        "n_heldout": int(len(heldout)),
        "n_train": int(len(train)),
        "memorisation_rate": float((gen_nn < threshold).mean()),
        "memorisation_threshold": threshold,
        "diversity_ratio": float(np.mean(ratios)) if ratios else None,
        "diversity_ratio_per_digit": diversity,
        "closest_pairs": [
            {"generated": int(i), "train": int(gen_idx[i]), "distance": float(gen_nn[i])} for i in closest
        ],
    }
