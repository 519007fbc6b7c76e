"""Personalized generation on a tiny random Stable Diffusion: layout, per-image seeds, learned tokens,
best-of-N, CLI."""

import csv

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.io import save_json
from difflab.personalize.generate import (
    GenerateConfig,
    encode_prompt,
    generate,
    generate_one,
    image_path,
    image_seed,
    sample,
    set_scheduler,
)
from difflab.utils import DifflabError

CFG = GenerateConfig(per_prompt=3, steps=2, batch_size=2, height=64, width=64)
TWO_TOKENS = "a <new1> in a city in a style of <new2>"
SPEC = {
    "0": {
        "src_image": "dog",
        "token_name": "<new1>",
        "prompt": [TWO_TOKENS, "a <new1> on a beach"],
        "prompt_4_clip_eval": ["a dog in a city in a style of David Revoy", "a dog on a beach"],
        "baseline": [[79, 34], [74, 35]],
    },
    "1": {
        "src_image": "David Revoy",
        "token_name": "<new2>",
        "prompt": ["a lighthouse in the style of <new2>"],
        "prompt_4_clip_eval": ["a lighthouse in the style of David Revoy"],
        "baseline": [[70, 30]],
    },
}


@pytest.fixture(scope="module")
def sd(tmp_path_factory, tiny_sd):
    """A tiny SD saved as a diffusers folder, two learned-embedding files, and the pipeline with both loaded."""

    from difflab.personalize.embeddings import load_embeddings, save_embeddings

    root = tmp_path_factory.mktemp("sd")
    pipe = tiny_sd(seed=0)
    pipe.save_pretrained(root / "model")
    torch.manual_seed(1)
    embeds = [save_embeddings(root / f"new{i}.safetensors", {f"<new{i}>": torch.randn(1, 32)}) for i in (1, 2)]
    load_embeddings(pipe, embeds)
    pipe.set_progress_bar_config(disable=True)
    return pipe, root / "model", embeds


def pixels(path_or_image) -> np.ndarray:
    im = Image.open(path_or_image) if not isinstance(path_or_image, Image.Image) else path_or_image
    return np.asarray(im.convert("RGB")).astype(int)


def test_writes_exactly_the_course_layout(sd, tmp_path):
    pipe, _, _ = sd
    generate(pipe, SPEC, tmp_path, CFG)
    expected = {f"{k}/{i}/source{k}_prompt{i}_{n}.png" for k, i in [("0", 0), ("0", 1), ("1", 0)] for n in range(3)}
    written = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.png")}
    assert written == expected
    assert (tmp_path / "report.html").stat().st_size > 1000
    assert pixels(tmp_path / "0/0/source0_prompt0_0.png").shape == (64, 64, 3)


def test_single_image_regenerates_alone(sd, tmp_path):
    pipe, _, _ = sd
    one_prompt = {"0": dict(SPEC["0"], prompt=[TWO_TOKENS]), "1": SPEC["1"]}
    generate(pipe, one_prompt, tmp_path, CFG, keys=["0"])
    assert not (tmp_path / "1").exists() and not (tmp_path / "0" / "1").exists()
    for n in range(CFG.per_prompt):
        alone = pixels(generate_one(pipe, TWO_TOKENS, "0", 0, n, CFG))
        in_batch = pixels(image_path(tmp_path, "0", 0, n))
        assert np.abs(alone - in_batch).max() <= 1  # batched float maths may differ in the last bit
    # different images of one prompt get different noise
    assert np.abs(pixels(image_path(tmp_path, "0", 0, 0)) - pixels(image_path(tmp_path, "0", 0, 1))).mean() > 1


def test_per_image_seeds_match_diffusers_generators(sd):
    """Our batched sampling equals diffusers' own pipeline given one generator per image."""
    pipe, _, _ = sd
    set_scheduler(pipe, "dpmsolver")
    cfg = GenerateConfig(scheduler="dpmsolver", steps=3, height=64, width=64, batch_size=4)
    seeds = [image_seed(42, "0", 0, n) for n in range(3)]
    ours = sample(pipe, encode_prompt(pipe, TWO_TOKENS), seeds, cfg)
    ref = pipe(
        TWO_TOKENS,
        num_images_per_prompt=3,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        num_inference_steps=3,
        height=64,
        width=64,
        guidance_scale=cfg.guidance,
        output_type="pil",
    ).images
    for a, b in zip(ours, ref):
        assert np.abs(pixels(a) - pixels(b)).max() <= 1


