"""Region-wise multi-concept composition on a tiny random Stable Diffusion."""

import csv

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.personalize.compose import (
    AttentionStore,
    ComposeConfig,
    Region,
    box_masks,
    capture_cross_attention,
    check_boxes,
    compose,
    concept_maps,
    denoise_regions,
    region_masks,
    token_indices,
)
from difflab.personalize.generate import initial_latents, set_scheduler
from difflab.utils import DifflabError

PROMPT = "a <new1> in a city in a style of <new2>"
CONCEPTS = [Region("<new1>", "a photo of a <new1> dog"), Region("city", "a photo of a city")]
CFG = ComposeConfig(steps=3, height=64, width=64)


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
    maps = store.maps(32, 32, factor=4)  # no 8x8 layer exists: the nearest size recorded is used
    assert maps.shape == (2, 16, 16, 77)
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 16, 16))
    assert (maps >= 0).all()


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


def test_masks_partition_the_latent_and_follow_attention():
    attention = torch.zeros(4, 4, 77)
    attention[:2, :, 1] = 1.0  # token 1 owns the top half
    attention[2:, :2, 2] = 1.0  # token 2 the bottom-left quarter
    attention[..., 0] = 1.0 - attention[..., 1:].sum(-1)
    maps = concept_maps(attention, [[1], [2]], (8, 8), smooth=0)
    assert maps.shape == (2, 8, 8) and maps.min() >= 0 and maps.max() <= 1
    masks = region_masks(maps, threshold=0.5)
    assert masks.shape == (3, 8, 8)
    torch.testing.assert_close(masks.sum(0), torch.ones(8, 8))
    assert set(masks.unique().tolist()) == {0.0, 1.0}
    assert masks[1, :3].all() and masks[2, 5:, :3].all() and masks[0, 5:, 5:].all()
    smoothed = region_masks(concept_maps(attention, [[1], [2]], (8, 8), smooth=1.0), threshold=0.5)
    torch.testing.assert_close(smoothed.sum(0), torch.ones(8, 8))


def test_one_region_everywhere_equals_plain_generation(sd):
    """Mechanism check: with one concept's mask all ones, blending reduces to diffusers' pipeline on its prompt."""
    pipe, _, _ = sd
    latents = initial_latents(pipe, [7], 64, 64)
    prompts = [PROMPT, CONCEPTS[0].prompt, CONCEPTS[1].prompt]
    masks = torch.zeros(3, 32, 32)
    masks[1] = 1
    composed = denoise_regions(pipe, latents, prompts, masks, CFG)
    plain = pipe(
        CONCEPTS[0].prompt,
        latents=latents,
        height=64,
        width=64,
        num_inference_steps=CFG.steps,
        guidance_scale=CFG.guidance,
    ).images[0]
    assert np.abs(pixels(composed) - pixels(plain)).max() <= 1
    other = pipe(
        CONCEPTS[1].prompt,
        latents=latents,
        height=64,
        width=64,
        num_inference_steps=CFG.steps,
        guidance_scale=CFG.guidance,
    ).images[0]
    assert np.abs(pixels(composed) - pixels(other)).mean() > 0.5  # the test can tell prompts apart


def test_compose_returns_naive_masks_and_a_blend(sd):
    pipe, _, _ = sd
    result = compose(pipe, PROMPT, CONCEPTS, CFG, seed=3)
    plain = pipe(
        PROMPT,
        latents=initial_latents(pipe, [3], 64, 64),
        height=64,
        width=64,
        num_inference_steps=CFG.steps,
        guidance_scale=CFG.guidance,
    ).images[0]
    assert np.abs(pixels(result.naive) - pixels(plain)).max() <= 1  # recording attention changes nothing
    assert result.maps.shape == (2, 32, 32) and result.masks.shape == (3, 32, 32)
    torch.testing.assert_close(result.masks.sum(0), torch.ones(32, 32))
    assert result.prompts == [PROMPT, CONCEPTS[0].prompt, CONCEPTS[1].prompt]
    assert np.abs(pixels(result.composed) - pixels(result.naive)).mean() > 0.5


def test_box_masks_place_each_concept_in_its_box():
    left, right = Region("a", "a", (0, 0, 0.5, 1)), Region("b", "b", (0.25, 0.5, 1, 1))
    masks = box_masks([left, right], (4, 8))
    assert masks.shape == (3, 4, 8)
    torch.testing.assert_close(masks.sum(0), torch.ones(4, 8))
    assert masks[1, :2, :4].all() and masks[1, 2:, :2].all()  # the left half, but for what the later box takes
    assert masks[2, 2:, 2:].all() and not masks[2, :2].any()
    assert masks[0, :2, 4:].all()  # the top right is in no box: background
    with pytest.raises(DifflabError, match="cover no latent pixel"):
        box_masks([Region("a", "a", (0, 0, 0.05, 1))], (4, 8))


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
    boxed = [Region(c.words, c.prompt, box) for c, box in zip(CONCEPTS, ((0, 0, 0.5, 1), (0.5, 0, 1, 1)))]
    result = compose(pipe, PROMPT, boxed, CFG, seed=3)
    assert result.masks[1, :, :16].all() and result.masks[2, :, 16:].all() and not result.masks[0].any()
    found = compose(pipe, PROMPT, CONCEPTS, CFG, seed=3)
    assert np.abs(pixels(result.naive) - pixels(found.naive)).max() <= 1  # the same naive image either way
    assert np.abs(pixels(result.composed) - pixels(found.composed)).mean() > 0.5


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
        "<new1>=a photo of a <new1> dog",
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
        f"<new1>={tmp_path / 'dog'}",
        "--refs",
        f"<new2>={tmp_path / 'style'}",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    for i in (0, 1):
        for name in ("naive", "composed", "masks"):
            assert (out / f"{name}_{i}.png").is_file()
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert [r["concept"] for r in rows] == ["<new1>", "<new2>"]
    assert all(-100 <= float(r["composed image score"]) <= 100 for r in rows)
    assert "composed image score" in (out / "report.html").read_text()
    bad = CliRunner().invoke(app, args[:4] + ["--concepts", "no-equals-sign"] + args[6:])
    assert bad.exit_code != 0 and "WORDS=VALUE" in str(bad.exception)
    for box, message in (("<new1>=0,0,1", "four numbers"), ("city=0,0,1,1", "not the WORDS")):
        bad = CliRunner().invoke(app, args + ["--box", box, "--overwrite"])
        assert bad.exit_code != 0 and message in str(bad.exception)
