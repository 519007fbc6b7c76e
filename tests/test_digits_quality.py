"""Quality beyond accuracy: the Fréchet distance against scipy's matrix square root, memorisation caught on
copies of training images, diversity, and the measures in `evaluate_folder`'s metrics.json."""

import json

import numpy as np
import pytest
import scipy.linalg
import torch
from sklearn.metrics import accuracy_score

from difflab.digits.classifier import ClassifierConfig, DigitClassifier, load_classifier, save_classifier
from difflab.digits.data import DOMAINS, load_split, make_dataset
from difflab.digits.evaluate import evaluate_folder
from difflab.digits.quality import domain_quality, frechet_distance, nearest_distances
from difflab.io import save_png


def scipy_frechet(a, b):
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(ca @ cb).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(ca + cb - 2 * root))


def test_frechet_distance_matches_scipy():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(loc=0.5, size=(300, 6)) * 1.7
    assert frechet_distance(a, b) == pytest.approx(scipy_frechet(a, b), rel=1e-6)
    assert abs(frechet_distance(a, a)) < 1e-6
    # Fewer samples than dimensions (rank-deficient covariances) still gives a finite, non-negative value.
    assert 0 < frechet_distance(rng.normal(size=(20, 50)), rng.normal(size=(30, 50))) < 1e3


def test_nearest_distances():
    pool = np.zeros((3, 2, 2, 3), dtype=np.uint8)
    pool[1] += 255
    pool[2] += 51
    q = pool[[2, 1]].copy()
    q[0, 0, 0, 0] = 0
    d, i = nearest_distances(q, pool)
    assert i.tolist() == [2, 1] and d[1] == 0 and d[0] == pytest.approx(0.2)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("qdata"), n_per_domain=200, n_test_per_domain=100, seed=3)


@pytest.fixture(scope="module")
def judge_dir(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("judges")
    torch.manual_seed(0)
    for d in DOMAINS:
        save_classifier(
            DigitClassifier(ClassifierConfig(domain=d, width=4)),
            out / f"{d}.safetensors",
            {"data_root": str(data_root)},
        )
    return out


def test_copies_of_training_images_are_flagged_and_real_ones_are_not(data_root):
    train, _ = load_split(data_root, "svhn", "train")
    held, held_labels = load_split(data_root, "svhn", "val")
    judge = DigitClassifier(ClassifierConfig(domain="svhn", width=4))
    copies = domain_quality(judge, train[:50], np.arange(50) % 10, train, held, held_labels)
    assert copies["memorisation_rate"] == 1.0
    assert all(p["distance"] == 0 for p in copies["closest_pairs"])
    real = domain_quality(judge, held[:50], held_labels[:50], train, held, held_labels)
    assert real["memorisation_rate"] <= 0.2
    assert real["frechet_generated_vs_heldout"] < copies["frechet_generated_vs_heldout"] + 50
    # Copies of one image per digit have no diversity at all.
    same = np.repeat(train[:10], 5, axis=0)
    assert domain_quality(judge, same, np.repeat(np.arange(10), 5), train, held, held_labels)["diversity_ratio"] == 0


def test_evaluate_reports_quality(tmp_path, data_root, judge_dir, capsys):
    folder = tmp_path / "gen"
    for domain in DOMAINS:
        images, labels = load_split(data_root, domain, "train")
        for i in range(20):
            save_png(images[i], folder / domain / f"{labels[i]}_{i:03d}.png")
    result = evaluate_folder(folder, judge_dir, device="cpu")
    printed = capsys.readouterr().out
    metrics = json.loads((folder / "eval" / "metrics.json").read_text())
    for domain in DOMAINS:
        q = metrics["domains"][domain]["quality"]
        assert q["memorisation_rate"] == 1.0  # these "generated" images are training images
        assert q == result["domains"][domain]["quality"]
        assert (folder / "eval" / f"closest_{domain}.png").is_file()
        # The reference a generator as good as the data would score: the judge on the real held-out split.
        held, held_labels = load_split(data_root, domain, "val")
        judge = load_classifier(judge_dir / f"{domain}.safetensors")
        assert q["heldout_accuracy"] == pytest.approx(accuracy_score(held_labels, judge.predict(held)))
        assert f"real held-out digits score acc = {q['heldout_accuracy']:.4f}" in printed
    assert "memorisation = 100.0 %" in printed and "Fréchet distance" in printed
    assert "Quality beyond accuracy" in (folder / "eval" / "report.html").read_text()
    # Without the real data the accuracy is still reported, and the printout says what was skipped.
    bare = tmp_path / "bare"
    bare.mkdir()
    for d in DOMAINS:
        meta = json.loads((judge_dir / f"{d}.json").read_text())
        (bare / f"{d}.json").write_text(json.dumps({**meta, "data_root": str(tmp_path / "gone")}))
        (bare / f"{d}.safetensors").write_bytes((judge_dir / f"{d}.safetensors").read_bytes())
    result = evaluate_folder(folder, bare, tmp_path / "e2")
    assert "quality" not in result["domains"]["svhn"] and "quality measures skipped" in capsys.readouterr().out


def test_a_diversity_that_cannot_be_measured_is_said_so_not_a_crash():
    from difflab.digits.evaluate import format_quality

    quality = {
        "frechet_generated_vs_heldout": 1.0,
        "frechet_train_vs_heldout": 1.0,
        "memorisation_rate": 0.0,
        "diversity_ratio": None,
        "heldout_accuracy": 0.97,
    }
    text = format_quality({"domains": {"mnistm": {"quality": quality}}})
    assert "diversity = not measurable (it needs at least 2 images of a digit" in text