def test_scheduler_swap_keeps_the_noise_schedule(sd):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    pipe, _, _ = sd
    for name, cls in [("ddim", DDIMScheduler), ("dpmsolver", DPMSolverMultistepScheduler)]:
        set_scheduler(pipe, name)
        assert isinstance(pipe.scheduler, cls)
        assert pipe.scheduler.config.beta_schedule == "scaled_linear"
        assert pipe.scheduler.config.beta_end == pytest.approx(0.012)
    with pytest.raises(DifflabError, match="unknown scheduler"):
        set_scheduler(pipe, "euler")


def test_two_learned_tokens_both_steer_the_image(sd):
    pipe, _, _ = sd
    ids = pipe.tokenizer(TWO_TOKENS).input_ids
    new = pipe.tokenizer.convert_tokens_to_ids(["<new1>", "<new2>"])
    assert all(i in ids for i in new) and all(i >= 49408 for i in new)
    before = pixels(generate_one(pipe, TWO_TOKENS, "0", 0, 0, CFG))
    weight = pipe.text_encoder.get_input_embeddings().weight
    for token_id in new:
        saved = weight[token_id].detach().clone()
        with torch.no_grad():
            weight[token_id] = torch.randn_like(saved) * 5
        changed = pixels(generate_one(pipe, TWO_TOKENS, "0", 0, 0, CFG))
        with torch.no_grad():
            weight[token_id] = saved
        assert np.abs(changed - before).mean() > 0.5
    assert np.array_equal(pixels(generate_one(pipe, TWO_TOKENS, "0", 0, 0, CFG)), before)


def test_resume_only_makes_missing_images(sd, tmp_path):
    pipe, _, _ = sd
    generate(pipe, SPEC, tmp_path, CFG, keys=["1"])
    missing = image_path(tmp_path, "1", 0, 1)
    kept = image_path(tmp_path, "1", 0, 2)
    first = pixels(missing)
    missing.unlink()
    stamp = kept.stat().st_mtime_ns
    generate(pipe, SPEC, tmp_path, CFG, keys=["1"], resume=True)
    assert kept.stat().st_mtime_ns == stamp  # its batch was whole; the missing image's batch is made again, alike
    assert np.array_equal(pixels(missing), first)


def test_bad_requests_fail_clearly(sd, tmp_path):
    pipe, _, _ = sd
    with pytest.raises(DifflabError, match="not in the prompts file"):
        generate(pipe, SPEC, tmp_path, CFG, keys=["7"])
    with pytest.raises(DifflabError, match="must be at least --per-prompt"):
        generate(pipe, SPEC, tmp_path, CFG, best_of=2, scorer=object(), refs=tmp_path)
    with pytest.raises(DifflabError, match="needs --clip"):
        generate(pipe, SPEC, tmp_path, CFG, best_of=4)
    with pytest.raises(DifflabError, match="<new9> but no loaded embedding"):
        generate(pipe, {"0": {"prompt": ["a <new9> dog"]}}, tmp_path, CFG)
    with pytest.raises(DifflabError, match="multiples of 8"):
        generate(pipe, SPEC, tmp_path, GenerateConfig(per_prompt=1, steps=1, height=60, width=64))
    assert not any(tmp_path.rglob("*.png"))


@pytest.fixture(scope="module")
def clip_and_refs(tmp_path_factory, random_images, save_tiny_clip):

    root = tmp_path_factory.mktemp("clip")
    save_tiny_clip(root / "clip")
    for key, seed in (("0", 1), ("1", 2)):
        (root / "refs" / key).mkdir(parents=True)
        for i, im in enumerate(random_images(3, seed=seed)):
            im.save(root / "refs" / key / f"{i}.png")
    return root / "clip", root / "refs"


