"""The zero-shot evaluation job: classify a labelled image folder and write predictions, metrics and a report."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from difflab.clip.data import ImageFiles, LabeledImages, collate_images, find_labeled_images
from difflab.clip.figures import plot_gallery
from difflab.clip.model import folder_fingerprint, load_clip
from difflab.clip.preprocess import ClipTransform
from difflab.clip.zeroshot import (
    DEFAULT_TEMPLATE,
    ZeroShotClassifier,
    cached_class_embeddings,
    encode_pixels,
    load_templates,
)
from difflab.io import atomic_write, load_rgb, open_run, save_json, write_csv
from difflab.precision import DTYPE_CANDIDATES, Precision, settle_inference
from difflab.report import HtmlReport
from difflab.report.plots import plot_confusion_matrix
from difflab.utils import DifflabError

ARROW = "\u21d2"  # ⇒
# "auto" may encode images in a lower precision whose embeddings are this close to fp32's (relative error).
TOLERANCE = 0.02


@dataclass
class ZeroShotConfig:
    images: Path
    model: Path
    out: Path
    labels: Path | None = None
    templates: str = DEFAULT_TEMPLATE  # one template, "ensemble", or a file with one template per line
    batch_size: int = 64
    num_workers: int = 2
    device: str | None = None
    cache_dir: Path | None = None  # None: <out>/.cache
    gallery_size: int = 5
    skip_bad: bool = False
    precision: Precision = Precision("auto")
    seed: int = 0
    top_k: int = 5
    overwrite: bool = False  # replace the results of an earlier run in `out`


@dataclass
class ZeroShotResult:
    top1: float
    top5: float
    n_images: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    text_cache_hit: bool = False
    report: Path | None = None


def classify_files(classifier: ZeroShotClassifier, data: LabeledImages, cfg: ZeroShotConfig):
    """Run every image through the classifier in DataLoader batches; returns (kept indices, probs) and updates
    `data.skipped` for unreadable images (or fails on the first one without --skip-bad)."""
    loader = DataLoader(
        ImageFiles(data.files, classifier.transform),
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        collate_fn=collate_images,
        pin_memory=classifier.device.type == "cuda",
    )
    kept, probs = [], []
    for images, index, bad in tqdm(loader, desc="zero-shot", unit="batch"):
        for i, err in bad:
            if not cfg.skip_bad:
                raise DifflabError(f"{err} (use --skip-bad to skip such files)")
            data.skipped.append((str(data.files[i]), err.removeprefix(f"{data.files[i]}: ")))
        if images is None:
            continue
        probs.append(classifier.predict(images.to(classifier.device, non_blocking=True), k=1).probs)
        kept.append(index)
    if not probs:
        raise DifflabError(f"{cfg.images}: no readable images")
    return torch.cat(kept), torch.cat(probs)


def topk_accuracy(probs: torch.Tensor, targets: torch.Tensor, k: int) -> float:
    top = probs.topk(min(k, probs.shape[1]), dim=1).indices
    return (top == targets[:, None]).any(dim=1).float().mean().item()


def run_zeroshot(cfg: ZeroShotConfig) -> ZeroShotResult:
    """Classify the folder and write predictions, metrics, figures and report.html into `cfg.out`."""
    data = find_labeled_images(cfg.images, cfg.labels, cfg.skip_bad)
    templates = load_templates(cfg.templates)
    with open_run(cfg.out, "clip zeroshot", overwrite=cfg.overwrite):
        clip = load_clip(cfg.model, cfg.device)
        classifier, cache_hit = zeroshot_classifier_for(clip, data.class_names, templates, cfg)
        kept, probs = classify_files(classifier, data, cfg)
        return write_results(cfg, data, templates, kept, probs, cache_hit)


def zeroshot_classifier_for(clip, names: list[str], templates: list[str], cfg: ZeroShotConfig):
    """The classifier of `names` and whether its class embeddings came from the cache."""
    precision = clip_precision(clip, cfg)
    print(f"precision: {precision.describe()}", flush=True)
    class_embeds, cache_hit = cached_class_embeddings(
        clip.model,
        clip.tokenizer,
        names,
        templates,
        clip.device,
        folder_fingerprint(clip.path),
        cfg.cache_dir or Path(cfg.out) / ".cache",
        precision,
    )
    transform = ClipTransform.from_processor(clip.processor)
    return ZeroShotClassifier(clip.model, names, class_embeds, transform, clip.device, precision), cache_hit


def clip_precision(clip, cfg: ZeroShotConfig) -> Precision:
    """Settle `cfg.precision` on the image encoder's embeddings of a batch of seeded pixels, within TOLERANCE of
    fp32's (the model is shared, so only dtypes are compared, not memory formats)."""
    vision = clip.model.config.vision_config
    shape = (cfg.batch_size, 3, vision.image_size, vision.image_size)
    px = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(clip.device)
    job = f"clip image encoder {vision.hidden_size}x{vision.num_hidden_layers} {vision.image_size}px batch {len(px)}"
    return settle_inference(
        cfg.precision,
        clip.device,
        job,
        lambda: clip.model,
        lambda m, p: encode_pixels(m, px).float(),
        DTYPE_CANDIDATES,
        tolerance=TOLERANCE,
    )


