"""The miniature SD + CLIP stack: captions, standard formats that diffusers and transformers load unchanged,
training loops that learn, safe building (refuse, resume, no half-written folders)."""

import json

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard

from difflab.io import read_metadata, write_metadata
from difflab.minisd import data as mdata
from difflab.minisd.build import BuildConfig, build, default_settings
from difflab.minisd.models import MiniSDConfig, build_clip
from difflab.minisd.train import StageConfig, TrainSettings, clip_loss, train_clip, train_vae, tune_vision
from difflab.precision import Precision
from difflab.utils import DifflabError

TINY = MiniSDConfig(
    text_width=32,
    text_layers=1,
    vision_width=32,
    vision_layers=1,
    projection_dim=32,
    vae_channels=(8, 16, 16),
    unet_channels=(16, 32),
    attention_head_dim=8,
)


def tiny_settings(steps: int = 2) -> TrainSettings:
    return TrainSettings(
        clip=StageConfig(steps, 16, 1e-3, warmup=1),
        vae=StageConfig(steps, 8, 1e-3, warmup=1),
        unet=StageConfig(steps, 8, 1e-3, warmup=1),
        clip_vision=StageConfig(steps, 16, 1e-3, warmup=1),
    )


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    out = tmp_path_factory.mktemp("minisd") / "stack"
    cfg = BuildConfig(
        out=str(out),
        model=TINY,
        train=tiny_settings(),
        n_per_domain=20,
        n_pairs=6,
        judge_epochs=1,
        precision="fp32",
        device="cpu",
        report_to="tensorboard",
    )
    return build(cfg), cfg


def test_captions_name_the_digit_never_the_style():
    rng = np.random.default_rng(0)
    for d in range(10):
        for _ in range(20):
            text = mdata.caption((d,), rng)
            assert mdata.NUMBER_WORDS[d] in text.split() or str(d) in text.split()
            assert not {"mnist", "mnistm", "svhn", "style", "house"} & set(text.lower().split())
    assert mdata.caption((8,), np.random.default_rng(3)).count(" a 8") == 0
    pair = mdata.caption((3, 5), np.random.default_rng(1))
    assert ("3" in pair or "three" in pair) and ("5" in pair or "five" in pair)


def test_appearance_words_are_true_of_the_image():
    flat = np.zeros((28, 28, 3), np.uint8)
    flat[:] = (40, 60, 200)  # a plain blue background
    flat[6:22, 8:20] = (250, 250, 250)  # a sharp white "0"
    flat[9:19, 11:17] = (40, 60, 200)
    seen = mdata.looks(flat)
    assert (seen.digit_colour, seen.background_colour, seen.texture) == ("white", "blue", "plain")
    assert "blurry" not in seen.adjectives
    noisy = flat.copy()
    noisy[:6] = np.random.default_rng(0).integers(0, 255, (6, 28, 3))  # a busy photo along the border
    assert mdata.looks(noisy).texture == "textured"
    soft = np.full((28, 28, 3), 20, np.uint8)
    soft[8:20, 10:18] = 60  # a dim, low-contrast digit
    assert {"blurry", "dark"} <= set(mdata.looks(soft).adjectives)
    assert [mdata.colour_name(np.array(c)) for c in ((220, 30, 30), (30, 200, 40), (10, 10, 10), (128, 128, 130))] == [
        "red",
        "green",
        "black",
        "grey",
    ]
    rng = np.random.default_rng(0)
    texts = [mdata.caption((7,), rng, seen) for _ in range(40)]
    described = [t for t in texts if t.endswith(", white on a plain blue background")]
    assert 5 < len(described) < 35  # about half the captions
    assert not any("blurry" in t or "dark" in t for t in texts)  # adjectives only where true


def test_pairs_keep_each_half(tmp_path):
    singles = mdata.single_digits(10, 0)
    pairs = mdata.digit_pairs(singles, 4, 0)
    assert pairs.images.shape == (4, 32, 64, 3)
    for image, digits, domains in zip(pairs.images, pairs.digits, pairs.domains):
        left = [i for i, d in enumerate(singles.digits) if np.array_equal(singles.images[i], image[:, :32])][0]
        assert singles.digits[left] == digits[:1] and singles.domains[left] == domains[:1]


