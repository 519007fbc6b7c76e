"""Grade generated digits the way the course does: label = first character of the file name,
images resized to 28x28, one classifier per domain, score = mean of the two domain accuracies."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from difflab.digits.classifier import FEATURES_FILE, cas_accuracy, check_judges, classifier_path, load_classifier
from difflab.digits.data import DOMAINS, load_split, read_images, split_csv
from difflab.digits.quality import SPACES, QualityConfig, domain_quality
from difflab.io import image_files, load_json, open_run, save_json, save_png, set_card_metrics
from difflab.report.plots import plot_confusion_matrix
from difflab.utils import DifflabError, image_grid

DOMAIN_NAMES = {"mnistm": "MNIST-M", "svhn": "SVHN"}


def labelled_files(domain_dir: Path) -> tuple[list[Path], np.ndarray]:
    """Image files of one output folder (sorted) and the digit each file name starts with."""
    if not domain_dir.is_dir():
        raise DifflabError(
            f"{domain_dir}: folder not found (expected generated images <folder>/{domain_dir.name}/*.png)"
        )
    files = image_files(domain_dir, "generated image")
    for p in files:
        if not p.name[0].isdigit() or not p.name[0].isascii():
            raise DifflabError(f"{p}: file name must start with the digit label (e.g. 3_001.png)")
    return files, np.array([int(p.name[0]) for p in files], dtype=np.int64)


def confusion(labels: np.ndarray, preds: np.ndarray) -> np.ndarray:
    """10x10 counts, rows = true digit, columns = predicted digit."""
    return np.bincount(labels * 10 + preds, minlength=100).reshape(10, 10)


def quality_data_root(classifier_dir: str | os.PathLike, data_root: str | os.PathLike | None) -> Path | None:
    """The dataset to compare with: `data_root`, else the one the judges were trained on (from their JSON);
    None when it has no held-out split on this machine."""
    if data_root is None:
        meta = load_json(classifier_path(classifier_dir, DOMAINS[0]).with_suffix(".json"))
        data_root = meta.get("data_root") if isinstance(meta, dict) else None
    if data_root is None:
        return None
    try:
        if all(split_csv(data_root, d, "val").is_file() for d in DOMAINS):
            return Path(data_root)
    except DifflabError:  # no such dataset here: accuracy alone is still worth reporting
        pass
    return None


def evaluate_folder(
    folder: str | os.PathLike,
    classifier_dir: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    device: str | None = None,
    data_root: str | os.PathLike | None = None,
    overwrite: bool = False,
    model_dir: str | os.PathLike | None = None,
) -> dict:
    """Classify <folder>/mnistm/*.png and <folder>/svhn/*.png, print the three course lines and write
    per-digit accuracy, confusion matrices, quality measures against the real data (see `quality`),
    metrics.json and report.html to out_dir (default <folder>/eval), moved in once all are written; an earlier
    evaluation there is replaced only with `overwrite`. Figures are named relative to out_dir."""

    folder = Path(folder)
    out_dir = Path(out_dir) if out_dir is not None else folder / "eval"
    with open_run(out_dir, "digits evaluate", overwrite=overwrite, staged=True) as run:
        result = _evaluate(folder, classifier_dir, run.dir, device, data_root)
    if model_dir is not None:
        set_card_metrics(model_dir, "unconditional-image-generation", card_metrics(result))
    return result


def card_metrics(result: dict) -> dict[str, float]:
    """The numbers a model card lists: accuracy (mean and per domain), and per domain, when measured, FID and recall
    over their floors in both feature spaces, CAS over its real reference and the memorisation rate."""
    metrics = {"accuracy": result["accuracy"]}
    for domain, r in result["domains"].items():
        metrics[f"accuracy_{domain}"] = r["accuracy"]
        q = r.get("quality")
        if q:
            for space, d in q["distribution"].items():
                if space in SPACES:
                    metrics[f"fid_ratio_{space}_{domain}"] = d["generated"]["fid"] / d["floor"]["fid"]
                    metrics[f"recall_ratio_{space}_{domain}"] = d["generated"]["recall"] / d["floor"]["recall"]
            if q["cas"].get("ratio") is not None:
                metrics[f"cas_ratio_{domain}"] = q["cas"]["ratio"]
            metrics[f"memorisation_{domain}"] = q["memorisation_rate"]
            metrics[f"copies_{domain}"] = q["copy_rate"]
    return {k: round(float(v), 4) for k, v in metrics.items()}


def _evaluate(folder: Path, classifier_dir, out_dir: Path, device, data_root) -> dict:
    check_judges(classifier_dir)
    real_root = quality_data_root(classifier_dir, data_root)
    result: dict = {
        "folder": str(folder),
        "classifier_dir": str(classifier_dir),
        "domains": {},
        "quality_data_root": str(real_root) if real_root else None,
    }
    feature_net = None if real_root is None else load_classifier(classifier_path(classifier_dir, FEATURES_FILE), device)
    for domain in DOMAINS:
        result["domains"][domain] = judge_domain(
            folder / domain, classifier_dir, domain, device, feature_net, real_root, out_dir
        )
    result["accuracy"] = float(np.mean([r["accuracy"] for r in result["domains"].values()]))

    write_eval_report(result, out_dir)
    print(format_summary(result))
    for domain, r in result["domains"].items():
        print(
            f"{DOMAIN_NAMES[domain]} per digit: "
            + " ".join(f"{d}:{'-' if a is None else f'{a:.2f}'}" for d, a in r["per_digit"].items())
        )
    print(format_quality(result))
    return result


def judge_domain(
    domain_dir: Path, classifier_dir, domain: str, device, feature_net, real_root: Path | None, out_dir: Path
) -> dict:
    """Accuracy, per-digit accuracy, confusion matrix (and its PNG) and, with `real_root` (and the independent
    `feature_net`), the quality measures of one domain."""
    files, labels = labelled_files(domain_dir)
    model = load_classifier(classifier_path(classifier_dir, domain), device)
    images = read_images(files, resize=True)
    preds = model.predict(images)
    matrix = confusion(labels, preds)
    png = plot_confusion_matrix(
        matrix,
        [str(d) for d in range(10)],
        out_dir / f"confusion_{domain}.png",
        title=f"{DOMAIN_NAMES[domain]} confusion",
    )
    result = {
        "accuracy": float((preds == labels).mean()),
        "correct": int((preds == labels).sum()),
        "total": len(labels),
        "per_digit": {str(d): (float(matrix[d, d] / matrix[d].sum()) if matrix[d].sum() else None) for d in range(10)},
        "confusion": matrix.tolist(),
        "confusion_png": png.name,
        "wrong": [{"file": f.name, "label": int(y), "pred": int(p)} for f, y, p in zip(files, labels, preds) if y != p],
    }
    if real_root is not None:
        cas_real = load_json(classifier_path(classifier_dir, domain).with_suffix(".json"))["cas_real"]
        result["quality"] = _quality(model, feature_net, cas_real, images, labels, files, real_root, domain, out_dir)
    return result


def write_eval_report(result: dict, out_dir: Path) -> Path:
    from difflab.report import HtmlReport

    report = HtmlReport(f"Digit accuracy: {result['folder']}")
    report.pre(format_summary(result))
    report.table(
        ["domain"] + [str(d) for d in range(10)],
        [
            [DOMAIN_NAMES[dom]] + ["-" if a is None else f"{a:.3f}" for a in r["per_digit"].values()]
            for dom, r in result["domains"].items()
        ],
    )
    for domain, r in result["domains"].items():
        caption = f"{DOMAIN_NAMES[domain]}: rows true digit, columns predicted"
        report.image(str(out_dir / r["confusion_png"]), caption=caption)
    add_quality_section(report, result, out_dir)
    save_json(result, out_dir / "metrics.json")
    return report.save(out_dir / "report.html")


def _quality(
    judge, feature_net, cas_real: dict, images, labels, files: list[Path], real_root: Path, domain: str, out_dir: Path
) -> dict:
    train, _ = load_split(real_root, domain, "train")
    heldout, heldout_labels = load_split(real_root, domain, "val")
    quality = domain_quality(judge, feature_net, images, labels, train, heldout, heldout_labels, QualityConfig())
    quality["cas"] = _cas(judge, cas_real, images, labels, heldout, heldout_labels, domain)
    pairs = quality["closest_pairs"]
    tiles = np.concatenate([images[[p["generated"] for p in pairs]], train[[p["train"] for p in pairs]]])
    quality["closest_png"] = save_png(image_grid(tiles, 2, len(pairs)), out_dir / f"closest_{domain}.png").name
    for p in pairs:
        p["generated_file"] = files[p["generated"]].name
    return quality


def _cas(judge, reference: dict, images, labels, heldout, heldout_labels, domain: str) -> dict:
    """CAS of the generated digits beside the real reference the judges were trained with."""
    if reference["accuracy"] is None:
        return {"skipped": f"skipped: the judges' training split had fewer than {reference['images'] // 10} of a digit"}
    device = judge.head[-1].weight.device
    generated = cas_accuracy(images, labels, heldout, heldout_labels, domain, judge.config.width, device, 0)
    if generated is None:
        return {"skipped": f"skipped: CAS trains on {reference['images'] // 10} generated images of every digit"}
    return {"generated": generated, "real": reference["accuracy"], "ratio": generated / reference["accuracy"]}


def quality_rows(q: dict, accuracy: float) -> list[list[str]]:
    """Each measure of one domain beside its floor: [measure, generated, real (floor), generated / real]."""
    ratio = lambda a, b: f"{a / b:.2f}x" if b else "-"  # noqa: E731
    real_accuracy = q["heldout_accuracy"]
    rows = [["judge accuracy", f"{accuracy:.4f}", f"{real_accuracy:.4f}", ratio(accuracy, real_accuracy)]]
    dist = q["distribution"]
    if "skipped" in dist:
        rows.append(["distribution measures", dist["skipped"], "", ""])
    for space in SPACES if "skipped" not in dist else ():
        g, f = dist[space]["generated"], dist[space]["floor"]
        rows.append([f"FID ({space})", f"{g['fid']:.2f}", f"{f['fid']:.2f}", ratio(g["fid"], f["fid"])])
        rows.append(
            [f"KID ({space})", f"{g['kid']:.4f} ± {g['kid_std']:.4f}", f"{f['kid']:.4f} ± {f['kid_std']:.4f}", ""]
        )
        for name in ("precision", "recall", "density", "coverage"):
            rows.append([f"{name} ({space})", f"{g[name]:.3f}", f"{f[name]:.3f}", ratio(g[name], f[name])])
    cas = q["cas"]
    if "skipped" in cas:
        rows.append(["CAS", cas["skipped"], "", ""])
    else:
        rows.append(["CAS", f"{cas['generated']:.4f}", f"{cas['real']:.4f}", f"{cas['ratio']:.2f}x"])
    rows.append(["memorisation", f"{100 * q['memorisation_rate']:.1f} %", "5.0 %", ""])
    rows.append(["copies", f"{100 * q['copy_rate']:.1f} %", "5.0 %", ""])
    rows.append(["diversity (judge features)", diversity_text(q), "1.00 x real", ""])
    return rows


def format_quality(result: dict) -> str:
    """Per domain, each measure beside its floor, as an aligned text table."""
    blocks = []
    for domain, r in result["domains"].items():
        q = r.get("quality")
        if q is None:
            continue
        rows = [["measure", "generated", "real (floor)", "ratio"]] + quality_rows(q, r["accuracy"])
        measured = [row for row in rows if row[2]]  # a skipped measure's reason runs on past the columns
        widths = [max(len(row[i]) for row in measured) for i in range(3)]
        title = f"{DOMAIN_NAMES[domain]}: {q['n_generated']} generated, {q['n_heldout']} real held-out images"
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths + [0])).rstrip() for row in rows]
        blocks.append("\n".join([title] + lines))
    if not blocks:
        return (
            "quality measures skipped: the judges' dataset (with its held-out split) is not here; "
            "pass --data-root to compare with real images"
        )
    return "\n\n".join(blocks)


def diversity_text(quality: dict) -> str:
    ratio = quality["diversity_ratio"]
    if ratio is None:
        return "not measurable (it needs at least 2 images of a digit in both the generated and held-out sets)"
    return f"{ratio:.2f} x real"


def add_quality_section(report, result: dict, eval_dir: Path) -> None:
    report.heading("Quality beyond accuracy")
    measured = {d: r["quality"] for d, r in result["domains"].items() if "quality" in r}
    if not measured:
        report.text(format_quality(result))
        return
    report.text(
        "Each measure of the generated digits beside its floor: the same measure for as many real training digits, "
        "against the same real held-out digits. FID and KID (torchmetrics), precision, recall, density and "
        "coverage (prdc, k = 3) in two feature spaces: the judge's penultimate features, and those of an "
        "independent network of another architecture and seed, trained on real digits only. CAS: a judge-shaped "
        "classifier trained only on generated digits, read on the real held-out ones, beside one trained on as many "
        "real digits. Memorisation: generated images whose nearest training image (pixel L2) is closer than the 5th "
        "percentile of held-out-to-training distances (5 % for real unseen images). Copies: those much nearer one "
        "training image than the next (nearest over second-nearest distance below the held-out images' 5th "
        "percentile), which a pale image near every training image is not. Diversity: mean pairwise judge "
        "feature distance within each digit, generated over real held-out. The judge's accuracy on the real "
        "held-out digits is what a generator as good as the data would score."
    )
    for d, q in measured.items():
        report.heading(DOMAIN_NAMES[d], level=3)
        rows = quality_rows(q, result["domains"][d]["accuracy"])
        report.table(["measure", "generated", "real (floor)", "ratio"], rows)
        report.image(
            str(eval_dir / q["closest_png"]),
            f"{DOMAIN_NAMES[d]}: the generated images closest to a training image (top) and that training image "
            "(bottom)",
            width=480,
        )


def format_summary(result: dict) -> str:
    """The three lines the course prints."""
    lines = [
        f"{DOMAIN_NAMES[dom]} acc = {r['accuracy']:.4f} (correct/total = {r['correct']}/{r['total']})"
        for dom, r in result["domains"].items()
    ]
    return "\n".join(lines + [f"acc = {result['accuracy']:.4f}"])
