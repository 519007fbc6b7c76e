"""Region-wise multi-concept composition on a tiny random Stable Diffusion: boxes, and the two-stage path whose
regions are found in a layout image (the finders themselves: tests/test_layout.py)."""

import csv

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.personalize.compose import (
    AttentionStore,
    ComposeConfig,
    LayoutRead,
    Region,
    box_masks,
    capture_cross_attention,
    check_boxes,
    compose,
    decode,
    denoise_regions,
    layout_stage,
    plain,
    surest,
    token_indices,
)
from difflab.personalize.generate import initial_latents, set_scheduler
from difflab.personalize.layout import Layout, SmallRegion
from difflab.utils import DifflabError

PROMPT = "a <new1> in a city in a style of <new2>"
CONCEPTS = [Region("dog", "a photo of a <new1> dog"), Region("city", "a photo of a city")]
LAYOUT_PROMPT = "a dog next to a city"
CFG = ComposeConfig(steps=3, height=64, width=64, layout="attention", min_region=0)
BOXES = ((0, 0, 0.5, 1), (0.5, 0, 1, 1))


@pytest.fixture(scope="module")
def sd(tmp_path_factory, tiny_sd):

    from difflab.personalize.embeddings import load_embeddings, save_embeddings

    root = tmp_path_factory.mktemp("sd")
    pipe = tiny_sd(seed=0)
    pipe.save_pretrained(root / "model")
    torch.manual_seed(1)
    embeds = save_embeddings(root / "new.safetensors", {"<new1>": torch.randn(1, 32), "<new2>": torch.randn(1, 32)})
    load_embeddings(pipe, [embeds])
    pipe.set_progress_bar_config(disable=True)
    set_scheduler(pipe, "ddim")
    return pipe, root / "model", embeds


def pixels(im: Image.Image) -> np.ndarray:
    return np.asarray(im.convert("RGB")).astype(int)


def test_capture_keeps_outputs_and_records_attention_distributions(sd):
    pipe, _, _ = sd
    x = torch.randn(2, 4, 32, 32)
    context = pipe.encode_prompt([PROMPT, "a dog"], "cpu", 1, False)[0]
    with torch.inference_mode():
        plain = pipe.unet(x, 500, encoder_hidden_states=context).sample
        with capture_cross_attention(pipe.unet, AttentionStore()) as store:
            captured = pipe.unet(x, 500, encoder_hidden_states=context).sample
        after = pipe.unet(x, 500, encoder_hidden_states=context).sample
    torch.testing.assert_close(captured, plain, rtol=1e-4, atol=1e-5)
    assert torch.equal(after, plain)  # the original processors are back
    # the tiny UNet cross-attends only at 16x16 (latent 32 / 2): every cross-attention layer is recorded once
    cross_layers = sum(name.endswith("attn2.processor") for name in pipe.unet.attn_processors)
    assert cross_layers > 1 and list(store.counts.items()) == [(16 * 16, cross_layers)]
    mean = store.sums[16 * 16] / store.counts[16 * 16]
    assert mean.shape == (2, 16 * 16, 77) and (mean >= 0).all()
    torch.testing.assert_close(mean.sum(-1), torch.ones(2, 16 * 16))


def test_token_indices_find_learned_tokens_and_words(sd):
    from difflab.personalize.embeddings import add_tokens

    pipe, _, _ = sd
    ids = pipe.tokenizer(PROMPT).input_ids
    new1 = token_indices(pipe, PROMPT, "<new1>")
    assert [ids[i] for i in new1] == [pipe.tokenizer.convert_tokens_to_ids("<new1>")]
    assert token_indices(pipe, PROMPT, "in a city") == [3, 4, 5]
    with pytest.raises(DifflabError, match="do not occur"):
        token_indices(pipe, PROMPT, "lighthouse")
    # a two-vector token is widened to "<multi> <multi>_1" as diffusers' prompt encoding does
    add_tokens(pipe.tokenizer, pipe.text_encoder, {"<multi>": torch.randn(2, 32)})
    assert token_indices(pipe, "a <multi> in a city", "<multi>") == [2, 3]
    assert token_indices(pipe, "a <multi> in a city", "city") == [6]


