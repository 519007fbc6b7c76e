"""Textual inversion on a tiny random SD v1: learning, frozen rows, latent cache, files, resume, bad input, CLI."""

from importlib.util import find_spec

import numpy as np
import pytest
import skimage.data
import torch
from huggingface_hub import ModelCard
from PIL import Image
from safetensors.torch import load_file

from difflab.personalize.embeddings import expand_prompt
from difflab.personalize.sd import load_sd
from difflab.personalize.textual_inversion import Concept, TextualInversion, TextualInversionConfig
from difflab.utils import DifflabError

PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "camera"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_sd):
    root = tmp_path_factory.mktemp("ti")
    tiny_sd(seed=0).save_pretrained(root / "sd")
    images = root / "images"
    images.mkdir()
    for name in PHOTOS:  # 5 real photos, like the course's reference folders
        Image.fromarray(getattr(skimage.data, name)()).convert("RGB").save(images / f"{name}.png")
    return root


def make(setup, tmp_path, concepts=None, **kw):
    cfg = dict(
        concepts=concepts or [Concept(str(setup / "images"), "<new1>", "cat")],
        sd=str(setup / "sd"),
        out=str(tmp_path / "out"),
        resolution=32,
        steps=2,
        grad_accum=1,
        batch_size=2,
        scale_lr=False,
        checkpoint_every=0,
        save_every=0,
        device="cpu",
    )
    cfg.update(kw)
    return TextualInversion(TextualInversionConfig(**cfg))


def test_training_lowers_loss_and_only_new_rows_change(setup, tmp_path):
    ti = make(setup, tmp_path, lr=0.1)
    original = load_sd(setup / "sd").text_encoder.get_input_embeddings().weight.detach().clone()
    init = original[ti.tokenizer.encode("cat", add_special_tokens=False)[0]]
    new_id = ti.tokenizer.convert_tokens_to_ids("<new1>")
    assert new_id == len(original) and torch.equal(ti._embedding()[new_id], init)

    torch.manual_seed(0)
    batch = ti.data.sample_batch()  # one fixed batch: same latents, noise and timesteps every step
    assert (batch["input_ids"] == new_id).any(dim=1).all()
    with torch.no_grad():
        before = ti.loss(batch).item()
    for _ in range(5):
        ti.train_step(batch)
    with torch.no_grad():
        after = ti.loss(batch).item()
    assert after < before - 1e-4, (before, after)
    weight = ti._embedding().detach()
    assert torch.equal(weight[: len(original)], original)  # every old row bit-identical
    assert not torch.equal(weight[new_id], init)
    assert ti.step == 5


def test_latent_cache_is_the_vae_posterior(setup, tmp_path):
    ti = make(setup, tmp_path, scale_lr=True, grad_accum=3, lr=1e-3)
    assert ti.lr == pytest.approx(1e-3 * 3 * 2)  # lr x grad_accum x batch x processes, as diffusers scales it
    from difflab.personalize.textual_inversion import load_images

    x = load_images(setup / "images", 32)
    with torch.no_grad():
        plain = ti.pipe.vae.encode(x).latent_dist
        mirrored = ti.pipe.vae.encode(x.flip(-1)).latent_dist
    assert ti.data.latent_mean[0].shape == (5, 2, 4, 16, 16)
    torch.testing.assert_close(ti.data.latent_mean[0][:, 0], plain.mean, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ti.data.latent_mean[0][:, 1], mirrored.mean, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ti.data.latent_std[0][:, 1], mirrored.std, atol=1e-5, rtol=1e-4)


