"""Grade generated images the way the course does (spec section 4, "Grading").

Per prompt: CLIP image score (to the concept's reference images) and text score (to `prompt_4_clip_eval`) of
every generated image; the 5 images with the highest image + 2.5 x text are kept and their scores averaged;
PASS when both averages reach the prompt's baseline.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from difflab.clip.score import ClipScorer
from difflab.io import image_files, load_rgb, open_run, save_json, write_csv
from difflab.personalize.grading import TEXT_WEIGHT, TOP_K, select_best
from difflab.personalize.prompts import load_input_json
from difflab.report import HtmlReport


@dataclass
class PromptResult:
    key: str
    prompt_idx: int
    eval_prompt: str
    n_images: int
    image_score: float  # mean over the selected images
    text_score: float
    baseline_image: float
    baseline_text: float
    passed: bool
    selected: list[str]  # file paths, best first


def run_score(
    prompts_json: str | os.PathLike,
    refs_dir: str | os.PathLike,
    gen_dir: str | os.PathLike,
    clip_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    device: str | None = None,
    top_k: int = TOP_K,
    scorer: ClipScorer | None = None,
    overwrite: bool = False,
) -> list[PromptResult]:
    """Score `<gen>/<key>/<idx>/*` against `<refs>/<key>/*`; writes image_scores.csv, prompt_scores.csv/.json and
    report.html into `out_dir`. `scorer` reuses an already loaded model (then `clip_path` is not read)."""
    with open_run(out_dir, "personalize score", overwrite=overwrite, staged=True) as run:
        return _run_score(prompts_json, Path(refs_dir), Path(gen_dir), run.dir, device, top_k, scorer, clip_path)


def _run_score(prompts_json, refs_dir: Path, gen_dir: Path, out: Path, device, top_k, scorer, clip_path):
    spec = load_input_json(prompts_json)
    # Check every folder before the (slow) model load, so a typo fails at once.
    refs = {key: image_files(refs_dir / key, "reference image") for key in spec}
    gens = {
        (key, i): image_files(gen_dir / key / str(i), "generated image")
        for key, entry in spec.items()
        for i in range(len(entry["prompt_4_clip_eval"]))
    }
    scorer = scorer or ClipScorer.from_pretrained(clip_path, device)

    results, image_rows = [], []
    ref_embeds = {key: scorer.image_embeds([load_rgb(p) for p in files]) for key, files in refs.items()}
    for (key, i), files in tqdm(gens.items(), desc="scoring prompts", unit="prompt"):
        result, rows = score_prompt(scorer, spec[key], key, i, files, ref_embeds[key], top_k)
        results.append(result)
        image_rows += rows
    write_score_files(out, results, image_rows, top_k, refs)
    return results


IMAGE_HEADER = ["key", "prompt_idx", "file", "image_score", "text_score", "combined", "selected"]
PROMPT_HEADER = ["key", "prompt_idx", "eval_prompt", "n_images", "image_score", "text_score", "baseline_image",
                 "baseline_text", "result"]  # fmt: skip


def score_prompt(scorer, entry: dict, key: str, i: int, files: list[Path], refs: torch.Tensor, top_k: int):
    """The grading of one prompt's images: (PromptResult, one CSV row per image)."""
    gen = scorer.image_embeds([load_rgb(p) for p in files])
    image = scorer.image_score(gen, refs)
    text = scorer.text_score(gen, scorer.text_embeds([entry["prompt_4_clip_eval"][i]]))
    best = select_best(image, text, top_k)
    base_img, base_txt = (float(v) for v in entry["baseline"][i])
    img_mean, txt_mean = image[best].mean().item(), text[best].mean().item()
    passed = img_mean >= base_img and txt_mean >= base_txt
    selected = [str(files[j]) for j in best.tolist()]
    result = PromptResult(key, i, entry["prompt_4_clip_eval"][i], len(files), img_mean, txt_mean, base_img,
                          base_txt, passed, selected)  # fmt: skip
    chosen = set(best.tolist())
    rows = [[key, i, f.name, f"{image[j]:.4f}", f"{text[j]:.4f}", f"{image[j] + TEXT_WEIGHT * text[j]:.4f}",
             j in chosen] for j, f in enumerate(files)]  # fmt: skip
    return result, rows


def write_score_files(
    out: Path, results: list[PromptResult], image_rows: list, top_k: int, refs: dict[str, list[Path]]
) -> None:
    """The CSVs, the JSON summary and report.html; `refs` (concept key -> reference files) is shown in the report
    only."""
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "image_scores.csv", IMAGE_HEADER, image_rows)
    prompt_rows = [[r.key, r.prompt_idx, r.eval_prompt, r.n_images, f"{r.image_score:.4f}", f"{r.text_score:.4f}",
                    r.baseline_image, r.baseline_text, "PASS" if r.passed else "FAIL"] for r in results]  # fmt: skip
    write_csv(out / "prompt_scores.csv", PROMPT_HEADER, prompt_rows)
    summary = {"top_k": top_k, "text_weight": TEXT_WEIGHT, "prompts": [asdict(r) for r in results]}
    save_json(summary, out / "prompt_scores.json")
    _write_report(results, refs, out / "report.html", top_k)


def _write_report(results: list[PromptResult], refs: dict[str, list[Path]], path: Path, top_k: int) -> None:
    html = HtmlReport("CLIP grading of generated images")
    html.text(
        f"Per prompt, the {top_k} images with the highest image + {TEXT_WEIGHT} x text score are averaged; "
        "PASS when both averages reach the baseline. Each prompt shows the reference images its image score "
        "compares to, then the selected images."
    )
    html.table(
        ["concept", "prompt", "eval prompt", "image", "text", "baseline", "result"],
        [
            [
                r.key,
                r.prompt_idx,
                r.eval_prompt,
                r.image_score,
                r.text_score,
                f"{r.baseline_image:g} / {r.baseline_text:g}",
                "PASS" if r.passed else "FAIL",
            ]
            for r in results
        ],
    )
    # Read each concept's references once, though several prompts show them.
    ref_thumbs = {key: [_thumbnail(f) for f in refs[key]] for key in dict.fromkeys(r.key for r in results)}
    for r in results:
        html.heading(f"{r.key}/{r.prompt_idx}: {r.eval_prompt} — {'PASS' if r.passed else 'FAIL'}")
        html.text(f"Reference images of concept {r.key}:")
        for f, im in zip(refs[r.key], ref_thumbs[r.key]):
            html.image(im, caption=f"reference: {Path(f).name}")
        html.text(f"Selected images ({len(r.selected)} of {r.n_images}), best first:")
        for rank, f in enumerate(r.selected, 1):
            html.image(_thumbnail(f), caption=f"selected #{rank}: {Path(f).name}")
    html.save(path)


def _thumbnail(path: str | os.PathLike):
    im = load_rgb(path)
    im.thumbnail((192, 192))
    return im
