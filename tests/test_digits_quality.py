"""Quality beyond accuracy: torchmetrics' FID through difflab's feature extractor against the Fréchet formula with
scipy's matrix square root on the same features, prdc's measures on copies, memorisation caught on copies of
training images, diversity, skipped measures with their reason, and the measures in `evaluate_folder`'s output."""

import json

import numpy as np
import pytest
import scipy.linalg
import torch
from sklearn.metrics import accuracy_score

from difflab.digits.classifier import ClassifierConfig, DigitClassifier, load_classifier
from difflab.digits.data import DOMAINS, load_split, make_dataset
from difflab.digits.evaluate import evaluate_folder
from difflab.digits.quality import (
    FeatureExtractor,
    QualityConfig,
    distribution_measures,
    domain_quality,
    nearest_distances,
)
from difflab.io import save_png
from difflab.utils import DifflabError

SMALL = QualityConfig(min_images=50, kid_subset_size=40, kid_subsets=10)


def scipy_frechet(a, b):
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(ca @ cb).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(ca + cb - 2 * root))


def features(net, images):
    return FeatureExtractor(net)(torch.as_tensor(images).permute(0, 3, 1, 2)).double().numpy()


def test_fid_through_the_feature_extractor_matches_the_formula(data_root):
    torch.manual_seed(0)
    net = DigitClassifier(ClassifierConfig("svhn", width=2))  # 72 features: full-rank covariances from 100 images
    train, _ = load_split(data_root, "svhn", "train")
    held, _ = load_split(data_root, "mnistm", "train")
    out = distribution_measures(net, held[:100], train[:100], train[100:200], SMALL)
    assert out["generated"]["fid"] == pytest.approx(
        scipy_frechet(features(net, held[:100]), features(net, train[100:200])), rel=1e-3
    )
    assert out["generated"]["fid"] > 3 * out["floor"]["fid"]  # another domain is further than the same one
    assert out["generated"]["kid"] > out["floor"]["kid"] + 2 * out["generated"]["kid_std"]
    # The same images as the reference: every real point is covered and every fake point is inside the manifold.
    same = distribution_measures(net, train[100:200], train[:100], train[100:200], SMALL)["generated"]
    assert same["fid"] == pytest.approx(0, abs=1e-2)
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0


def test_nearest_distances():
    pool = np.zeros((3, 2, 2, 3), dtype=np.uint8)
    pool[1] += 255
    pool[2] += 51
    q = pool[[2, 1]].copy()
    q[0, 0, 0, 0] = 0
    d, i, second = nearest_distances(q, pool)
    assert i.tolist() == [2, 1] and d[1] == 0 and d[0] == pytest.approx(0.2)
    # q[0] (grey with one value black) is 0.2 from grey, then √11·0.2 from black; q[1] (white): 0, then √12·0.8 (grey)
    assert second[0] == pytest.approx(np.sqrt(11 * 0.2**2)) and second[1] == pytest.approx(np.sqrt(12 * 0.8**2))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("qdata"), n_per_domain=200, n_test_per_domain=100, seed=3)


@pytest.fixture(scope="module")
def judge_dir(data_root, tmp_path_factory, tiny_judges):
    return tiny_judges(tmp_path_factory.mktemp("judges"), data_root)


