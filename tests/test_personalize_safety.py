"""Personalization never replaces earlier work silently and answers bad input with one line naming the file or
option: the bad-input classes of the reliability sweep, one test per class."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from difflab.cli import app
from difflab.clip.zeroshot import load_templates
from difflab.personalize.compose import ComposeConfig
from difflab.personalize.generate import set_scheduler
from difflab.personalize.textual_inversion import (
    Concept,
    TextualInversion,
    TextualInversionConfig,
    load_images,
    train_textual_inversion,
)
from difflab.utils import DifflabError

runner = CliRunner()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_sd):
    root = tmp_path_factory.mktemp("safety")
    tiny_sd(seed=0).save_pretrained(root / "sd")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
    spec = {
        "0": {
            "src_image": "cat",
            "token_name": "<new1>",
            "prompt": ["a photo of a cat"],
            "prompt_4_clip_eval": ["a cat"],
            "baseline": [[50, 20]],
        }
    }
    (root / "input.json").write_text(json.dumps(spec))
    return root


def config(setup, out, **kw):
    base = dict(
        concepts=[Concept(str(setup / "images"), "<new1>", "cat")],
        sd=str(setup / "sd"),
        out=str(out),
        resolution=32,
        steps=2,
        grad_accum=1,
        batch_size=2,
        scale_lr=False,
        checkpoint_every=0,
        save_every=0,
        device="cpu",
    )
    return TextualInversionConfig(**{**base, **kw})


def test_training_refuses_to_replace_an_earlier_run(setup, tmp_path):
    train_textual_inversion(config(setup, tmp_path / "run", save_every=1))
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    with pytest.raises(
        DifflabError, match=r"run: holds earlier results of `difflab personalize train` .*--resume.*--overwrite"
    ):
        train_textual_inversion(config(setup, tmp_path / "run"))
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before  # nothing touched
    train_textual_inversion(config(setup, tmp_path / "run", steps=3, resume=True))
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 3
    (tmp_path / "run" / ".checkpoint.pt.x.tmp").write_bytes(b"left by a killed save")
    train_textual_inversion(config(setup, tmp_path / "run", overwrite=True))
    assert not (tmp_path / "run" / "snapshots").exists()  # the old run's snapshots do not mix with the new ones
    assert not list((tmp_path / "run").glob(".*.tmp"))
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 2


@pytest.mark.parametrize(
    "content,reason", [(b"PK\x03\x04", "empty, truncated or corrupt"), ("payload", "pickled Python object")]
)
def test_resume_from_a_bad_checkpoint_is_one_line(setup, tmp_path, content, reason):
    (tmp_path / "run").mkdir()
    path = tmp_path / "run" / "checkpoint.pt"
    if content == "payload":
        torch.save({"step": 1, "x": Concept("a", "b", "c")}, path)
    else:
        path.write_bytes(content)
    ti = TextualInversion(config(setup, tmp_path / "run", resume=True))
    with pytest.raises(DifflabError, match=f"checkpoint.pt: not a readable textual-inversion checkpoint: .*{reason}"):
        ti.train()


def cli(*args):
    result = runner.invoke(app, [str(a) for a in args])
    error = str(result.exception) if isinstance(result.exception, DifflabError) else result.output
    return result.exit_code, error


def test_unreadable_embedding_and_checkpoint_files_through_the_cli(setup, tmp_path):
    (tmp_path / "x.pt").write_text("hello")
    (tmp_path / "x.ckpt").write_text("hello")
    code, error = cli(
        "personalize",
        "generate",
        "--prompts",
        setup / "input.json",
        "--sd",
        setup / "sd",
        "--embeds",
        tmp_path / "x.pt",
        "--out",
        tmp_path / "gen",
        "--device",
        "cpu",
    )
    assert code == 1 and error == f"{tmp_path / 'x.pt'}: not a readable embedding: not a PyTorch file"
    code, error = cli(
        "personalize",
        "generate",
        "--prompts",
        setup / "input.json",
        "--sd",
        tmp_path / "x.ckpt",
        "--out",
        tmp_path / "gen",
        "--device",
        "cpu",
    )
    assert (
        code == 1 and error == f"{tmp_path / 'x.ckpt'}: not a readable Stable Diffusion checkpoint: not a PyTorch file"
    )


@pytest.mark.parametrize(
    "args",
    [
        ["personalize", "train", "--concept", "d:<t>:cat", "--sd", "sd", "--out", "o", "--resolution", "0"],
        ["personalize", "generate", "--prompts", "p", "--sd", "sd", "--out", "o", "--batch-size", "0"],
        ["personalize", "generate", "--prompts", "p", "--sd", "sd", "--out", "o", "--steps", "0"],
        [
            "personalize",
            "compose",
            "--prompt",
            "p",
            "--concepts",
            "a=b",
            "--sd",
            "sd",
            "--out",
            "o",
            "--num-images",
            "0",
        ],
        [
            "personalize",
            "score",
            "--prompts",
            "p",
            "--refs",
            "r",
            "--gen",
            "g",
            "--clip",
            "c",
            "--out",
            "o",
            "--top-k",
            "0",
        ],
    ],
)
def test_numeric_options_are_range_checked(args):
    code, output = cli(*args)
    assert code == 2 and "Invalid value" in output


def test_mistakes_are_named_before_the_model_loads(setup, tmp_path):
    with pytest.raises(DifflabError, match=r"kind 'painting' is not one of object, style"):
        Concept.parse(f"{setup / 'images'}:<new1>:cat:painting")
    code, error = cli(
        "personalize",
        "generate",
        "--prompts",
        setup / "input.json",
        "--sd",
        tmp_path / "missing",
        "--keys",
        "5",
        "--out",
        tmp_path / "gen",
    )
    assert code == 1 and "keys 5 not in the prompts file" in error  # not "model not found": checked first
    with pytest.raises(DifflabError, match="templates.txt: templates file not found"):
        load_templates(str(tmp_path / "templates.txt"))  # a file name, not a literal template


def test_generation_refuses_to_replace_images(setup, tmp_path):
    common = [
        "personalize",
        "generate",
        "--prompts",
        setup / "input.json",
        "--sd",
        setup / "sd",
        "--out",
        tmp_path / "gen",
        "--per-prompt",
        "1",
        "--steps",
        "1",
        "--device",
        "cpu",
    ]
    assert cli(*common)[0] == 0
    image = tmp_path / "gen" / "0" / "0" / "source0_prompt0_0.png"
    before = image.read_bytes()
    code, error = cli(*common, "--seed", "7")
    assert code == 1 and "holds earlier results" in error and "--resume" in error and "--overwrite" in error
    assert image.read_bytes() == before
    assert cli(*common, "--seed", "7", "--overwrite")[0] == 0 and image.read_bytes() != before


def test_compose_needs_sides_that_halve_exactly(tiny_sd):
    from difflab.personalize.compose import check_size, size_multiple

    with pytest.raises(DifflabError, match="height 100: compose needs image sides that are multiples of 8"):
        ComposeConfig(height=100, width=512).check()
    with pytest.raises(DifflabError, match="height 600: compose needs image sides that are multiples of 64"):
        check_size(600, 512, 64)
    pipe = tiny_sd(seed=0)  # VAE 2x, two UNet levels
    assert size_multiple(pipe) == 4


def test_latent_ddim_never_clips_samples(tiny_sd):
    pipe = tiny_sd(seed=0)
    config = dict(pipe.scheduler.config)
    config.pop("clip_sample", None)  # an SD folder whose PNDM config lacks the key
    pipe.scheduler = type(pipe.scheduler).from_config(config)
    set_scheduler(pipe, "ddim")
    assert pipe.scheduler.config.clip_sample is False


def test_images_are_squashed_unless_centre_cropped(setup):
    source = Image.open(sorted((setup / "images").iterdir())[0]).convert("RGB")
    squashed = load_images(setup / "images", 16)[0]
    expected = np.asarray(source.resize((16, 16), Image.BICUBIC)).astype(np.float32) / 127.5 - 1
    np.testing.assert_allclose(squashed.permute(1, 2, 0).numpy(), expected, atol=1e-6)
    cropped = load_images(setup / "images", 16, center_crop=True)[0]
    expected = np.asarray(source.crop((8, 0, 48, 40)).resize((16, 16), Image.BICUBIC)).astype(np.float32) / 127.5 - 1
    np.testing.assert_allclose(cropped.permute(1, 2, 0).numpy(), expected, atol=1e-6)


def test_latent_cache_is_the_same_in_chunks(setup, tmp_path):
    one = TextualInversion(config(setup, tmp_path / "a", vae_batch=1))
    all_ = TextualInversion(config(setup, tmp_path / "b", vae_batch=8))
    torch.testing.assert_close(one.data.latent_mean[0], all_.data.latent_mean[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(one.data.latent_std[0], all_.data.latent_std[0], atol=1e-5, rtol=1e-4)
