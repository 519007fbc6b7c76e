"""CLIP grading: scores vs a direct transformers computation, the best-k rule, the scoring job and its errors."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from difflab.utils import DifflabError


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory, save_tiny_clip):
    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny")


@pytest.fixture(scope="module")
def scorer(clip_dir):
    from difflab.clip.score import ClipScorer

    return ClipScorer.from_pretrained(clip_dir, "cpu")


def direct_image_embeds(scorer, images):
    from transformers import CLIPImageProcessorPil

    proc = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    with torch.no_grad():
        out = scorer.model.get_image_features(pixel_values=proc(images=images, return_tensors="pt")["pixel_values"])
    return F.normalize(out.pooler_output, dim=-1)


def direct_text_embeds(scorer, texts):
    tok = scorer.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return F.normalize(scorer.model.get_text_features(**tok).pooler_output, dim=-1)


def test_scores_equal_direct_computation(scorer, random_images):
    gen, refs = random_images(7, seed=1), random_images(3, seed=2)
    g, r = direct_image_embeds(scorer, gen), direct_image_embeds(scorer, refs)
    t = direct_text_embeds(scorer, ["A dog sitting on a beach at sunset."])
    ours_g = scorer.image_embeds(gen)
    torch.testing.assert_close(ours_g, g, atol=1e-5, rtol=1e-4)
    image = scorer.image_score(ours_g, scorer.image_embeds(refs))
    expected_image = torch.stack(
        [100 * torch.stack([F.cosine_similarity(g[i], r[j], dim=0) for j in range(3)]).mean() for i in range(7)]
    )
    torch.testing.assert_close(image, expected_image, atol=1e-3, rtol=0)
    text = scorer.text_score(ours_g, scorer.text_embeds(["A dog sitting on a beach at sunset."]))
    scale = scorer.model.logit_scale.exp().item()
    torch.testing.assert_close(text, scale * F.cosine_similarity(g, t, dim=-1), atol=1e-3, rtol=0)
    assert text.shape == (7,)


def test_text_score_is_the_models_logits_per_image(clip_dir, random_images):
    """The grader's text score is `logits_per_image`: the model's own logit scale, 100 only for released CLIPs."""
    from transformers import CLIPImageProcessorPil

    from difflab.clip.score import ClipScorer

    scorer = ClipScorer.from_pretrained(clip_dir, "cpu")
    assert scorer.text_scale != pytest.approx(100)  # a tiny random CLIP starts at 1 / 0.07
    images, texts = random_images(4, seed=3), ["a red square", "the number seven"]
    proc = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    inputs = scorer.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = scorer.model(**inputs, pixel_values=proc(images=images, return_tensors="pt")["pixel_values"])
    ours = scorer.text_score(scorer.image_embeds(images), scorer.text_embeds(texts))
    torch.testing.assert_close(ours, expected.logits_per_image, atol=1e-3, rtol=1e-4)


def test_select_best_rule():
    from difflab.personalize.grading import select_best

    image = torch.tensor([80.0, 70.0, 90.0, 60.0, 75.0, 85.0])
    text = torch.tensor([30.0, 40.0, 20.0, 40.0, 32.0, 26.0])
    # image + 2.5 * text = 155, 170, 140, 160, 155, 150
    assert select_best(image, text, 3).tolist() == [1, 3, 0]
    assert select_best(image, text, 4).tolist() == [1, 3, 0, 4]  # tie 155: lower index first
    assert select_best(image, text, 2, text_weight=0.0).tolist() == [2, 5]
    assert select_best(image, text, 10).tolist() == [1, 3, 0, 4, 5, 2]
    with pytest.raises(ValueError):
        select_best(image, text[:3], 2)


def make_grading_layout(root, n_gen=7, *, random_images):
    spec = {
        "0": {
            "src_image": "dog",
            "token_name": "<new1>",
            "prompt": ["A <new1> on a beach.", "A <new1> in snow."],
            "prompt_4_clip_eval": ["A dog on a beach.", "A dog in snow."],
            "baseline": [[-100, -100], [101, -100]],
        },
        "1": {
            "src_image": "Revoy",
            "token_name": "<new2>",
            "prompt": ["A house in the style of <new2>."],
            "prompt_4_clip_eval": ["A house in the style of David Revoy."],
            "baseline": [[-100, 101]],
        },
    }
    (root / "input.json").write_text(json.dumps(spec))
    seed = 0
    for key, entry in spec.items():
        (root / "refs" / key).mkdir(parents=True)
        for i, im in enumerate(random_images(3, seed=100 + int(key))):
            im.save(root / "refs" / key / f"{i}.jpg")
        for p in range(len(entry["prompt"])):
            (root / "gen" / key / str(p)).mkdir(parents=True)
            seed += 1
            for n, im in enumerate(random_images(n_gen, seed=seed)):
                im.save(root / "gen" / key / str(p) / f"source{key}_prompt{p}_{n}.png")
    return spec


def test_run_score_job(tmp_path, scorer, clip_dir, assert_images_fit_page, random_images, read_report):
    from difflab.personalize.grading import select_best
    from difflab.personalize.score import run_score

    spec = make_grading_layout(tmp_path, random_images=random_images)
    results = run_score(
        tmp_path / "input.json", tmp_path / "refs", tmp_path / "gen", clip_dir, tmp_path / "out", device="cpu"
    )
    assert [(r.key, r.prompt_idx) for r in results] == [("0", 0), ("0", 1), ("1", 0)]
    assert [r.passed for r in results] == [
        True,
        False,
        False,
    ]  # cosines lie in [-100, 100]: only the first baseline is reachable
    for r in results:
        files = sorted((tmp_path / "gen" / r.key / str(r.prompt_idx)).glob("*.png"))
        gen = direct_image_embeds(scorer, [_open(f) for f in files])
        refs = direct_image_embeds(scorer, [_open(f) for f in sorted((tmp_path / "refs" / r.key).glob("*.jpg"))])
        image = 100 * (gen @ refs.T).mean(1)
        text = (
            scorer.text_scale
            * (gen @ direct_text_embeds(scorer, [spec[r.key]["prompt_4_clip_eval"][r.prompt_idx]]).T)[:, 0]
        )
        best = select_best(image, text, 5)
        assert [f.split("/")[-1] for f in r.selected] == [files[i].name for i in best]
        assert r.image_score == pytest.approx(image[best].mean().item(), abs=1e-3)
        assert r.text_score == pytest.approx(text[best].mean().item(), abs=1e-3)
    rows = list(csv.DictReader(open(tmp_path / "out" / "image_scores.csv")))
    assert len(rows) == 21 and sum(r["selected"] == "True" for r in rows) == 15
    prompts = list(csv.DictReader(open(tmp_path / "out" / "prompt_scores.csv")))
    assert [p["result"] for p in prompts] == ["PASS", "FAIL", "FAIL"]
    assert len(json.loads((tmp_path / "out" / "prompt_scores.json").read_text())["prompts"]) == 3
    check_score_report(
        tmp_path / "out" / "report.html",
        tmp_path / "refs",
        results,
        assert_images_fit_page=assert_images_fit_page,
        read_report=read_report,
    )


def check_score_report(path, refs_dir, results, assert_images_fit_page, read_report):
    """Each prompt's section shows its own concept's reference images, captioned as such, right before its
    selected images, best first."""
    report = read_report(path)
    assert_images_fit_page(report)
    for r in results:
        section = report.section(f"{r.key}/{r.prompt_idx}: ")
        refs = sorted((refs_dir / r.key).glob("*.jpg"))
        shown_refs, shown_picks = section.figures[: len(refs)], section.figures[len(refs) :]
        assert [f.caption for f in shown_refs] == [f"reference: {f.name}" for f in refs]
        for figure, ref in zip(shown_refs, refs):
            np.testing.assert_array_equal(figure.pixels(), np.asarray(_thumbnail(ref)))
        assert [f.caption for f in shown_picks] == [
            f"selected #{k}: {Path(f).name}" for k, f in enumerate(r.selected, 1)
        ]
        for figure, pick in zip(shown_picks, r.selected):
            np.testing.assert_array_equal(figure.pixels(), np.asarray(_thumbnail(pick)))


def _open(path):
    from difflab.io import load_rgb

    return load_rgb(path)


def _thumbnail(path):
    im = _open(path)
    im.thumbnail((192, 192))
    return im


def test_score_input_errors(tmp_path, clip_dir, random_images):
    from difflab.personalize.score import run_score

    spec = make_grading_layout(tmp_path, n_gen=2, random_images=random_images)
    broken = dict(spec)
    broken["0"] = {k: v for k, v in spec["0"].items() if k != "prompt_4_clip_eval"}
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    with pytest.raises(DifflabError, match="missing field 'prompt_4_clip_eval'"):
        run_score(tmp_path / "broken.json", tmp_path / "refs", tmp_path / "gen", clip_dir, tmp_path / "out")
    for f in (tmp_path / "gen" / "1" / "0").iterdir():
        f.unlink()
    with pytest.raises(DifflabError, match=r"gen/1/0: no images"):
        run_score(tmp_path / "input.json", tmp_path / "refs", tmp_path / "gen", clip_dir, tmp_path / "out")
    with pytest.raises(DifflabError, match=r"nope/0: reference image folder not found"):
        run_score(tmp_path / "input.json", tmp_path / "nope", tmp_path / "gen", clip_dir, tmp_path / "out")


def test_score_command(tmp_path, clip_dir, random_images):
    from typer.testing import CliRunner

    from difflab.cli import app

    make_grading_layout(tmp_path, n_gen=6, random_images=random_images)
    res = CliRunner().invoke(
        app,
        [
            "personalize",
            "score",
            "--prompts",
            str(tmp_path / "input.json"),
            "--refs",
            str(tmp_path / "refs"),
            "--gen",
            str(tmp_path / "gen"),
            "--clip",
            str(clip_dir),
            "--out",
            str(tmp_path / "o"),
            "--device",
            "cpu",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "1/3 prompts pass" in res.output and "PASS" in res.output