def test_one_region_everywhere_equals_plain_generation(sd):
    """Mechanism check: with one concept's mask all ones, blending reduces to diffusers' pipeline on its prompt."""
    pipe, _, _ = sd
    latents = initial_latents(pipe, [7], 64, 64)
    prompts = [PROMPT, CONCEPTS[0].prompt, CONCEPTS[1].prompt]
    masks = torch.zeros(3, 32, 32)
    masks[1] = 1
    composed = decode(pipe, denoise_regions(pipe, latents, prompts, masks, CFG))
    reference = pipe(
        CONCEPTS[0].prompt,
        latents=latents,
        height=64,
        width=64,
        num_inference_steps=CFG.steps,
        guidance_scale=CFG.guidance,
    ).images[0]
    assert np.abs(pixels(composed) - pixels(reference)).max() <= 1
    other = pipe(
        CONCEPTS[1].prompt,
        latents=latents,
        height=64,
        width=64,
        num_inference_steps=CFG.steps,
        guidance_scale=CFG.guidance,
    ).images[0]
    assert np.abs(pixels(composed) - pixels(other)).mean() > 0.5  # the test can tell prompts apart


def test_two_stages_run_end_to_end_and_stage_two_continues_stage_one(sd):
    pipe, _, _ = sd
    cfg = ComposeConfig(**{**CFG.__dict__, "layout_steps": 1})
    result = compose(pipe, PROMPT, CONCEPTS, cfg, seed=3, layout_prompt=LAYOUT_PROMPT)
    latents = initial_latents(pipe, [3], 64, 64)
    reference = pipe(PROMPT, latents=latents, height=64, width=64, num_inference_steps=CFG.steps,
                     guidance_scale=CFG.guidance).images[0]  # fmt: skip
    assert np.abs(pixels(result.naive) - pixels(reference)).max() <= 1
    assert result.finder == "attention" and result.layout_prompt == LAYOUT_PROMPT and result.layout is not None
    assert result.masks.shape == (3, 32, 32) and result.prompts == [PROMPT, CONCEPTS[0].prompt, CONCEPTS[1].prompt]
    assert (result.masks.sum(0) <= 1).all() and result.masks[1:].flatten(1).sum(1).min() > 0
    # Stage 2 starts from stage 1's latents after k steps: over the whole latent with stage 1's prompt, it
    # finishes stage 1's image.
    layout, at_k = layout_stage(pipe, LAYOUT_PROMPT, latents, cfg)
    first_k = denoise_regions(pipe, latents, *plain(LAYOUT_PROMPT, latents), cfg, stop=1)
    torch.testing.assert_close(at_k, first_k)
    finished = decode(pipe, denoise_regions(pipe, at_k, *plain(LAYOUT_PROMPT, latents), cfg, start=1))
    assert np.abs(pixels(finished) - pixels(layout.image)).max() <= 1
    assert np.abs(pixels(result.composed) - pixels(result.naive)).mean() > 0.5


def test_box_masks_place_each_concept_in_its_box():
    masks = box_masks([(0, 0, 0.5, 1), (0.25, 0.5, 1, 1)], (4, 8))
    assert masks.shape == (3, 4, 8)
    torch.testing.assert_close(masks.sum(0), torch.ones(4, 8))
    assert masks[1, :2, :4].all() and masks[1, 2:, :2].all()  # the left half, but for what the later box takes
    assert masks[2, 2:, 2:].all() and not masks[2, :2].any()
    assert masks[0, :2, 4:].all()  # the top right is in no box: background
    with pytest.raises(DifflabError, match="the boxes of a cover no latent pixel"):
        box_masks([(0, 0, 0.05, 1)], (4, 8), ["a"])