def test_two_concepts_multi_vector_files_load_in_diffusers(setup, tmp_path):
    concepts = [
        Concept(str(setup / "images"), "<new1>", "dog"),
        Concept(str(setup / "images"), "<new2>", "art", "style"),
    ]
    ti = make(setup, tmp_path, concepts=concepts, num_vectors=2, lr=0.05, gradient_checkpointing=True)
    assert ti.token_ids == [[49408, 49409], [49410, 49411]]
    assert (ti.data.prompt_ids[1] == 49411).any(dim=1).all()  # style captions carry both vectors of <new2>
    path = ti.train()
    saved = load_file(path)
    assert list(saved) == ["<new1>", "<new2>"] and saved["<new1>"].shape == (2, 32)
    for token in ("<new1>", "<new2>"):
        torch.testing.assert_close(saved[token], ti.learned_embeddings()[token])

    pipe = load_sd(setup / "sd")
    for name in ("new1", "new2"):
        pipe.load_textual_inversion(str(tmp_path / "out" / "embeds" / f"{name}.safetensors"))
    prompt = "a <new1> in a city in a style of <new2>"
    ids = pipe.tokenizer(
        pipe.maybe_convert_prompt(prompt, pipe.tokenizer), padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    ours = ti.tokenizer(
        expand_prompt(prompt, ti.tokens), padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    assert torch.equal(ids, ours)
    with torch.no_grad():
        torch.testing.assert_close(pipe.text_encoder(ids)[0], ti.text_encoder(ours)[0])
    for f in ("report.html", "loss.png", "config.json", "train_log.json", "checkpoint.pt"):
        assert (tmp_path / "out" / f).is_file(), f


def test_resume_matches_uninterrupted_run(setup, tmp_path):
    kw = dict(lr=0.05, ema_decay=0.5, batch_size=1)
    full = make(setup, tmp_path / "full", steps=3, **kw)
    full.train()
    make(setup, tmp_path / "part", steps=1, **kw).train()
    resumed = make(setup, tmp_path / "part", steps=3, resume=True, **kw)
    resumed.train()
    assert resumed.step == 3 and len(resumed.losses) == 3
    a, b = (
        load_file(tmp_path / "full/out/learned_embeds.safetensors"),
        load_file(tmp_path / "part/out/learned_embeds.safetensors"),
    )
    torch.testing.assert_close(a["<new1>"], b["<new1>"], atol=1e-6, rtol=1e-5)
    # EMA is what gets saved, and it lags behind the raw rows.
    assert not torch.allclose(full.ema, full._rows())


def test_bad_input(setup, tmp_path):
    images = str(setup / "images")
    with pytest.raises(DifflabError, match="'dog' is already in the tokenizer vocabulary"):
        make(setup, tmp_path, concepts=[Concept(images, "dog", "cat")])
    with pytest.raises(DifflabError, match="initialiser 'sunflowerpot' is 3 tokens"):
        make(setup, tmp_path, concepts=[Concept(images, "<x>", "sunflowerpot")])
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no pictures here")
    with pytest.raises(DifflabError, match="no images"):
        make(setup, tmp_path, concepts=[Concept(str(empty), "<x>", "cat")])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DifflabError, match="a.png: not a readable image"):
        make(setup, tmp_path, concepts=[Concept(str(broken), "<x>", "cat")])
    with pytest.raises(DifflabError, match="DIR:TOKEN:INIT"):
        Concept.parse("just-a-folder")
    assert Concept.parse("C:/imgs:<s>:art:style") == Concept("C:/imgs", "<s>", "art", "style")


def test_cli_train_two_steps(setup, tmp_path):
    from typer.testing import CliRunner

    from difflab.cli import app

    out = tmp_path / "cli"
    result = CliRunner().invoke(
        app,
        [
            "personalize",
            "train",
            "--concept",
            f"{setup / 'images'}:<new1>:dog",
            "--sd",
            str(setup / "sd"),
            "--out",
            str(out),
            "--steps",
            "2",
            "--resolution",
            "32",
            "--grad-accum",
            "1",
            "--num-vectors",
            "2",
            "--validate-every",
            "2",
            "--validation-steps",
            "2",
            "--device",
            "cpu",
            *(["--report-to", "tensorboard"] if find_spec("tensorboard") else []),
        ],
    )
    assert result.exit_code == 0, result.output
    if find_spec("tensorboard"):
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        (run,) = (out / "logs").iterdir()
        events = EventAccumulator(str(run), size_guidance={"images": 0}).Reload()
        assert [e.step for e in events.Scalars("loss")] == [1, 2] and "grad_norm" in events.Tags()["scalars"]
        assert [e.step for e in events.Images("validation")] == [2]
    assert load_file(out / "learned_embeds.safetensors")["<new1>"].shape == (2, 32)
    grid = np.asarray(Image.open(out / "validation" / "step000002.png"))
    assert grid.shape[0] > 32 and grid.std() > 0
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "sd" and card.data.pipeline_tag == "text-to-image"
    assert "textual-inversion" in card.data.tags and "load_textual_inversion" in card.text
    assert "(validation/step000002.png)" in card.text
    bad = CliRunner().invoke(
        app, ["personalize", "train", "--concept", "nowhere:<x>:dog", "--sd", str(setup / "sd"), "--out", str(out)]
    )
    assert isinstance(bad.exception, DifflabError) and "image folder not found" in str(bad.exception)


def test_hw2_3_script_usage_and_missing_embeddings(tmp_path):
    import os
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "hw2_3.sh"
    usage = subprocess.run(["bash", str(script), "only-one-arg"], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage:" in usage.stderr
    env = {**os.environ, "DIFFLAB_EMBEDS": str(tmp_path / "none")}
    run = subprocess.run(
        ["bash", str(script), "input.json", str(tmp_path / "out"), "sd-v1-4.ckpt"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 1 and "no learned embeddings found" in run.stderr
    assert "personalize train --sd sd-v1-4.ckpt" in run.stderr and not (tmp_path / "out").exists()


def test_reference_captions_give_each_image_its_own_prompt(setup, tmp_path):
    import shutil

    from difflab.io import write_metadata

    folder = tmp_path / "captioned"
    shutil.copytree(setup / "images", folder)
    texts = {f"{name}.png": f"a {name} in the style of {{}}" for name in PHOTOS}
    write_metadata([{"file_name": k, "text": v} for k, v in texts.items()], folder)
    ti = make(setup, tmp_path, concepts=[Concept(str(folder), "<new1>", "art", "style")], num_vectors=2, batch_size=8)
    order = sorted(texts)  # the images in the order the latents were cached
    expected = ti.data.tokenize([expand_prompt(texts[n].replace("{}", "<new1>"), ti.tokens) for n in order])
    assert torch.equal(ti.data.caption_ids[0], expected)
    ti.data.gen.manual_seed(3)
    batch = ti.data.sample_batch()
    ti.data.gen.manual_seed(3)
    torch.randint(1, (8,), generator=ti.data.gen)  # the concept of each example (one here)
    for ids in batch["input_ids"]:  # each example carries the caption of the image it drew
        i = torch.randint(len(order), (1,), generator=ti.data.gen).item()
        torch.rand((), generator=ti.data.gen), torch.randn(ti.data.latent_mean[0][i, 0].shape, generator=ti.data.gen)
        assert torch.equal(ids, expected[i])

    write_metadata([{"file_name": "astronaut.png", "text": "an astronaut, {}"}], folder)
    with pytest.raises(DifflabError, match=r"metadata.jsonl: camera.png has no caption"):
        make(setup, tmp_path / "b", concepts=[Concept(str(folder), "<new1>", "art", "style")])
    write_metadata([{"file_name": k, "text": "no placeholder"} for k in texts], folder)
    with pytest.raises(DifflabError, match=r"astronaut.png has a caption without \{\} for the token"):
        make(setup, tmp_path / "c", concepts=[Concept(str(folder), "<new1>", "art", "style")])