def test_metadata_round_trip_and_bad_lines(tmp_path):
    singles = mdata.single_digits(10, 0)
    rows = mdata.write_imagefolder(singles, tmp_path)
    write_metadata(rows, tmp_path)
    groups = mdata.load_imagefolder(tmp_path)
    assert list(groups) == [(32, 32)] and groups[(32, 32)].texts == singles.texts
    assert groups[(32, 32)].looks == singles.looks and len(singles.looks) == 20
    np.testing.assert_array_equal(groups[(32, 32)].images, singles.images)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "00000.png", "text": "a 1"}\n{"file_name": 3}\n')
    with pytest.raises(DifflabError, match=r"metadata.jsonl: line 2 needs a string 'file_name'"):
        read_metadata(tmp_path)
    (tmp_path / "metadata.jsonl").write_text("{not json\n")
    with pytest.raises(DifflabError, match="line 1 is not valid JSON"):
        read_metadata(tmp_path)


def test_clip_loss_treats_same_digit_as_positive():
    same = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    good = torch.tensor([[5.0, 5.0, -5.0], [5.0, 5.0, -5.0], [-5.0, -5.0, 5.0]])
    one_positive = torch.eye(3) * 10 - 5
    assert clip_loss(good, same) < clip_loss(one_positive, same)


def test_a_caption_is_a_positive_only_where_it_is_true_of_the_image():
    from difflab.minisd.train import caption_truth

    images = np.zeros((3, 32, 32, 3), np.uint8)
    texts = ["the digit 7, white on a plain blue background", "a 7", "a blurry photo of a 7"]
    looks = [("white digit", "blue background", "plain"), ("black digit", "red background", "textured", "blurry")] * 2
    data = mdata.CaptionedDigits(images, texts, [(7,)] * 3, [("svhn",)] * 3, looks[:3])
    assert mdata.stated(texts[0]) == ("white digit", "plain", "blue background")
    assert mdata.stated(texts[2]) == ("blurry",)
    # rows: images; columns: captions. Image 0 is sharp, so "blurry" is not true of it; image 1 is not blue.
    expected = torch.tensor([[1, 1, 0], [0, 1, 1], [1, 1, 0]], dtype=torch.bool)
    assert torch.equal(caption_truth(data)(torch.arange(3)), expected)
    unknown = mdata.CaptionedDigits(images, texts, [(7,), (7,), (1,)], [("svhn",)] * 3)
    assert torch.equal(caption_truth(unknown)(torch.arange(3)), torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]]).bool())
    # the loss prefers logits that follow the truth, asymmetric as it is, over the digit-only ones
    follows = expected.float() * 10 - 5
    digit_only = torch.ones(3, 3) * 5
    assert clip_loss(follows, expected) < clip_loss(digit_only, expected)


def test_training_loops_lower_their_losses():
    from difflab.clip.tokenizer import load_clip_tokenizer

    singles = mdata.single_digits(30, 0)
    stage = StageConfig(40, 16, 2e-3, warmup=5)
    _, losses = train_clip(singles, load_clip_tokenizer(), TINY, stage, Precision(), torch.device("cpu"), 0)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    settings = TrainSettings(clip=stage, vae=StageConfig(40, 16, 3e-3, warmup=5), unet=stage, clip_vision=stage)
    _, losses = train_vae(singles, TINY, settings, Precision(), torch.device("cpu"), 0)
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])


def test_vision_tuning_lowers_the_loss_and_leaves_the_text_tower_alone():
    from difflab.clip.tokenizer import load_clip_tokenizer

    singles = mdata.single_digits(30, 0)
    clip = build_clip(TINY)
    text = {k: v.clone() for k, v in clip.text_model.state_dict().items()}
    vision = {k: v.clone() for k, v in clip.vision_model.state_dict().items()}
    stage = StageConfig(40, 16, 2e-3, warmup=5)
    clip, losses = tune_vision(clip, singles, load_clip_tokenizer(), stage, Precision(), torch.device("cpu"), 0)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert all(torch.equal(v, clip.text_model.state_dict()[k]) for k, v in text.items())
    assert not all(torch.equal(v, clip.vision_model.state_dict()[k]) for k, v in vision.items())


