"""Labelled image folders for zero-shot evaluation, and a Dataset that decodes them in DataLoader workers.

Two layouts:
- flat: `<classid>_<idx>.png` files + an `id2label.json` mapping class id -> class name (every class in the
  JSON is a candidate, even one without images);
- class sub-folders (ImageFolder style): `<dir>/<class>/*.png`; the folder name is the class name, or a class id
  looked up in `id2label.json` when one is given.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

from difflab.clip.preprocess import ClipTransform
from difflab.io import image_files, load_json, load_rgb
from difflab.utils import DifflabError


@dataclass
class LabeledImages:
    files: list[Path]
    targets: list[int]  # index into class_names
    class_names: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)


def _sort_ids(ids) -> list[str]:
    # Numeric ids in numeric order (2 before 10), anything else after, alphabetically.
    return sorted(ids, key=lambda s: (0, int(s), "") if s.isdigit() else (1, 0, s))


def load_id2label(path: str | os.PathLike) -> dict[str, str]:
    data = load_json(path)
    if not isinstance(data, dict) or not data:
        raise DifflabError(f"{path}: expected a non-empty JSON object mapping class id to class name")
    bad = [k for k, v in data.items() if not isinstance(v, str) or not v.strip()]
    if bad:
        raise DifflabError(f"{path}: class id {bad[0]!r} has no class name (values must be non-empty strings)")
    return {str(k): v for k, v in data.items()}


def find_labeled_images(
    images_dir: str | os.PathLike, labels: str | os.PathLike | None = None, skip_bad: bool = False
) -> LabeledImages:
    """Discover the images and their classes; files that cannot be labelled fail, or are skipped with `skip_bad`."""
    root = Path(images_dir)
    if not root.is_dir():
        raise DifflabError(f"{root}: image folder not found")
    id2label = load_id2label(labels) if labels is not None else None
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    flat = image_files(root, what=None)
    if flat or not subdirs:
        if not flat:
            raise DifflabError(f"{root}: no images found (expected <classid>_<idx>.png files or class sub-folders)")
        if id2label is None:
            raise DifflabError(f"{root}: flat <classid>_<idx>.png layout needs --labels id2label.json")
        ids = _sort_ids(id2label)
        index = {cid: i for i, cid in enumerate(ids)}
        pairs = [(f, f.name.split("_", 1)[0] if "_" in f.stem else None) for f in flat]
        class_names = [id2label[c] for c in ids]
        problem = {None: "file name is not <classid>_<idx>"}
    else:
        names = [d.name for d in subdirs]
        if id2label is not None:
            ids = _sort_ids(id2label)
            index = {cid: i for i, cid in enumerate(ids)}
            class_names = [id2label[c] for c in ids]
        else:
            index = {n: i for i, n in enumerate(names)}
            class_names = names
        pairs = [(f, d.name) for d in subdirs for f in image_files(d, what=None)]
        if not pairs:
            raise DifflabError(f"{root}: class sub-folders hold no images")
        problem = {}

    files, targets, skipped = [], [], []
    for f, cid in pairs:
        if cid in index:
            files.append(f)
            targets.append(index[cid])
            continue
        reason = problem.get(cid) or f"class id {cid!r} is not in {labels}"
        if not skip_bad:
            raise DifflabError(f"{f}: {reason} (use --skip-bad to skip such files)")
        skipped.append((str(f), reason))
    if not files:
        raise DifflabError(f"{root}: none of the {len(pairs)} images could be labelled")
    return LabeledImages(files, targets, class_names, skipped)


class ImageFiles(Dataset):
    """Yields (uint8 image, index, error message); a bad file yields an empty image and its error instead of raising
    inside a worker, so the main process can fail with one clear line or skip it."""

    def __init__(self, files: list[Path], transform: ClipTransform):
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        try:
            return self.transform(load_rgb(self.files[i])), i, ""
        except DifflabError as e:
            return torch.empty(0, dtype=torch.uint8), i, str(e)


def collate_images(items):
    """Stack the good images; bad ones come back as (index, message) pairs."""
    good = [(x, i) for x, i, err in items if not err]
    bad = [(i, err) for _, i, err in items if err]
    images = torch.stack([x for x, _ in good]) if good else None
    return images, torch.tensor([i for _, i in good], dtype=torch.long), bad