@pytest.mark.parametrize(
    "boxes, message",
    [(((0, 0, 0.5, 1), None), "every concept or to none"), (((0.5, 0, 0.5, 1), (0, 0, 1, 1)), "left < right")],
)
def test_check_boxes_refuses_partial_or_empty_boxes(boxes, message):
    with pytest.raises(DifflabError, match=message):
        check_boxes([Region(str(i), "p", box) for i, box in enumerate(boxes)])
    assert check_boxes([Region("a", "p")]) is False


def test_compose_with_boxes_uses_them_as_regions(sd):
    pipe, _, _ = sd
    boxed = [Region(c.words, c.prompt, box) for c, box in zip(CONCEPTS, BOXES)]
    result = compose(pipe, PROMPT, boxed, ComposeConfig(**{**CFG.__dict__, "layout": "boxes"}), seed=3)
    assert result.masks[1, :, :16].all() and result.masks[2, :, 16:].all() and not result.masks[0].any()
    assert result.layout is None and result.finder == "boxes"
    found = compose(pipe, PROMPT, CONCEPTS, CFG, seed=3, layout_prompt=LAYOUT_PROMPT)
    assert np.abs(pixels(result.naive) - pixels(found.naive)).max() <= 1  # the same naive image either way
    assert np.abs(pixels(result.composed) - pixels(found.composed)).mean() > 0.5


@pytest.mark.parametrize(
    "layout, boxes, layout_prompt, message",
    [
        ("boxes", False, None, "--layout boxes needs a box for every concept"),
        ("auto", True, None, "boxes go with --layout boxes, not --layout auto"),
        ("attention", False, "a dog next to a house", "concept words 'city' do not occur in the prompt"),
        ("clip", False, LAYOUT_PROMPT, "--layout clip needs a CLIP model"),
    ],
)
def test_layout_input_errors_are_one_line(sd, layout, boxes, layout_prompt, message):
    pipe, _, _ = sd
    concepts = [Region(c.words, c.prompt, box if boxes else None) for c, box in zip(CONCEPTS, BOXES)]
    cfg = ComposeConfig(**{**CFG.__dict__, "layout": layout})
    with pytest.raises(DifflabError, match=message):
        compose(pipe, PROMPT, concepts, cfg, seed=3, layout_prompt=layout_prompt)


def test_a_region_under_the_smallest_share_is_an_error(sd):
    pipe, _, _ = sd
    cfg = ComposeConfig(**{**CFG.__dict__, "min_region": 0.99})  # no region can hold 99 % of the latent
    with pytest.raises(DifflabError, match=r"the layout leaves 'dog' \(\d+%\).* under 99% of the image"):
        compose(pipe, PROMPT, CONCEPTS, cfg, seed=3, layout_prompt=LAYOUT_PROMPT)