def test_stack_loads_in_difflab_diffusers_and_transformers(stack):
    from diffusers import StableDiffusionPipeline
    from transformers import pipeline

    from difflab.clip.model import load_clip
    from difflab.personalize.sd import load_sd

    out, cfg = stack
    pipe = StableDiffusionPipeline.from_pretrained(out / "sd", local_files_only=True, safety_checker=None)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size == TINY.text_width
    image = pipe("the number 7", num_inference_steps=2, height=32, width=32, output_type="np").images
    assert image.shape == (1, 32, 32, 3)
    ours = load_sd(out / "sd", device="cpu")
    assert ours.vae.config.scaling_factor == pipe.vae.config.scaling_factor != 0.18215
    clip = load_clip(out / "clip", device="cpu")
    assert clip.model.config.vision_config.image_size == 32
    classify = pipeline("zero-shot-image-classification", model=str(out / "clip"), device="cpu")
    from PIL import Image

    scores = classify(Image.fromarray(mdata.single_digits(10, 0).images[0]), candidate_labels=["one", "two"])
    assert {s["label"] for s in scores} == {"one", "two"}
    log = json.loads((out / "build.json").read_text())
    assert set(log["stages"]) == {"data", "clip_joint", "vae", "sd", "clip", "judges"}
    sd_text = pipe.text_encoder.state_dict()
    assert all(torch.equal(v, sd_text[k]) for k, v in clip.model.text_model.state_dict().items())
    assert set(json.loads((out / "judges" / "domain.json").read_text())["classes"]) == {"mnistm", "svhn"}
    for folder, tag in (("sd", "text-to-image"), ("clip", "zero-shot-image-classification")):
        card = ModelCard.load(out / folder / "README.md")
        assert card.data.pipeline_tag == tag and card.data.library_name == "difflab"
        assert f"--seed {cfg.seed}" in card.text and str(out / folder) in card.text


def test_build_reports_every_training_stage_to_tensorboard(stack):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run,) = (stack[0] / "logs").iterdir()
    events = EventAccumulator(str(run), size_guidance={"tensors": 0}).Reload()
    scalars = set(events.Tags()["scalars"])
    for stage in ("clip_joint", "vae", "sd", "clip"):
        assert {f"{stage}/{k}" for k in ("loss", "lr", "grad_norm", "step_time_s")} <= scalars, stage
        assert [e.step for e in events.Scalars(f"{stage}/loss")] == [2]  # the last step ends the log window
    assert {"judges/mnistm/loss", "judges/svhn/lr", "judges/domain/loss"} <= scalars
    assert any(tag.startswith("vae/precision") for tag in events.Tags()["tensors"])  # text: "fp32 (...)"