def test_copies_of_training_images_are_flagged_and_real_ones_are_not(data_root):
    train, _ = load_split(data_root, "svhn", "train")
    held, held_labels = load_split(data_root, "svhn", "val")
    judge = DigitClassifier(ClassifierConfig(domain="svhn", width=4))
    net = DigitClassifier(ClassifierConfig("features", width=8, arch="gap"))
    copies = domain_quality(judge, net, train[:50], np.arange(50) % 10, train, held, held_labels, SMALL)
    assert copies["memorisation_rate"] == copies["copy_rate"] == 1.0
    assert all(p["distance"] == 0 for p in copies["closest_pairs"])
    real = domain_quality(judge, net, held[:50], held_labels[:50], train, held, held_labels, SMALL)
    assert real["memorisation_rate"] <= 0.2 and real["copy_rate"] <= 0.2
    # Unseen digits faded halfway to the mean image come near every training digit: most fall under the nearest-
    # distance threshold, but they are no nearer one training digit than the others, so they are not copies.
    pale = (0.5 * held[:50] + 0.5 * train.mean(0)).astype(np.uint8)
    faded = domain_quality(judge, net, pale, held_labels[:50], train, held, held_labels, SMALL)
    assert faded["memorisation_rate"] >= 0.5 and faded["copy_rate"] <= 0.2
    for space in ("judge", "independent"):
        assert set(real["distribution"][space]) == {"generated", "floor"}
    # Copies of one image per digit have no diversity at all.
    same = np.repeat(train[:10], 5, axis=0)
    labels = np.repeat(np.arange(10), 5)
    assert domain_quality(judge, net, same, labels, train, held, held_labels, SMALL)["diversity_ratio"] == 0
    # Below the images a distribution measure needs, it is skipped with the reason; the others are still there.
    few = domain_quality(judge, net, train[:20], np.arange(20) % 10, train, held, held_labels, SMALL)
    assert few["distribution"] == {
        "skipped": "skipped: 20 generated and 100 held-out images, the distribution measures need 50 of each per domain"
    }
    assert few["memorisation_rate"] == 1.0


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
        # 20 images: too few for the distribution measures and for CAS, each skipped with its reason.
        assert "need 2000 of each per domain" in q["distribution"]["skipped"]
        assert q["cas"] == {"skipped": "skipped: CAS trains on 200 generated images of every digit"}
    assert "memorisation" in printed and "100.0 %" in printed and "need 2000 of each" in printed
    assert "Quality beyond accuracy" in (folder / "eval" / "report.html").read_text()
    # Without the real data the accuracy is still reported, and the printout says what was skipped.
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in judge_dir.iterdir():
        (bare / f.name).write_bytes(f.read_bytes())
    for d in DOMAINS:
        meta = json.loads((judge_dir / f"{d}.json").read_text())
        (bare / f"{d}.json").write_text(json.dumps({**meta, "data_root": str(tmp_path / "gone")}))
    result = evaluate_folder(folder, bare, tmp_path / "e2")
    assert "quality" not in result["domains"]["svhn"] and "quality measures skipped" in capsys.readouterr().out


def test_judges_from_before_the_feature_network_are_refused_in_one_line(tmp_path, data_root, judge_dir, folder_bytes):
    old = tmp_path / "old"
    old.mkdir()
    for f in judge_dir.iterdir():  # the domain judges, without the feature network
        if not f.name.startswith("features"):
            (old / f.name).write_bytes(f.read_bytes())
    folder = tmp_path / "gen"
    images, labels = load_split(data_root, "svhn", "train")
    for domain in DOMAINS:
        save_png(images[0], folder / domain / f"{labels[0]}_000.png")
    before = folder_bytes(tmp_path)
    with pytest.raises(DifflabError) as e:
        evaluate_folder(folder, old)
    assert str(e.value) == (
        f"{old}: judges from an earlier difflab (no independent feature network or CAS reference); retrain them: "
        f"difflab digits train-classifier --data-root {data_root} --out {old} --overwrite"
    )
    assert folder_bytes(tmp_path) == before


def test_a_diversity_that_cannot_be_measured_is_said_so_not_a_crash():
    from difflab.digits.evaluate import format_quality

    quality = {
        "distribution": {"skipped": "skipped: too few"},
        "cas": {"skipped": "skipped: too few"},
        "memorisation_rate": 0.0,
        "copy_rate": 0.0,
        "diversity_ratio": None,
        "heldout_accuracy": 0.97,
        "n_generated": 3,
        "n_heldout": 3,
    }
    text = format_quality({"domains": {"mnistm": {"quality": quality, "accuracy": 1.0}}})
    assert "not measurable (it needs at least 2 images of a digit" in text


def test_the_demo_draws_accuracy_against_frechet_distance_over_guidance(tmp_path, data_root, judge_dir):
    from PIL import Image

    from difflab.demos.digits import DemoConfig, guidance_curve
    from difflab.digits.model import ScheduleConfig
    from difflab.digits.sample import SampleConfig
    from difflab.nets.digits_unet import DigitsUNet, DigitsUNetConfig

    torch.manual_seed(0)
    net = DigitsUNet(DigitsUNetConfig(channels=(8, 16), patch=2)).eval()
    schedule = ScheduleConfig(num_steps=50).build()
    cfg = DemoConfig(per_digit=2, curve_guidance=(1.0, 3.0), sample=SampleConfig(steps=2), precision="fp32")
    path = guidance_curve(net, schedule, cfg, torch.device("cpu"), judge_dir, data_root, tmp_path / "frontier.png")
    with Image.open(path) as im:
        assert im.size[0] > 400 and im.size[1] > 200
