"""Quality beyond accuracy: a generator that copies its training images scores 1.0 on accuracy, so the
generated digits of each domain are also compared with real held-out ones, each measure beside its floor (the
same measure for an equally large sample of real training images against the same held-out images).

- Distribution measures, in two feature spaces (the judge's penultimate features and those of an independent
  network of another architecture and seed, trained on real digits only): Fréchet distance and KID from
  torchmetrics, with the network as its custom feature extractor; precision, recall, density and coverage
  (Kynkäänniemi et al. 2019; Naeem et al. 2020) from `prdc`, the latter paper's own package. They need
  `QualityConfig.min_images` generated and held-out images, and are skipped, with the reason, below that.
- CAS, the classification accuracy score: a classifier of the judge's shape trained only on generated digits,
  read on the real held-out ones, beside the same classifier trained on as many real digits (`cas`).
- Memorisation rate: the fraction of generated images whose nearest training image (pixel L2) is closer
  than the 5th percentile of held-out-to-training nearest distances, i.e. 5 % for real unseen images.
- Diversity per digit: mean pairwise judge-feature distance of generated images over that of held-out images.
- The judge's accuracy on the real held-out images: what a generator indistinguishable from the real data
  would score.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from difflab.digits.classifier import accuracy

MEMORISATION_PERCENTILE = 5.0
SPACES = ("judge", "independent")  # the feature spaces of the distribution measures


@dataclass
class QualityConfig:
    # Distribution measures want at least this many generated and held-out images per domain: with fewer, the
    # covariance of a few hundred features is rank-deficient and the floor itself moves from sample to sample.
    min_images: int = 2000
    kid_subset_size: int = 1000
    kid_subsets: int = 100
    nearest_k: int = 3  # Kynkäänniemi et al.'s k for precision and recall
    seed: int = 0


class FeatureExtractor(nn.Module):
    """A digit network's penultimate features of uint8 (B, 3, 28, 28) images, as torchmetrics' custom extractor."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net.eval()
        self.num_features = net.num_features

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.features(self.net.preprocess(images.permute(0, 2, 3, 1))).flatten(1).float().cpu()


def batches(images: np.ndarray, size: int = 500):
    """uint8 (N, 28, 28, 3) images as the (B, 3, 28, 28) tensors torchmetrics takes."""
    for i in range(0, len(images), size):
        yield torch.as_tensor(images[i : i + size]).permute(0, 3, 1, 2)


def frechet_metric(extractor: FeatureExtractor, reference: np.ndarray):
    """torchmetrics' FID with `reference` as its real images, kept across `reset()`."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    fid = FrechetInceptionDistance(feature=extractor, reset_real_features=False)
    for x in batches(reference):
        fid.update(x, real=True)
    return fid


def frechet_distance(net: nn.Module, images: np.ndarray, reference: np.ndarray) -> float:
    """FID between `images` and `reference` in `net`'s features."""
    fid = frechet_metric(FeatureExtractor(net), reference)
    for x in batches(images):
        fid.update(x, real=False)
    return float(fid.compute())


def distribution_measures(
    net: nn.Module, generated: np.ndarray, train_sample: np.ndarray, heldout: np.ndarray, cfg: QualityConfig
) -> dict:
    """FID, KID and precision / recall / density / coverage of `generated` against `heldout` in `net`'s features,
    and the same for `train_sample` (the floor)."""
    from prdc import compute_prdc
    from torchmetrics.image.kid import KernelInceptionDistance
    from torchmetrics.utilities.data import dim_zero_cat

    extractor = FeatureExtractor(net)
    subset = min(cfg.kid_subset_size, len(generated), len(train_sample), len(heldout))
    fid = frechet_metric(extractor, heldout)
    with warnings.catch_warnings():  # that it keeps every feature: a few thousand vectors here
        warnings.filterwarnings("ignore", "Metric `Kernel Inception Distance` will save all extracted features")
        kid = KernelInceptionDistance(
            feature=extractor, subsets=cfg.kid_subsets, subset_size=subset, reset_real_features=False
        )
    for x in batches(heldout):
        kid.update(x, real=True)
    real_features = dim_zero_cat(kid.real_features).numpy()  # KID keeps every feature: prdc reads them
    result = {}
    for name, images in (("generated", generated), ("floor", train_sample)):
        fid.reset()
        kid.reset()
        for x in batches(images):
            fid.update(x, real=False)
            kid.update(x, real=False)
        with torch.random.fork_rng():  # KID draws its subsets from torch's global generator
            torch.manual_seed(cfg.seed)
            kid_mean, kid_std = kid.compute()
        fake_features = dim_zero_cat(kid.fake_features).numpy()
        with contextlib.redirect_stdout(io.StringIO()):  # prdc prints the sample counts
            prdc = compute_prdc(real_features, fake_features, nearest_k=cfg.nearest_k)
        result[name] = {
            "fid": float(fid.compute()),
            "kid": float(kid_mean),
            "kid_std": float(kid_std),
            **{k: float(v) for k, v in prdc.items()},
        }
    return result