def test_build_refuses_an_earlier_build_and_resume_keeps_it(stack, tmp_path):
    out, cfg = stack
    with pytest.raises(DifflabError, match="holds earlier results of `difflab minisd build`.*--resume"):
        build(BuildConfig(out=str(out), model=TINY, train=tiny_settings()))
    before = (out / "sd" / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    build(BuildConfig(out=str(out), model=TINY, train=tiny_settings(), resume=True))
    assert (out / "sd" / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == before
    assert not list(out.glob(".*.tmp"))


def test_the_shipped_stack_was_built_with_the_defaults():
    """The defaults are fixed work, and the stack difflab ships is what `minisd build` makes with them."""
    from dataclasses import asdict

    from difflab.minisd.prebuilt import PREBUILT

    shipped = json.loads((PREBUILT / "stack.json").read_text())["build"]["config"]
    defaults = json.loads(json.dumps(asdict(BuildConfig(out=""))))  # tuples as JSON lists
    assert shipped["train"] == json.loads(json.dumps(asdict(default_settings())))
    assert shipped["model"] == defaults["model"]
    for key in ("n_per_domain", "n_pairs", "judge_epochs", "judge_images", "judge_blur"):
        assert shipped[key] == defaults[key], key


class FakeJudge:
    """Reads the answer off the image: digit = red value of the top-left pixel, domain = green value."""

    def __call__(self, images):
        from difflab.minisd.judges import Verdict

        return Verdict(images[:, 0, 0, 0].astype(np.int64), images[:, 0, 0, 1].astype(np.int64))


def test_rates_and_halves_on_hand_made_cases():
    from difflab.minisd.judges import Verdict, both_halves_right, halves, rates, to_judge_size

    v = Verdict(np.array([1, 2, 3, 4]), np.array([0, 1, 1, 1]))
    r = rates(v, np.array([1, 2, 0, 4]), domain=1)
    assert r == {"n": 4, "digit_accuracy": 0.75, "style_rate": 0.75, "both": 0.5}
    assert "style_rate" not in rates(v, np.array([1, 2, 3, 4]), None)
    canvases = np.zeros((3, 32, 64, 3), dtype=np.uint8)
    canvases[:, 0, 0] = [[3, 1, 0], [3, 1, 0], [3, 0, 0]]  # left: digit 3; style 1, 1, 0
    canvases[:, 0, 32] = [[5, 0, 0], [6, 0, 0], [5, 0, 0]]  # right: digit 5, 6, 5; style 0
    left, right = halves(canvases)
    assert left.shape == right.shape == (3, 32, 32, 3)
    ok = both_halves_right(FakeJudge(), canvases, np.array([[3, 5]] * 3), (1, 0))
    assert ok.tolist() == [True, False, False]
    assert to_judge_size(left).shape == (3, 28, 28, 3)


def test_an_interrupted_stage_leaves_no_folder_and_resume_finishes(stack, tmp_path, monkeypatch):
    import shutil

    from difflab.minisd import build as mbuild

    out = tmp_path / "stack"
    shutil.copytree(stack[0], out)
    shutil.rmtree(out / "vae")
    shutil.rmtree(out / "sd")

    def cut_off(cfg, out, device, log):
        def write(tmp):
            (tmp / "config.json").write_text("{")  # half written
            raise KeyboardInterrupt

        mbuild.write_dir(out / "vae", write)

    real = mbuild.STAGE_FUNCS["vae"]
    monkeypatch.setitem(mbuild.STAGE_FUNCS, "vae", cut_off)
    with pytest.raises(KeyboardInterrupt):
        build(BuildConfig(out=str(out), model=TINY, train=tiny_settings(), resume=True, device="cpu"))
    assert not (out / "vae").exists() and not (out / "sd").exists()
    monkeypatch.setitem(mbuild.STAGE_FUNCS, "vae", real)
    build(BuildConfig(out=str(out), model=TINY, train=tiny_settings(), resume=True, device="cpu", precision="fp32"))
    assert (out / "vae" / "config.json").is_file() and (out / "sd" / "model_index.json").is_file()
    assert not list(out.glob(".*.tmp"))


def test_demo_refuses_an_incomplete_stack(stack, tmp_path):
    import shutil

    from difflab.demos.personalize import PersonalizeDemoConfig, open_stack

    out = tmp_path / "stack"
    shutil.copytree(stack[0], out)
    shutil.rmtree(out / "judges")
    with pytest.raises(DifflabError, match=r"not a complete mini-SD stack \(missing judges\).*--resume"):
        open_stack(PersonalizeDemoConfig(out=str(tmp_path / "demo"), stack=str(out)), tmp_path / "demo")


def test_pack_and_unpack_give_the_same_models_in_standard_folders(stack, tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from difflab.minisd import prebuilt
    from difflab.minisd.judges import Judges

    packed = prebuilt.pack(stack[0], tmp_path / "packed")
    out = prebuilt.unpack(tmp_path / "unpacked", packed)
    assert "the stack difflab ships" in ModelCard.load(out / "sd" / "README.md").text
    for part in ("sd/unet/diffusion_pytorch_model.safetensors", "sd/text_encoder/model.safetensors"):
        before, after = load_file(stack[0] / part), load_file(out / part)
        assert before.keys() == after.keys()
        assert all(torch.equal(before[k].half().float(), after[k]) for k in before), part  # stored as fp16
    pipe = StableDiffusionPipeline.from_pretrained(out / "sd", local_files_only=True, safety_checker=None)
    assert pipe.vae.config.scaling_factor == json.loads((stack[0] / "sd/vae/config.json").read_text())["scaling_factor"]
    judges = Judges(out / "judges")
    assert judges(mdata.single_digits(10, 0).images[:3]).digit.shape == (3,)


def test_unpack_names_what_is_wrong(stack, tmp_path):
    import shutil

    from difflab.minisd import prebuilt

    with pytest.raises(DifflabError, match="no packed mini-SD stack"):
        prebuilt.unpack(tmp_path / "a", tmp_path)
    other = tmp_path / "other"
    shutil.copytree(stack[0], other)
    te = other / "sd/text_encoder/model.safetensors"
    from safetensors.torch import load_file, save_file

    weights = load_file(te)
    key = next(iter(weights))
    weights[key] = weights[key] + 1
    save_file(weights, te)
    with pytest.raises(DifflabError, match="not the CLIP text tower"):
        prebuilt.pack(other, tmp_path / "p2")
    packed = prebuilt.pack(stack[0], tmp_path / "p3")
    (packed / prebuilt.WEIGHTS).write_bytes((packed / prebuilt.WEIGHTS).read_bytes()[:1000])
    with pytest.raises(DifflabError, match=r"stack.safetensors: not a readable safetensors"):
        prebuilt.unpack(tmp_path / "b", packed)


def test_pack_cli_refuses_to_replace_a_packed_stack(stack, tmp_path):
    from typer.testing import CliRunner

    from difflab.cli import app

    runner = CliRunner()
    args = ["minisd", "pack", str(stack[0]), "--out", str(tmp_path / "p")]
    assert runner.invoke(app, args).exit_code == 0
    before = (tmp_path / "p" / "stack.safetensors").stat().st_mtime_ns
    refused = runner.invoke(app, args)
    assert refused.exit_code != 0 and "--overwrite" in str(refused.exception)
    assert (tmp_path / "p" / "stack.safetensors").stat().st_mtime_ns == before


def test_demo_unpacks_the_shipped_stack_and_reuses_it(stack, tmp_path, monkeypatch):
    from difflab.demos.personalize import PersonalizeDemoConfig, open_stack
    from difflab.minisd import prebuilt

    monkeypatch.setattr(prebuilt, "PREBUILT", prebuilt.pack(stack[0], tmp_path / "shipped"))
    demo = tmp_path / "demo"
    cfg = PersonalizeDemoConfig(out=str(demo))
    stack_dir = open_stack(cfg, demo)
    assert stack_dir == demo / "minisd" and (stack_dir / "sd/model_index.json").is_file()
    before = (stack_dir / "sd/unet/diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert open_stack(cfg, demo) == stack_dir
    assert (stack_dir / "sd/unet/diffusion_pytorch_model.safetensors").stat().st_mtime_ns == before


def test_stage_precision_is_measured_on_a_cpu(tmp_path, monkeypatch):
    from difflab.minisd.build import TOLERANCE
    from difflab.minisd.models import build_vae
    from difflab.precision import CANDIDATES, native_bf16, settle_training

    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path))
    x = torch.randn(2, 3, 32, 32)

    def settle():
        cpu = torch.device("cpu")
        return settle_training(
            "auto", cpu, "VAE test", lambda: build_vae(TINY), lambda m, p: m(p.input(x)).sample, tolerance=TOLERANCE
        )

    chosen = settle()
    expected = {c.label for c in CANDIDATES if native_bf16() or c.dtype is None}
    assert chosen.how == "measured" and set(chosen.timings_ms) == expected == set(chosen.errors)
    assert chosen.errors[chosen.label] <= TOLERANCE and chosen.errors["fp32+channels_last"] < 1e-4
    again = settle()
    assert again.how == "cached" and again.label == chosen.label


def test_unet_loop_lowers_its_loss():
    from difflab.minisd.train import LatentSet, train_unet

    g = torch.Generator().manual_seed(0)
    patterns = torch.randn(4, 4, 8, 8, generator=g)
    which = torch.arange(64) % 4
    singles = LatentSet(patterns[which], torch.full((64, 4, 8, 8), 0.05), which)
    captions = torch.randn(5, 77, TINY.text_width, generator=g)  # one per pattern + the empty caption
    settings = TrainSettings(
        clip=StageConfig(1, 1, 1e-3),
        vae=StageConfig(1, 1, 1e-3),
        unet=StageConfig(60, 16, 3e-3, warmup=5),
        clip_vision=StageConfig(1, 1, 1e-3),
    )
    ema, losses = train_unet([singles], captions, 4, 1.0, TINY, settings, Precision(), torch.device("cpu"), 0)
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10])
    assert not ema.training