def write_results(cfg: ZeroShotConfig, data, templates: list[str], kept, probs, cache_hit: bool) -> ZeroShotResult:
    """scikit-learn's report, metrics.json, predictions.csv, the confusion matrix, galleries and report.html."""
    from sklearn.metrics import classification_report, confusion_matrix

    out, names = Path(cfg.out), data.class_names
    files = [data.files[i] for i in kept.tolist()]
    targets = torch.tensor(data.targets)[kept]
    k = min(cfg.top_k, len(names))
    topk = probs.topk(k, dim=1)
    preds = topk.indices[:, 0]
    y_true, y_pred = [names[i] for i in targets.tolist()], [names[i] for i in preds.tolist()]
    top1, top5 = topk_accuracy(probs, targets, 1), topk_accuracy(probs, targets, 5)

    report_text = classification_report(y_true, y_pred, digits=4, zero_division=0)
    report_dict = classification_report(y_true, y_pred, digits=4, zero_division=0, output_dict=True)
    atomic_write(out / "classification_report.txt", lambda tmp: Path(tmp).write_text(report_text))
    save_json(
        {
            "top1": top1,
            "top5": top5,
            "n_images": len(files),
            "n_classes": len(names),
            "templates": templates,
            "skipped": [{"file": f, "reason": r} for f, r in data.skipped],
            "report": report_dict,
        },
        out / "metrics.json",
    )
    _write_predictions(out / "predictions.csv", files, y_true, y_pred, topk, names)

    cm = confusion_matrix(targets.numpy(), preds.numpy(), labels=list(range(len(names))))
    cm_path = plot_confusion_matrix(cm, names, out / "confusion_matrix.png")
    galleries = _galleries(files, targets, preds, names, cfg, out)

    html = HtmlReport("CLIP zero-shot classification")
    html.heading("Summary").table(
        ["quantity", "value"],
        [
            ["model", str(cfg.model)],
            ["images", str(cfg.images)],
            ["images classified", len(files)],
            ["classes", len(names)],
            ["templates", len(templates)],
            ["top-1 accuracy", top1],
            ["top-5 accuracy", top5],
            ["images skipped", len(data.skipped)],
        ],
    )
    html.pre("\n".join(templates))
    if data.skipped:
        html.heading("Skipped files").table(["file", "reason"], data.skipped)
    html.heading("Classification report").pre(report_text)
    for title, (path, items) in galleries.items():
        html.heading(title).image(path).table(["file", f"true {ARROW} predicted"], items)
    html.heading("Confusion matrix").image(cm_path)
    report = html.save(out / "report.html")
    return ZeroShotResult(top1, top5, len(files), data.skipped, cache_hit, report)


def _write_predictions(path: Path, files, y_true, y_pred, topk, names) -> None:
    rows = [
        [file.name, t, p, f"{pr[0]:.6f}", ";".join(names[i] for i in idx), ";".join(f"{v:.6f}" for v in pr)]
        for file, t, p, idx, pr in zip(files, y_true, y_pred, topk.indices.tolist(), topk.values.tolist())
    ]
    write_csv(path, ["file", "true", "pred", "pred_prob", "top5", "top5_probs"], rows)


def _galleries(files, targets, preds, names, cfg: ZeroShotConfig, out: Path) -> dict:
    """N correct and N wrong predictions, drawn at random (seeded) so they are not all from the first class."""
    rng = random.Random(cfg.seed)
    correct = (targets == preds).numpy()
    result = {}
    for title, mask, stem in (("Successful cases", correct, "successes"), ("Failed cases", ~correct, "failures")):
        idx = np.flatnonzero(mask).tolist()
        chosen = sorted(rng.sample(idx, min(cfg.gallery_size, len(idx))))
        images = [load_rgb(files[i]) for i in chosen]
        captions = [f"{names[targets[i]]} {ARROW} {names[preds[i]]}" for i in chosen]
        path = plot_gallery(images, captions, out / f"{stem}.png", title=f"{title} (true {ARROW} predicted)")
        result[title] = (path, list(zip([files[i].name for i in chosen], captions)))
    return result
