"""CLIP zero-shot: preprocessing, predictions vs transformers' pipeline, report vs scikit-learn, cache, bad
input, CLI."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from difflab.utils import DifflabError

CLASSES = {"0": "willow_tree", "1": "apple", "2": "sea", "3": "pickup_truck", "4": "bee", "5": "cloud"}


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory, save_tiny_clip):
    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny")


@pytest.fixture(scope="module")
def clip(clip_dir):
    from difflab.clip.model import load_clip

    return load_clip(clip_dir, "cpu")


def make_flat_folder(root: Path, per_class: int = 3, *, random_images) -> tuple[Path, Path]:
    images = root / "val"
    images.mkdir(parents=True)
    pics = iter(random_images(len(CLASSES) * per_class, seed=1))
    for cid in CLASSES:
        for i in range(per_class):
            next(pics).save(images / f"{cid}_{i}.png")
    labels = root / "id2label.json"
    labels.write_text(json.dumps(CLASSES))
    return images, labels


def zs_config(images, labels, clip_dir, out, **kw):
    from difflab.clip.evaluate import ZeroShotConfig

    return ZeroShotConfig(
        images=images, labels=labels, model=clip_dir, out=out, num_workers=0, device="cpu", batch_size=4, **kw
    )


def test_preprocessing_matches_processor(random_images):
    from transformers import CLIPImageProcessorPil

    from difflab.clip.preprocess import ClipTransform

    for proc in (
        CLIPImageProcessorPil(),
        CLIPImageProcessorPil(size={"shortest_edge": 20}, crop_size={"height": 24, "width": 24}),
    ):
        t = ClipTransform.from_processor(proc)
        images = random_images(6, seed=3)
        ours = t.normalize(torch.stack([t(im) for im in images]))
        ref = proc(images=images, return_tensors="pt")["pixel_values"]
        assert ours.shape == ref.shape
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_predictions_equal_transformers_pipeline(clip, random_images):
    from transformers import pipeline

    from difflab.clip.zeroshot import readable_name, zeroshot_classifier

    names = list(CLASSES.values())
    clf = zeroshot_classifier(
        clip.model, names, ["A photo of {}."], tokenizer=clip.tokenizer, processor=clip.processor, device="cpu"
    )
    images = random_images(5, seed=7)
    pred = clf.predict(images)
    pipe = pipeline(
        "zero-shot-image-classification",
        model=clip.model,
        tokenizer=clip.tokenizer,
        image_processor=clip.processor,
        device="cpu",
    )
    labels = [readable_name(n) for n in names]
    for b, im in enumerate(images):
        out = pipe(im, candidate_labels=labels, hypothesis_template="A photo of {}.")
        ref = torch.tensor([next(o["score"] for o in out if o["label"] == lab) for lab in labels])
        torch.testing.assert_close(pred.probs[b], ref, atol=1e-5, rtol=1e-4)
        assert labels[pred.top1[b]] == out[0]["label"]
    assert len(set(pred.top1.tolist())) > 1, "random model should not predict one class for all images"


def test_ensemble_top5_equals_direct_computation(clip, random_images):
    from difflab.clip.zeroshot import ENSEMBLE_TEMPLATES, zeroshot_classifier

    names = list(CLASSES.values())
    clf = zeroshot_classifier(
        clip.model, names, ENSEMBLE_TEMPLATES, tokenizer=clip.tokenizer, processor=clip.processor, device="cpu"
    )
    images = random_images(4, seed=11)
    pixels = clip.processor(images=images, return_tensors="pt")["pixel_values"]
    pred = clf.predict(pixels, k=5)
    with torch.no_grad():
        img = F.normalize(clip.model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        per_class = []
        for n in names:
            tok = clip.tokenizer(
                [t.format(n.replace("_", " ")) for t in ENSEMBLE_TEMPLATES], padding=True, return_tensors="pt"
            )
            txt = F.normalize(clip.model.get_text_features(**tok).pooler_output, dim=-1)
            per_class.append(F.normalize(txt.mean(0), dim=0))
        probs = (clip.model.logit_scale.exp() * img @ torch.stack(per_class).T).softmax(-1)
    torch.testing.assert_close(pred.probs, probs, atol=1e-5, rtol=1e-4)
    assert torch.equal(pred.topk, probs.topk(5, dim=1).indices)


def test_templates_parsing(tmp_path):
    from difflab.clip.zeroshot import ENSEMBLE_TEMPLATES, load_templates

    assert load_templates("ensemble") == list(ENSEMBLE_TEMPLATES) and len(ENSEMBLE_TEMPLATES) >= 18
    f = tmp_path / "t.txt"
    f.write_text("a {}.\n\nan image of {}\n")
    assert load_templates(str(f)) == ["a {}.", "an image of {}"]
    with pytest.raises(DifflabError, match="exactly one"):
        load_templates("no placeholder")


def test_report_matches_sklearn_and_cache(tmp_path, clip_dir, assert_images_fit_page, random_images, read_report):
    from sklearn.metrics import classification_report

    from difflab.clip.evaluate import run_zeroshot

    images, labels = make_flat_folder(tmp_path, random_images=random_images)
    cache = tmp_path / "cache"
    res = run_zeroshot(zs_config(images, labels, clip_dir, tmp_path / "out", cache_dir=cache))
    assert not res.text_cache_hit and res.n_images == 18
    out = tmp_path / "out"
    for name in (
        "predictions.csv",
        "metrics.json",
        "classification_report.txt",
        "confusion_matrix.png",
        "successes.png",
        "failures.png",
        "report.html",
    ):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert len(rows) == 18
    assert all(r["true"] == CLASSES[r["file"].split("_")[0]] for r in rows)
    y_true, y_pred = [r["true"] for r in rows], [r["pred"] for r in rows]
    expected = classification_report(y_true, y_pred, digits=4, zero_division=0)
    assert (out / "classification_report.txt").read_text() == expected
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["top1"] == pytest.approx(np.mean([t == p for t, p in zip(y_true, y_pred)]))
    assert metrics["top5"] == pytest.approx(np.mean([r["true"] in r["top5"].split(";") for r in rows]))
    assert all(r["top5"].split(";")[0] == r["pred"] for r in rows)
    report = read_report(out / "report.html")
    assert_images_fit_page(report)
    for heading in ("Successful cases", "Failed cases", "Confusion matrix"):
        (figure,) = report.section(heading).figures
        # Figures are smoothed, not pixelated, when the page scales them: their text stays readable.
        assert "px" not in figure.classes.split()

    # Same model, classes and templates: cached text features; new templates: recomputed.
    assert run_zeroshot(zs_config(images, labels, clip_dir, tmp_path / "out2", cache_dir=cache)).text_cache_hit
    changed = run_zeroshot(
        zs_config(images, labels, clip_dir, tmp_path / "out3", cache_dir=cache, templates="ensemble")
    )
    assert not changed.text_cache_hit
    assert len(list(cache.glob("*.safetensors"))) == 2
    # Cached features give the same predictions as fresh ones.
    again = list(csv.DictReader(open(tmp_path / "out2" / "predictions.csv")))
    assert [r["pred"] for r in again] == y_pred


def test_gallery_wraps_to_fit_the_report(tmp_path, random_images):
    """Ten images make two rows of five no wider than the report's 1100 px text column, so the browser shows the
    figure unscaled; long captions are wrapped within their cell."""
    from PIL import Image

    from difflab.clip.figures import MAX_COLS, plot_gallery

    caption = "aquarium_fish \N{RIGHTWARDS ARROW} sweet_pepper"
    row = Image.open(plot_gallery(random_images(5), [caption] * 5, tmp_path / "row.png", title="t")).size
    rows = Image.open(plot_gallery(random_images(10), [caption] * 10, tmp_path / "rows.png", title="t")).size
    few = Image.open(plot_gallery(random_images(2), [caption] * 2, tmp_path / "few.png")).size
    assert MAX_COLS == 5
    assert 800 <= row[0] <= 1080 and 800 <= rows[0] <= 1080
    assert rows[1] > 1.7 * row[1]  # a second row, not a wider figure
    assert few[0] < row[0] / 2
    assert Image.open(plot_gallery([], [], tmp_path / "none.png")).size[0] < 400


def test_cached_features_invalidated_when_weights_change(tmp_path, clip, save_tiny_clip):
    from difflab.clip.model import folder_fingerprint
    from difflab.clip.zeroshot import cached_class_embeddings

    model_dir = save_tiny_clip(tmp_path / "m", with_tokenizer=False, with_processor=False)
    names = ["cat", "dog"]
    first, hit = cached_class_embeddings(
        clip.model, clip.tokenizer, names, ["a {}"], clip.device, folder_fingerprint(model_dir), tmp_path / "c"
    )
    assert not hit
    assert cached_class_embeddings(
        clip.model, clip.tokenizer, names, ["a {}"], clip.device, folder_fingerprint(model_dir), tmp_path / "c"
    )[1]
    save_tiny_clip(model_dir, with_tokenizer=False, with_processor=False, seed=1)  # rewrites the weights
    assert not cached_class_embeddings(
        clip.model, clip.tokenizer, names, ["a {}"], clip.device, folder_fingerprint(model_dir), tmp_path / "c"
    )[1]


def test_class_subfolders_and_missing_tokenizer(tmp_path, random_images, save_tiny_clip):
    from difflab.clip.evaluate import run_zeroshot

    model_dir = save_tiny_clip(tmp_path / "bare", with_tokenizer=False, with_processor=False)
    pics = iter(random_images(6, seed=2))
    for name in ("maple_tree", "rocket", "bowl"):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for i in range(2):
            next(pics).save(tmp_path / "imgs" / name / f"{i}.jpg")
    res = run_zeroshot(zs_config(tmp_path / "imgs", None, model_dir, tmp_path / "out", gallery_size=2))
    assert res.n_images == 6
    rows = list(csv.DictReader(open(tmp_path / "out" / "predictions.csv")))
    assert sorted({r["true"] for r in rows}) == ["bowl", "maple_tree", "rocket"]


def test_bad_inputs(tmp_path, clip_dir, random_images):
    from difflab.clip.evaluate import run_zeroshot
    from difflab.clip.model import load_clip

    images, labels = make_flat_folder(tmp_path, per_class=2, random_images=random_images)
    random_images(1)[0].save(images / "99_0.png")  # class id not in id2label.json
    with pytest.raises(DifflabError, match="99_0.png: class id '99' is not in"):
        run_zeroshot(zs_config(images, labels, clip_dir, tmp_path / "o"))
    (images / "3_9.png").write_bytes(b"not a png")
    with pytest.raises(DifflabError, match="3_9.png: not a readable image"):
        (images / "99_0.png").unlink()
        run_zeroshot(zs_config(images, labels, clip_dir, tmp_path / "o"))
    random_images(1)[0].save(images / "99_0.png")
    res = run_zeroshot(zs_config(images, labels, clip_dir, tmp_path / "o", skip_bad=True))
    assert res.n_images == 12
    assert sorted(Path(f).name for f, _ in res.skipped) == ["3_9.png", "99_0.png"]
    assert len(json.loads((tmp_path / "o" / "metrics.json").read_text())["skipped"]) == 2

    (tmp_path / "empty").mkdir()
    with pytest.raises(DifflabError, match="no images found"):
        run_zeroshot(zs_config(tmp_path / "empty", labels, clip_dir, tmp_path / "o"))
    with pytest.raises(DifflabError, match="needs --labels"):
        run_zeroshot(zs_config(images, None, clip_dir, tmp_path / "o"))

    not_clip = tmp_path / "bert"
    not_clip.mkdir()
    (not_clip / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(DifflabError, match="model_type 'bert'"):
        load_clip(not_clip, "cpu")
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text((clip_dir / "config.json").read_text())
    with pytest.raises(DifflabError, match="no weights found"):
        load_clip(partial, "cpu")
    from safetensors.torch import load_file, save_file

    weights = {k: v for k, v in load_file(clip_dir / "model.safetensors").items() if "visual_projection" not in k}
    save_file(weights, partial / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(DifflabError, match="weights lack 1 CLIP tensors, e.g. visual_projection.weight"):
        load_clip(partial, "cpu")
    (partial / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(DifflabError, match="could not load the CLIPModel"):
        load_clip(partial, "cpu")
    with pytest.raises(DifflabError, match="config.json missing"):
        load_clip(tmp_path / "empty", "cpu")
    with pytest.raises(DifflabError, match="not found"):
        load_clip(tmp_path / "nowhere", "cpu")


def test_cli_end_to_end(tmp_path, clip_dir, random_images):
    from typer.testing import CliRunner

    from difflab.cli import app

    images, labels = make_flat_folder(tmp_path, per_class=2, random_images=random_images)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        [
            "clip",
            "zeroshot",
            "--images",
            str(images),
            "--labels",
            str(labels),
            "--model",
            str(clip_dir),
            "--out",
            str(out),
            "--num-workers",
            "1",
            "--batch-size",
            "5",
            "--device",
            "cpu",
            "--templates",
            "ensemble",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "top-1 acc" in result.output and "report.html" in result.output
    assert (out / "report.html").stat().st_size > 1000
    assert len(list(csv.DictReader(open(out / "predictions.csv")))) == 12
    assert (out / ".cache").is_dir()
    bad = CliRunner().invoke(
        app,
        [
            "clip",
            "zeroshot",
            "--images",
            str(tmp_path / "missing"),
            "--labels",
            str(labels),
            "--model",
            str(clip_dir),
            "--out",
            str(out),
        ],
    )
    assert isinstance(bad.exception, DifflabError) and "image folder not found" in str(bad.exception)


class Payload:
    def __reduce__(self):  # what a malicious .bin would run on an unsafe load
        return (print, ("payload ran",))


def test_a_pickled_payload_in_the_weights_is_refused_in_the_safe_readers_words(clip_dir, tmp_path, capsys):
    import shutil

    from difflab.clip.model import load_clip

    folder = tmp_path / "clip"
    shutil.copytree(clip_dir, folder)
    state = {k: v for k, v in load_clip(clip_dir, "cpu").model.state_dict().items()}
    (folder / "model.safetensors").unlink()
    torch.save({**state, "x": Payload()}, folder / "pytorch_model.bin")
    with pytest.raises(DifflabError) as info:
        load_clip(folder, "cpu")
    message = str(info.value)
    assert "could not load the CLIPModel" in message and "\n" not in message
    assert "weights_only" not in message and "pickled Python object" in message
    assert "payload ran" not in capsys.readouterr().out
    with pytest.raises(DifflabError, match="is a file; --model takes a CLIP model folder"):
        load_clip(folder / "config.json", "cpu")