def test_personalize_demo_runs_end_to_end_on_a_tiny_stack(stack, tmp_path, capsys):
    from difflab.demos.personalize import PersonalizeDemoConfig, run_demo

    cfg = PersonalizeDemoConfig(
        out=str(tmp_path / "demo"),
        stack=str(stack[0]),
        n_heldout=2,
        ti_steps=2,
        ti_batch=2,
        per_prompt=2,
        top_k=1,
        steps=2,
        compose_seeds=1,
        device="cpu",
        precision="fp32",
    )
    metrics = run_demo(cfg)
    out = tmp_path / "demo"
    for path in (
        "report.html",
        "metrics.json",
        "input.json",
        "ti/learned_embeds.safetensors",
        "generated/0/9/source0_prompt9_1.png",
        "score/prompt_scores.json",
        "zeroshot/ensemble/report.html",
    ):
        assert (out / path).is_file(), path
    assert set(metrics["generation"]) == {"base_digit_accuracy", "<new1>", "<new2>"}
    compose = metrics["compose"]
    assert compose["development"]["n"] == 10 and compose["held-out"]["n"] == 20 and compose["finder"] == "clip"
    assert compose["layouts"] == 4  # the CLIP finder's default number of stage-1 images
    assert all(0 <= compose[s][k] <= 1 for s in ("development", "held-out") for k in ("composed", "composed_auto"))
    low, high = compose["held-out"]["composed_auto_interval"]
    assert 0 <= low <= compose["held-out"]["composed_auto"] <= high <= 1
    assert (out / "compose" / "layouts.png").is_file()
    assert metrics["zeroshot"]["one template"]["n"] == 20
    assert "CLIP zero-shot top-1, ensemble" in capsys.readouterr().out
    with pytest.raises(DifflabError, match="holds earlier results of `difflab personalize demo`"):
        run_demo(cfg)


def test_edge_loss_sees_lost_texture():
    from difflab.minisd.train import edge_loss

    x = torch.zeros(1, 3, 8, 8)
    x[..., ::2, :] = 1.0  # stripes
    flat = torch.full_like(x, 0.5)  # what an MSE-optimal blur of them looks like
    assert edge_loss(x, x) == 0
    assert torch.nn.functional.mse_loss(flat, x) == 0.25 and edge_loss(flat, x) == 1.0


def test_build_cli_range_checks_before_writing(tmp_path):
    from typer.testing import CliRunner

    from difflab.cli import app

    runner = CliRunner()
    for option, value, message in (
        ("--unet-steps", "0", "--unet-steps = 0: must be at least 1"),
        ("--per-domain", "3", "--per-domain = 3: must be at least 10"),
        ("--vae-edge-weight", "-1", "--vae-edge-weight = -1.0: must be in [0, 100]"),
    ):
        result = runner.invoke(app, ["minisd", "build", "--out", str(tmp_path / "s"), option, value])
        assert result.exit_code != 0 and message in str(result.exception), option
    assert not (tmp_path / "s").exists()