def test_cli_compose_end_to_end_with_scores(sd, tmp_path, random_images, save_tiny_clip):
    from typer.testing import CliRunner

    from difflab.cli import app

    _, model, embeds = sd
    save_tiny_clip(tmp_path / "clip")
    for name, seed in (("dog", 1), ("style", 2)):
        (tmp_path / name).mkdir()
        for i, im in enumerate(random_images(2, seed=seed)):
            im.save(tmp_path / name / f"{i}.png")
    args = [
        "personalize",
        "compose",
        "--prompt",
        PROMPT,
        "--concepts",
        "dog=a photo of a <new1> dog",
        "--layout-prompt",
        "a dog in a city",
        "--layout",
        "clip",
        "--sd",
        str(model),
        "--embeds",
        str(embeds),
        "--out",
        str(tmp_path / "out"),
        "--steps",
        "2",
        "--height",
        "64",
        "--width",
        "64",
        "--num-images",
        "2",
        "--device",
        "cpu",
        "--clip",
        str(tmp_path / "clip"),
        "--refs",
        f"dog={tmp_path / 'dog'}",
        "--refs",
        f"<new2>={tmp_path / 'style'}",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    for i in (0, 1):
        for name in ("naive", "composed", "masks", "layout"):
            assert (out / f"{name}_{i}.png").is_file()
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert [r["concept"] for r in rows] == ["dog", "<new2>"]
    assert all(-100 <= float(r["composed image score"]) <= 100 for r in rows)
    assert "composed image score" in (out / "report.html").read_text()
    bad = CliRunner().invoke(app, args[:4] + ["--concepts", "no-equals-sign"] + args[6:])
    assert bad.exit_code != 0 and "WORDS=VALUE" in str(bad.exception)
    for box, message in (("dog=0,0,1", "four numbers"), ("city=0,0,1,1", "not the WORDS"),
                         ("dog=0,0,1,1", "boxes go with --layout boxes, not --layout clip")):  # fmt: skip
        bad = CliRunner().invoke(app, args + ["--box", box, "--overwrite"])
        assert bad.exit_code != 0 and message in str(bad.exception)


def half_masks_finder(seen: list, sureness=lambda n: 0.0):
    """A stand-in for `find_regions` that records each stage-1 image and gives left and right halves."""

    def finder(pipe, layout, layout_prompt, concepts, cfg, name, scorer):
        seen.append(layout.image)
        masks = torch.zeros(3, 32, 32)
        masks[1, :, :16], masks[2, :, 16:] = 1, 1
        return masks, sureness(len(seen))

    return finder


def test_the_surest_of_several_layouts_is_kept(sd, monkeypatch):
    import difflab.personalize.compose as compose_module

    pipe, _, _ = sd
    seen = []
    monkeypatch.setattr(compose_module, "find_regions", half_masks_finder(seen, lambda n: (0.1, 0.9, 0.5)[n - 1]))
    cfg = ComposeConfig(**{**CFG.__dict__, "layouts": 3})
    result = compose(pipe, PROMPT, CONCEPTS, cfg, seed=3, layout_prompt=LAYOUT_PROMPT)
    assert len(seen) == 3 and np.abs(pixels(seen[0]) - pixels(seen[1])).mean() > 0.5  # three stage-1 noises
    assert np.array_equal(pixels(result.layout), pixels(seen[1]))  # the surest one


@pytest.mark.parametrize("finder", ["attention", "clip"])
def test_each_finder_tries_its_own_number_of_layouts_by_default(sd, monkeypatch, finder):
    import difflab.personalize.compose as compose_module

    pipe, _, _ = sd
    seen = []
    monkeypatch.setattr(compose_module, "find_regions", half_masks_finder(seen))
    compose(pipe, PROMPT, CONCEPTS, ComposeConfig(**{**CFG.__dict__, "layout": finder}), seed=3,
            layout_prompt=LAYOUT_PROMPT)  # fmt: skip
    assert len(seen) == compose_module.FINDER_LAYOUTS[finder] == {"attention": 1, "clip": 4}[finder]


def test_an_image_the_finder_refuses_is_passed_over_and_all_refused_raises_the_first():
    blank = Layout(Image.new("RGB", (8, 8)), {}, 3, (4, 4))
    masks = torch.zeros(3, 4, 4)
    first, second = SmallRegion("the first refusal"), SmallRegion("the second refusal")
    read = [LayoutRead(blank, torch.zeros(1), refusal=first), LayoutRead(blank, torch.ones(1), masks, -2.0),
            LayoutRead(blank, torch.full((1,), 2.0), refusal=second)]  # fmt: skip
    assert surest(read) is read[1]  # surer than any refusal, however unsure
    with pytest.raises(SmallRegion, match="the first refusal"):
        surest([read[0], read[2]])


def test_an_error_of_the_request_is_raised_at_the_first_stage1_image(sd, monkeypatch):
    import difflab.personalize.compose as compose_module

    pipe, _, _ = sd
    stage1 = []
    real_stage = compose_module.layout_stage
    monkeypatch.setattr(compose_module, "layout_stage", lambda *a: stage1.append(1) or real_stage(*a))
    cfg = ComposeConfig(**{**CFG.__dict__, "layout": "clip", "layouts": 4})
    with pytest.raises(DifflabError, match="needs a CLIP model"):  # no scorer given
        compose(pipe, PROMPT, CONCEPTS, cfg, seed=3, layout_prompt=LAYOUT_PROMPT)
    assert len(stage1) == 1