def test_best_of_keeps_the_top_candidates(sd, clip_and_refs, tmp_path):
    from difflab.clip.score import ClipScorer

    pipe, _, _ = sd
    clip, refs = clip_and_refs
    generate(
        pipe, SPEC, tmp_path, CFG, keys=["1"], best_of=5, scorer=ClipScorer.from_pretrained(clip, "cpu"), refs=refs
    )
    assert {p.name for p in (tmp_path / "1" / "0").iterdir()} == {f"source1_prompt0_{n}.png" for n in range(3)}
    rows = list(csv.DictReader(open(tmp_path / "best_of_scores.csv")))
    assert [int(r["candidate"]) for r in rows] == list(range(5))
    kept = sorted((r for r in rows if r["kept_as"] != ""), key=lambda r: int(r["kept_as"]))
    dropped = [r for r in rows if r["kept_as"] == ""]
    assert len(kept) == 3 and len(dropped) == 2
    combined = [float(r["combined"]) for r in kept]
    assert combined == sorted(combined, reverse=True) and min(combined) >= max(float(r["combined"]) for r in dropped)
    for r in kept:  # file n is candidate c, regenerated alone from its own seed
        alone = pixels(generate_one(pipe, SPEC["1"]["prompt"][0], "1", 0, int(r["candidate"]), CFG))
        assert np.abs(alone - pixels(image_path(tmp_path, "1", 0, int(r["kept_as"])))).max() <= 1


def test_cli_generate_end_to_end(sd, tmp_path):
    from typer.testing import CliRunner

    from difflab.cli import app

    _, model, embeds = sd
    save_json(SPEC, tmp_path / "input.json")
    args = [
        "personalize",
        "generate",
        "--prompts",
        str(tmp_path / "input.json"),
        "--sd",
        str(model),
        "--embeds",
        str(embeds[0]),
        "--embeds",
        str(embeds[1]),
        "--out",
        str(tmp_path / "out"),
        "--per-prompt",
        "2",
        "--steps",
        "2",
        "--height",
        "64",
        "--width",
        "64",
        "--keys",
        "0",
        "--scheduler",
        "dpmsolver",
        "--device",
        "cpu",
        # "auto" times the dtypes, so a loaded machine may pick bf16 weights, whose batch-dependent rounding moves a
        # regenerated image by more than one grey level; fp32 makes the check below independent of the load.
        "--precision",
        "fp32",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert {str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*.png")} == {
        f"0/{i}/source0_prompt{i}_{n}.png" for i in (0, 1) for n in (0, 1)
    }
    target = tmp_path / "out/0/1/source0_prompt1_1.png"
    before = pixels(target)
    target.unlink()
    result = CliRunner().invoke(app, args + ["--only", "0/1/1"])
    assert result.exit_code == 0, result.output
    assert np.abs(pixels(target) - before).max() <= 1
    result = CliRunner().invoke(app, args + ["--only", "0/x"])
    assert result.exit_code != 0 and "KEY/IDX/N" in str(result.exception)


def test_two_processes_generate_the_same_files_as_one(sd, tmp_path, launch, folder_bytes):
    _, model, embeds = sd
    save_json(SPEC, tmp_path / "input.json")
    args = ["personalize", "generate", "--prompts", str(tmp_path / "input.json"), "--sd", str(model)]
    args += ["--embeds", str(embeds[0]), "--embeds", str(embeds[1]), "--per-prompt", "3", "--batch-size", "2"]
    args += ["--steps", "2", "--height", "64", "--width", "64", "--precision", "fp32", "--device", "cpu"]
    one = launch([*args, "--out", str(tmp_path / "one")], 1)
    assert one.returncode == 0, one.stderr[-3000:]
    two = launch([*args, "--out", str(tmp_path / "two")], 2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("wrote") == 1  # only the main process reports
    made = folder_bytes(tmp_path / "one")
    assert len([name for name in made if name.endswith(".png")]) == 9 and "report.html" in made
    assert folder_bytes(tmp_path / "two") == made