def nearest_distances(
    queries: np.ndarray, pool: np.ndarray, chunk: int = 1024
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """L2 distance from each uint8 image in `queries` to its nearest image in `pool`, that image's index, and the
    distance to the second nearest (a pool of one image: the nearest again)."""
    pool_t = torch.as_tensor(pool.reshape(len(pool), -1), dtype=torch.float32) / 255
    dists, index = [], []
    for i in range(0, len(queries), chunk):
        q = torch.as_tensor(queries[i : i + chunk].reshape(-1, pool_t.shape[1]), dtype=torch.float32) / 255
        d, j = torch.cdist(q, pool_t).topk(min(2, len(pool)), dim=1, largest=False)
        dists.append(d)
        index.append(j[:, 0])
    d = torch.cat(dists).numpy()
    return d[:, 0], torch.cat(index).numpy(), d[:, -1]


def nearest_ratio(nearest: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Nearest over second-nearest distance: near 0 for a copy of one training image, near 1 for an image as close
    to several (a pale or generic one). Two equal pool images at distance 0 make a copy: 0."""
    return nearest / np.maximum(second, 1e-12)


def mean_pairwise_distance(features: np.ndarray) -> float:
    if len(features) < 2:
        return float("nan")
    d = torch.cdist(torch.as_tensor(features), torch.as_tensor(features))
    return float(d.sum() / (len(features) * (len(features) - 1)))


def too_few(n_generated: int, n_heldout: int, cfg: QualityConfig) -> str | None:
    """Why the distribution measures cannot be taken on these counts, or None when they can."""
    if min(n_generated, n_heldout) >= cfg.min_images:
        return None
    return (
        f"skipped: {n_generated} generated and {n_heldout} held-out images, the distribution measures need "
        f"{cfg.min_images} of each per domain"
    )


def domain_quality(
    judge,
    feature_net,
    generated: np.ndarray,
    gen_labels: np.ndarray,
    train: np.ndarray,
    heldout: np.ndarray,
    heldout_labels: np.ndarray,
    cfg: QualityConfig | None = None,
    gallery: int = 8,
) -> dict:
    """All the measures of one domain but CAS; `judge` is the domain's `DigitClassifier`, `feature_net` the
    independent network."""
    cfg = cfg or QualityConfig()
    rng = np.random.default_rng(cfg.seed)
    train_sample = train[rng.choice(len(train), size=min(len(generated), len(train)), replace=False)]
    gen_feats, held_feats = judge.embed(generated), judge.embed(heldout)
    gen_nn, gen_idx, gen_second = nearest_distances(generated, train)
    held_nn, _, held_second = nearest_distances(heldout, train)
    threshold = float(np.percentile(held_nn, MEMORISATION_PERCENTILE))
    ratio_threshold = float(np.percentile(nearest_ratio(held_nn, held_second), MEMORISATION_PERCENTILE))
    closest = np.argsort(gen_nn)[:gallery]
    diversity = {}
    for digit in range(10):
        g, h = gen_feats[gen_labels == digit], held_feats[heldout_labels == digit]
        diversity[str(digit)] = (
            mean_pairwise_distance(g) / mean_pairwise_distance(h) if len(g) > 1 and len(h) > 1 else None
        )
    ratios = [r for r in diversity.values() if r is not None]
    skipped = too_few(len(generated), len(heldout), cfg)
    nets = dict(zip(SPACES, (judge, feature_net)))
    return {
        "distribution": {"skipped": skipped}
        if skipped
        else {space: distribution_measures(net, generated, train_sample, heldout, cfg) for space, net in nets.items()},
        "heldout_accuracy": accuracy(judge, heldout, heldout_labels),
        "n_generated": int(len(generated)),
        "n_heldout": int(len(heldout)),
        "n_train": int(len(train)),
        "memorisation_rate": float((gen_nn < threshold).mean()),
        "memorisation_threshold": threshold,
        # Closer to the nearest training image, relative to the second nearest, than all but 5 % of real unseen
        # digits: a copy, where a pale image close to every training image is not one (docs, "The measures").
        "copy_rate": float((nearest_ratio(gen_nn, gen_second) < ratio_threshold).mean()),
        "copy_ratio_threshold": ratio_threshold,
        "diversity_ratio": float(np.mean(ratios)) if ratios else None,
        "diversity_ratio_per_digit": diversity,
        "closest_pairs": [
            {"generated": int(i), "train": int(gen_idx[i]), "distance": float(gen_nn[i])} for i in closest
        ],
    }
