"""Grade generated digits the way the course does: label = first character of the file name,
images resized to 28x28, one classifier per domain, score = mean of the two domain accuracies."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np
import typer

from difflab.digits.classifier import classifier_path, load_classifier
from difflab.digits.data import DOMAINS, read_images
from difflab.utils import DifflabError, atomic_write, save_json

DOMAIN_NAMES = {"mnistm": "MNIST-M", "svhn": "SVHN"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def labelled_files(domain_dir: Path) -> tuple[list[Path], np.ndarray]:
    """Image files of one output folder (sorted) and the digit each file name starts with."""
    if not domain_dir.is_dir():
        raise DifflabError(f"{domain_dir}: folder not found (expected generated images <folder>/{domain_dir.name}/*.png)")
    files = sorted(p for p in domain_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DifflabError(f"{domain_dir}: no .png images")
    for p in files:
        if not p.name[0].isdigit() or not p.name[0].isascii():
            raise DifflabError(f"{p}: file name must start with the digit label (e.g. 3_001.png)")
    return files, np.array([int(p.name[0]) for p in files], dtype=np.int64)


def confusion(labels: np.ndarray, preds: np.ndarray) -> np.ndarray:
    """10x10 counts, rows = true digit, columns = predicted digit."""
    return np.bincount(labels * 10 + preds, minlength=100).reshape(10, 10)


def save_confusion_png(matrix: np.ndarray, title: str, path: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.6, 4.2), dpi=100)
    ax = fig.add_subplot()
    ax.imshow(matrix, cmap="Blues")
    for (i, j), v in np.ndenumerate(matrix):
        if v:
            ax.text(j, i, str(v), ha="center", va="center", fontsize=7,
                    color="white" if v > matrix.max() / 2 else "black")
    ax.set(xticks=range(10), yticks=range(10), xlabel="predicted", ylabel="true", title=title)
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def evaluate_folder(folder: str | os.PathLike, classifier_dir: str | os.PathLike,
                    out_dir: str | os.PathLike | None = None, device: str | None = None) -> dict:
    """Classify <folder>/mnistm/*.png and <folder>/svhn/*.png, print the three course lines and write
    per-digit accuracy, confusion matrices (PNG + JSON) and report.html to out_dir (default <folder>/eval)."""
    from difflab.report import HtmlReport

    folder = Path(folder)
    out_dir = Path(out_dir) if out_dir is not None else folder / "eval"
    result: dict = {"folder": str(folder), "classifier_dir": str(classifier_dir), "domains": {}}
    for domain in DOMAINS:
        files, labels = labelled_files(folder / domain)
        model = load_classifier(classifier_path(classifier_dir, domain), device)
        preds = model.predict(read_images(files, resize=True))
        matrix = confusion(labels, preds)
        per_digit = {str(d): (float(matrix[d, d] / matrix[d].sum()) if matrix[d].sum() else None) for d in range(10)}
        result["domains"][domain] = {
            "accuracy": float((preds == labels).mean()), "correct": int((preds == labels).sum()), "total": len(labels),
            "per_digit": per_digit, "confusion": matrix.tolist(),
            "wrong": [{"file": f.name, "label": int(y), "pred": int(p)} for f, y, p in zip(files, labels, preds) if y != p],
        }
    result["accuracy"] = float(np.mean([r["accuracy"] for r in result["domains"].values()]))

    report = HtmlReport(f"Digit accuracy: {folder}")
    report.pre(format_summary(result))
    report.table(["domain"] + [str(d) for d in range(10)],
                 [[DOMAIN_NAMES[dom]] + ["-" if a is None else f"{a:.3f}" for a in r["per_digit"].values()]
                  for dom, r in result["domains"].items()])
    for domain, r in result["domains"].items():
        png = save_confusion_png(np.array(r["confusion"]), f"{DOMAIN_NAMES[domain]} confusion", out_dir / f"confusion_{domain}.png")
        report.image(png, caption=f"{DOMAIN_NAMES[domain]}: rows true digit, columns predicted")
    save_json(result, out_dir / "eval.json")
    report.save(out_dir / "report.html")
    print(format_summary(result))
    for domain, r in result["domains"].items():
        print(f"{DOMAIN_NAMES[domain]} per digit: " + " ".join(
            f"{d}:{'-' if a is None else f'{a:.2f}'}" for d, a in r["per_digit"].items()))
    return result


def format_summary(result: dict) -> str:
    """The three lines the course prints."""
    lines = [f"{DOMAIN_NAMES[dom]} acc = {r['accuracy']:.4f} (correct/total = {r['correct']}/{r['total']})"
             for dom, r in result["domains"].items()]
    return "\n".join(lines + [f"acc = {result['accuracy']:.4f}"])


def evaluate_command(
    folder: Path = typer.Argument(..., help="Generated digits: <folder>/mnistm/*.png and <folder>/svhn/*.png, "
                                            "label = first character of each file name."),
    classifiers: Path = typer.Option(..., "--classifiers", help="Folder with mnistm.safetensors/.json and svhn.safetensors/.json."),
    out: Optional[Path] = typer.Option(None, "--out", help="Where eval.json, confusion PNGs and report.html go (default: <folder>/eval)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: CUDA when available)."),
):
    """Score generated digits with the per-domain classifiers: MNIST-M acc, SVHN acc and their mean."""
    evaluate_folder(folder, classifiers, out, device)
