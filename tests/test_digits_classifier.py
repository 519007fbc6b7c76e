"""Digit classifiers and the course-style evaluation, checked against scikit-learn."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from sklearn.metrics import accuracy_score, confusion_matrix

from difflab.digits.classifier import (
    FEATURES_FILE,
    JUDGES_VERSION,
    ClassifierConfig,
    ClassifierTrainConfig,
    DigitClassifier,
    classifier_path,
    load_classifier,
    save_classifier,
    train_classifier,
    train_classifiers,
)
from difflab.digits.data import DOMAINS, load_split, make_dataset
from difflab.digits.evaluate import evaluate_folder
from difflab.utils import DifflabError


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # These models are tiny: one thread avoids thread start-up and sync costs that dominate them.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), n_per_domain=100, n_test_per_domain=30, seed=1)


@pytest.fixture(scope="module")
def classifier_dir(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("clf")
    accs = train_classifiers(data_root, out, epochs=1, device="cpu", seed=0, width=8, judge_pool=40)
    assert set(accs) == set(DOMAINS) and all(0.0 <= a <= 1.0 for a in accs.values())
    return out


def test_train_classifiers_writes_loadable_files(classifier_dir, data_root):
    for domain in DOMAINS:
        meta = json.loads((classifier_dir / f"{domain}.json").read_text())
        # An embedded dataset: the judges train on their own pool (MNIST-M: --judge-pool, SVHN: as many as train.csv)
        pool = 40 if domain == "mnistm" else 100
        assert meta["config"]["domain"] == domain and meta["n_train"] == pool and meta["n_held_out"] == 30
        assert meta["n_judge_pool"] == pool and meta["judges_version"] == JUDGES_VERSION
        assert meta["cas_real"]["accuracy"] is None  # 100 training images: fewer than CAS needs of every digit
        model = load_classifier(classifier_path(classifier_dir, domain), "cpu")
        images, labels = load_split(data_root, domain, "val")
        assert meta["held_out_accuracy"] == pytest.approx(accuracy_score(labels, model.predict(images)))
    assert (classifier_dir / "report.html").is_file()
    features = load_classifier(classifier_path(classifier_dir, FEATURES_FILE), "cpu")
    assert features.config.arch == "gap" and features.num_features == 128


def test_without_val_csv_a_slice_of_train_is_held_out(tmp_path, data_root):
    import shutil

    # Without info.json it is not difflab's dataset: the judges train on train.csv alone.
    ignore = shutil.ignore_patterns("val.csv", ".*", "info.json")
    shutil.copytree(data_root / "digits", tmp_path / "digits", ignore=ignore)
    accs = train_classifiers(tmp_path, tmp_path / "clf", epochs=1, device="cpu", width=4, domains=("svhn",))
    meta = json.loads((tmp_path / "clf" / "svhn.json").read_text())
    assert set(accs) == {"svhn"} and meta["n_train"] == 90 and meta["n_held_out"] == 10
    assert "held out of train.csv" in meta["held_out"]


def test_training_reduces_loss_and_round_trips(tmp_path, data_root):
    images, labels = load_split(data_root, "mnistm", "train")
    config = ClassifierTrainConfig(epochs=3, batch_size=25, lr=3e-3, augment=True)
    model = train_classifier(images, labels, "mnistm", config, width=8, seed=0)
    x = model.preprocess(torch.as_tensor(images))
    with torch.inference_mode():
        trained_loss = torch.nn.functional.cross_entropy(model(x), torch.as_tensor(labels))
        fresh_loss = torch.nn.functional.cross_entropy(DigitClassifier(model.config).eval()(x), torch.as_tensor(labels))
    assert trained_loss < fresh_loss
    path = save_classifier(model, tmp_path / "m.safetensors")
    loaded = load_classifier(path)
    with torch.inference_mode():
        assert torch.equal(model(x), loaded(x))
    # Seeded: the same run gives the same weights.
    again = train_classifier(images, labels, "mnistm", config, width=8, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_load_rejects_files_that_are_not_classifiers(tmp_path):
    model = DigitClassifier(ClassifierConfig(domain="svhn", width=8))
    path = save_classifier(model, tmp_path / "svhn.safetensors")
    with pytest.raises(DifflabError, match="classifier weights not found"):
        load_classifier(tmp_path / "other.safetensors")
    save_file({"weight": torch.zeros(3)}, str(path))
    with pytest.raises(DifflabError, match="weights do not fit the model"):
        load_classifier(path)
    path.write_bytes(b"garbage")
    with pytest.raises(DifflabError, match="not a readable safetensors"):
        load_classifier(path)
    path.with_suffix(".json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(DifflabError, match="not a difflab digit classifier config"):
        load_classifier(path)


def _write_outputs(folder, data_root):
    """Generated-digits layout: <folder>/<domain>/{d}_{NNN}.png; a few images at 32x32 like other generators."""
    for domain in DOMAINS:
        images, labels = load_split(data_root, domain, "val")
        (folder / domain).mkdir(parents=True)
        for i, (img, y) in enumerate(zip(images, labels)):
            im = Image.fromarray(img)
            if i % 5 == 0:
                im = im.resize((32, 32), Image.BILINEAR)
            im.save(folder / domain / f"{y}_{i + 1:03d}.png")


def test_evaluate_matches_sklearn(tmp_path, data_root, classifier_dir, capsys):
    folder = tmp_path / "out"
    _write_outputs(folder, data_root)
    result = evaluate_folder(folder, classifier_dir, device="cpu")
    printed = capsys.readouterr().out.splitlines()

    accs, lines = [], []
    for domain, name in zip(DOMAINS, ("MNIST-M", "SVHN")):
        files = sorted((folder / domain).glob("*.png"))
        labels = [int(f.name[0]) for f in files]
        images = np.stack([np.asarray(Image.open(f).convert("RGB").resize((28, 28), Image.BILINEAR)) for f in files])
        preds = load_classifier(classifier_path(classifier_dir, domain)).predict(images)
        acc = accuracy_score(labels, preds)
        r = result["domains"][domain]
        assert r["accuracy"] == pytest.approx(acc) and r["total"] == 30
        assert r["correct"] == int(round(acc * 30))
        cm = confusion_matrix(labels, preds, labels=list(range(10)))
        assert r["confusion"] == cm.tolist()
        for d in range(10):
            assert r["per_digit"][str(d)] == pytest.approx(cm[d, d] / cm[d].sum())
        accs.append(acc)
        lines.append(f"{name} acc = {acc:.4f} (correct/total = {r['correct']}/30)")
    lines.append(f"acc = {np.mean(accs):.4f}")
    assert printed[:3] == lines
    assert result["accuracy"] == pytest.approx(np.mean(accs))
    out = folder / "eval"
    assert (out / "confusion_mnistm.png").is_file() and (out / "confusion_svhn.png").is_file()
    assert (
        json.loads((out / "metrics.json").read_text())["domains"]["svhn"]["confusion"]
        == result["domains"]["svhn"]["confusion"]
    )


def test_evaluate_errors(tmp_path, data_root, classifier_dir):
    folder = tmp_path / "out"
    _write_outputs(folder, data_root)
    first = sorted((folder / "svhn").iterdir())[0]
    (folder / "svhn" / "x_001.png").write_bytes(first.read_bytes())
    with pytest.raises(DifflabError, match="x_001.png: file name must start with the digit label"):
        evaluate_folder(folder, classifier_dir)
    (folder / "svhn" / "x_001.png").unlink()
    (folder / "svhn" / "3_999.png").write_bytes(b"not an image")
    with pytest.raises(DifflabError, match="3_999.png: not a readable image"):
        evaluate_folder(folder, classifier_dir)
    for f in (folder / "svhn").iterdir():
        f.unlink()
    (folder / "svhn").rmdir()
    with pytest.raises(DifflabError, match="svhn: folder not found"):
        evaluate_folder(folder, classifier_dir)


def test_the_judges_folder_has_a_model_card(tmp_path):
    from importlib.util import find_spec

    from huggingface_hub import ModelCard

    from difflab.digits.classifier import train_classifiers
    from difflab.digits.data import make_dataset

    make_dataset(tmp_path / "data", n_per_domain=60, n_test_per_domain=20, seed=0)
    track = "tensorboard" if find_spec("tensorboard") else "none"
    train_classifiers(
        tmp_path / "data", tmp_path / "judges", epochs=1, device="cpu", precision="fp32", report_to=track, judge_pool=0
    )
    if track == "tensorboard":
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        (run,) = (tmp_path / "judges" / "logs").iterdir()
        tags = EventAccumulator(str(run)).Reload().Tags()["scalars"]
        assert {"mnistm/held_out_accuracy", "svhn/held_out_accuracy"} <= set(tags)
        assert {f"svhn/{k}" for k in ("loss", "lr", "grad_norm", "step_time_s")} <= set(tags)
    card = ModelCard.load(tmp_path / "judges" / "README.md")
    assert card.data.pipeline_tag == "image-classification" and card.data.library_name == "difflab"
    assert f"--out {tmp_path / 'judges'}" in card.text and "load_classifier" in card.text
