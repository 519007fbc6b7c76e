"""The conditional digits model: network contract, guidance, training with resume, sampling layout, CLI."""

import json
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from typer.testing import CliRunner

import difflab.digits.train
from difflab.cli import app
from difflab.digits.data import make_dataset
from difflab.digits.model import ScheduleConfig, load_digits_model, save_model
from difflab.digits.sample import (
    SampleConfig,
    course_name,
    guided_digits_eps,
    make_conds,
    reverse_process_strip,
    write_course_layout,
)
from difflab.digits.train import PRESETS, TrainConfig, train
from difflab.nets.digits_unet import DigitsUNet, DigitsUNetConfig
from difflab.utils import DifflabError

TINY = DigitsUNetConfig(channels=(8, 16, 16), emb_dim=32)
runner = CliRunner()


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    make_dataset(root, n_per_domain=100, n_test_per_domain=20, seed=0)
    return root


@pytest.fixture
def tiny_preset(monkeypatch):
    monkeypatch.setitem(PRESETS, "tiny", TINY)
    return "tiny"


def test_net_shapes_and_null_condition():
    net = DigitsUNet(TINY)
    x, t = torch.randn(3, 3, 28, 28), torch.tensor([0, 500, 999])
    cond = make_conds([0, 1, 2], [3, 10, 9])  # 2 = null domain, 10 = null digit
    assert net(x, t, cond).shape == x.shape
    with pytest.raises(ValueError):
        net(torch.randn(3, 1, 28, 28), t, cond)
    # The condition must matter: another digit changes the output.
    assert not torch.allclose(net(x, t, make_conds([0] * 3, [1] * 3)), net(x, t, make_conds([0] * 3, [2] * 3)))


def test_conv_before_upsample_is_cheaper_and_keeps_the_shapes():
    from torch.utils.flop_counter import FlopCounterMode

    x, t, cond = torch.randn(2, 3, 28, 28), torch.tensor([0, 499]), make_conds([0, 1], [3, 10])

    def forward_flops(config: DigitsUNetConfig) -> int:
        with FlopCounterMode(display=False) as counter:
            assert DigitsUNet(config)(x, t, cond).shape == x.shape
        return counter.get_total_flops()

    after = DigitsUNetConfig(channels=(16, 32), patch=2, emb_dim=32)
    assert forward_flops(replace(after, conv_before_upsample=True)) < 0.9 * forward_flops(after)


def test_per_factor_guidance_equals_its_formula():
    torch.manual_seed(0)
    net = DigitsUNet(TINY).eval()
    x, t = torch.randn(2, 3, 28, 28), torch.tensor([10, 10])
    cond = make_conds([0, 1], [4, 7])
    nd, ng = net.null_cond
    with torch.no_grad():
        e_full = net(x, t, cond)
        e_dom = net(x, t, make_conds([0, 1], [ng, ng]))
        e_none = net(x, t, make_conds([nd, nd], [ng, ng]))
        out = guided_digits_eps(net, cond, guidance_digit=4.0, guidance_domain=2.0)(x, t)
    torch.testing.assert_close(out, e_none + 2.0 * (e_dom - e_none) + 4.0 * (e_full - e_dom), atol=1e-5, rtol=1e-5)


def test_guidance_in_an_interval_is_the_conditional_outside_it():
    torch.manual_seed(0)
    net = DigitsUNet(TINY).eval()
    x, cond = torch.randn(2, 3, 28, 28), make_conds([0, 1], [4, 7])
    guided_everywhere = guided_digits_eps(net, cond, 4.0, 1.0)
    in_interval = guided_digits_eps(net, cond, 4.0, 1.0, interval=(100, 300))
    with torch.no_grad():
        for t in (50, 100, 300, 301):
            tt = torch.tensor([t, t])
            expected = guided_everywhere(x, tt) if 100 <= t <= 300 else net(x, tt, cond)
            torch.testing.assert_close(in_interval(x, tt), expected)
    assert SampleConfig(guidance_interval=(0.2, 0.6)).interval_steps(ScheduleConfig(num_steps=501).build()) == (
        100,
        300,
    )
    assert SampleConfig().interval_steps(ScheduleConfig().build()) is None
    with pytest.raises(DifflabError, match="guidance interval"):
        SampleConfig(guidance_interval=(0.7, 0.2)).interval_steps(ScheduleConfig().build())


def test_sampler_timesteps_follow_the_spacing():
    schedule = ScheduleConfig(num_steps=500).build()
    assert SampleConfig(method="ddim", steps=10).timesteps(schedule)[:2] == [499, 449]
    assert SampleConfig(method="ddim", steps=10, spacing="leading").timesteps(schedule)[:2] == [451, 401]
    with pytest.raises(DifflabError, match="unknown spacing 'middle'"):
        SampleConfig(spacing="middle").timesteps(schedule)


def test_demo_seeds_reach_the_sampler(tmp_path):
    from difflab.demos.digits import DemoConfig

    torch.manual_seed(0)
    ckpt = save_model(tmp_path / "model", DigitsUNet(TINY), ScheduleConfig(num_steps=50))
    net, schedule, _ = load_digits_model(ckpt)
    cpu = torch.device("cpu")

    def images(seed: int, folder: str) -> np.ndarray:
        cfg = DemoConfig(seed=seed, precision="fp32")
        sampler = replace(cfg.sample_config().for_model({}), steps=3)
        layout = write_course_layout(net, schedule, tmp_path / folder, sampler, cpu, 2)
        return np.concatenate(list(layout.values()))

    one, two, one_again = images(1, "a"), images(2, "b"), images(1, "c")
    assert not np.array_equal(one, two)
    assert np.array_equal(one, one_again)


def test_the_default_recipe_costs_what_the_readme_says():
    from difflab.digits.train import step_flops, training_tflop

    cfg = TrainConfig("data", "out")
    adamw, double = replace(cfg, optimizer="adamw"), 2 * cfg.batch_size
    assert step_flops(replace(adamw, batch_size=double)) == 2 * step_flops(adamw)
    # Muon's Newton-Schulz work is per weight matrix, not per image
    assert step_flops(replace(cfg, batch_size=double)) - step_flops(cfg) == step_flops(adamw)
    assert round(step_flops(cfg) / 1e9, 2) == 9.97 and round(training_tflop(cfg), 1) == 45.0


def test_learning_rate_warms_up_then_decays_to_its_final_fraction():
    from difflab.digits.train import lr_at

    cfg = TrainConfig("data", "out", steps=1000, lr=2e-3, warmup_steps=100, lr_final=0.25)
    assert lr_at(0, cfg) == pytest.approx(2e-5) and lr_at(99, cfg) == pytest.approx(2e-3)
    assert lr_at(550, cfg) == pytest.approx(2e-3 * (0.25 + 0.75 / 2))
    assert lr_at(1000, cfg) == pytest.approx(5e-4) and lr_at(500, cfg, total_steps=500) == pytest.approx(5e-4)
    assert lr_at(1000, replace(cfg, lr_final=0.0)) == 0.0


def _weights(folder):
    return load_file(str(Path(folder) / "model.safetensors"))


class Killed(Exception):
    pass


def kill(net, schedule, seed, guidance):
    raise Killed


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_training_lowers_loss_saves_atomically_and_resumes_exactly(
    data_root, tiny_preset, tmp_path, monkeypatch, optimizer
):
    common = dict(
        data_root=str(data_root),
        preset=tiny_preset,
        optimizer=optimizer,
        batch_size=16,
        lr=2e-3,
        warmup_steps=2,
        save_every=3,
        log_every=2,
        device="cpu",
        precision="fp32",
    )  # a save inside a log window
    straight = train(TrainConfig(out_dir=str(tmp_path / "a"), steps=6, **common))
    with pytest.raises(Killed), monkeypatch.context() as m:  # killed right after the save at step 3, in a log window
        m.setattr(difflab.digits.train, "progress_grid", kill)
        train(TrainConfig(out_dir=str(tmp_path / "b"), steps=6, sample_every=3, **common))
    resumed = train(TrainConfig(out_dir=str(tmp_path / "b"), steps=6, resume=True, **common))
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    losses = json.loads((tmp_path / "a" / "losses.json").read_text())
    assert losses["steps"] == [2, 4, 6]
    resumed_losses = json.loads((tmp_path / "b" / "losses.json").read_text())
    assert resumed_losses["steps"] == losses["steps"]
    assert resumed_losses["loss"] == pytest.approx(losses["loss"], rel=1e-5)
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["model"] == "digits_unet" and config["steps"] == 6
    assert not list((tmp_path / "a").glob("*.tmp")), "no temp files left behind"
    net, schedule, _ = load_digits_model(tmp_path / "a")
    assert schedule.num_steps == 500 and isinstance(net, DigitsUNet)


def test_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    net = DigitsUNet(TINY)
    sched = ScheduleConfig().build()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    x0 = torch.rand(16, 3, 28, 28) * 2 - 1
    cond = make_conds([0] * 16, list(range(10)) + list(range(6)))
    t, noise = torch.randint(0, sched.num_steps, (16,)), torch.randn(16, 3, 28, 28)
    losses = []
    for _ in range(30):
        loss = sched.training_loss(lambda x, tt: net(x, tt, cond), x0, t, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_resume_errors_are_clear(data_root, tiny_preset, tmp_path):
    cfg = TrainConfig(
        data_root=str(data_root), out_dir=str(tmp_path / "none"), preset=tiny_preset, steps=2, resume=True, device="cpu"
    )
    with pytest.raises(DifflabError, match="nothing to resume"):
        train(cfg)
    train(TrainConfig(**{**cfg.__dict__, "out_dir": str(tmp_path / "bad"), "resume": False}))
    (tmp_path / "bad" / "train_state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DifflabError, match="not a readable training state: not a PyTorch file"):
        train(TrainConfig(**{**cfg.__dict__, "out_dir": str(tmp_path / "bad")}))


def test_wrong_checkpoints_are_rejected(tmp_path):
    save_model(tmp_path / "ok", DigitsUNet(TINY), ScheduleConfig())
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model": "face_unet"}))
    with pytest.raises(DifflabError, match="not a difflab digits model; it describes model 'face_unet'"):
        load_digits_model(tmp_path / "other")
    # from_pretrained on another kind of model folder names what it found there.
    from difflab import DigitsPipeline

    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(DifflabError, match="it describes _class_name 'UNet2DModel'"):
        DigitsPipeline.from_pretrained(tmp_path / "unet")
    (tmp_path / "sd").mkdir()
    (tmp_path / "sd" / "model_index.json").write_text("{}")
    with pytest.raises(DifflabError, match="holds a diffusers pipeline"):
        DigitsPipeline.from_pretrained(tmp_path / "sd")
    # Weights of another shape under a matching config: the keys that differ are named.
    shutil.copytree(tmp_path / "ok", tmp_path / "mixed")
    cfg = json.loads((tmp_path / "ok" / "config.json").read_text())
    cfg["net"]["channels"] = [8, 16, 32]
    (tmp_path / "mixed" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DifflabError, match="wrong shapes"):
        load_digits_model(tmp_path / "mixed")
    with pytest.raises(DifflabError, match="not found"):
        load_digits_model(tmp_path / "missing")


def test_course_layout_and_figures(tmp_path):
    torch.manual_seed(0)
    net = DigitsUNet(TINY).eval()
    sched = ScheduleConfig().build()
    cfg = SampleConfig(steps=3, batch_size=7, precision="fp32", guidance_digit=5.5)
    images = write_course_layout(net, sched, tmp_path, cfg, torch.device("cpu"), per_digit=2)
    for domain in ("mnistm", "svhn"):
        names = sorted(p.name for p in (tmp_path / domain).iterdir())
        assert names == sorted(f"{d}_{i:03d}.png" for d in range(10) for i in (1, 2))
        assert images[domain].shape == (20, 28, 28, 3)
    # Batching does not change images, up to numerics: each image draws its noise from its own generator, but CPU
    # kernels may sum in another order for another batch size (a few pixels then differ by one grey level).
    again = write_course_layout(
        net,
        sched,
        tmp_path / "again",
        SampleConfig(steps=3, batch_size=40, precision="fp32", guidance_digit=5.5),
        torch.device("cpu"),
        per_digit=2,
    )
    diff = np.abs(images["svhn"].astype(int) - again["svhn"])
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    strip, ts = reverse_process_strip(net, sched, cfg, torch.device("cpu"))
    assert strip.shape[0] > 2 * 28 and ts[0] > ts[-1] == 0 and len(ts) == 6
    # The strip's last frame is the layout's first 0 of the first domain.
    np.testing.assert_array_equal(strip[2:30, -30:-2], images["mnistm"][0])


def test_cli_train_sample_evaluate(data_root, tiny_preset, tmp_path):
    from difflab.digits.classifier import train_classifiers

    ckpt = tmp_path / "ckpt"
    r = runner.invoke(
        app,
        [
            "digits",
            "train",
            "--data-root",
            str(data_root),
            "--out",
            str(ckpt),
            "--preset",
            tiny_preset,
            "--steps",
            "2",
            "--batch-size",
            "8",
            "--device",
            "cpu",
            "--sample-every",
            "2",
        ],
    )
    assert r.exit_code == 0, r.output
    assert (ckpt / "progress" / "step_000002.png").is_file()
    r = runner.invoke(
        app,
        [
            "digits",
            "sample",
            "--ckpt",
            str(ckpt),
            "--out",
            str(tmp_path / "out"),
            "--per-digit",
            "2",
            "--steps",
            "2",
            "--device",
            "cpu",
        ],
    )
    assert r.exit_code == 0, r.output
    assert len(list((tmp_path / "out" / "mnistm").glob("*.png"))) == 20
    assert (tmp_path / "out" / "figures" / "grid_svhn.png").is_file()
    train_classifiers(data_root, tmp_path / "clf", epochs=1, device="cpu", judge_pool=0)
    evaluate = ["digits", "evaluate", str(tmp_path / "out"), "--classifiers", str(tmp_path / "clf")]
    r = runner.invoke(app, [*evaluate, "--model", str(ckpt)])
    assert r.exit_code == 0, r.output
    assert "acc = " in r.output and "(correct/total = " in r.output
    card = ModelCard.load(ckpt / "README.md")
    assert card.data.library_name == "difflab" and "digits" in card.data.tags and card.data.license == "mit"
    assert card.data.pipeline_tag == "unconditional-image-generation"
    assert "TFLOP" in card.text and "DigitsPipeline.from_pretrained" in card.text and (ckpt / "samples.png").is_file()
    metrics = {r.metric_type: r.metric_value for r in card.data.eval_results}
    result = json.loads((tmp_path / "out" / "eval" / "metrics.json").read_text())
    assert metrics["accuracy"] == pytest.approx(result["accuracy"])
    assert metrics["accuracy_svhn"] == pytest.approx(result["domains"]["svhn"]["accuracy"])


@pytest.fixture
def tiny_ckpt(tmp_path):
    torch.manual_seed(0)
    return save_model(tmp_path / "model", DigitsUNet(TINY), ScheduleConfig(num_steps=50))


def sample_args(ckpt: Path, out: Path) -> list[str]:
    options = ["--per-digit", "3", "--steps", "3", "--batch-size", "7", "--precision", "fp32", "--device", "cpu"]
    return ["digits", "sample", "--ckpt", str(ckpt), "--out", str(out), *options]


def test_two_processes_sample_the_same_files_as_one(tiny_ckpt, tmp_path, launch, folder_bytes):
    # One thread per process in both runs: in fp32 another thread count may sum in another order.
    one = launch(sample_args(tiny_ckpt, tmp_path / "one"), 1)
    assert one.returncode == 0, one.stderr[-3000:]
    two = launch(sample_args(tiny_ckpt, tmp_path / "two"), 2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("60 images in") == 1  # only the main process reports
    made = folder_bytes(tmp_path / "one")
    assert {"mnistm/9_003.png", "figures/grid_svhn.png", "figures/reverse_process.png"} <= set(made)
    assert folder_bytes(tmp_path / "two").keys() == made.keys()
    assert folder_bytes(tmp_path / "two") == made


def test_sampling_resumes_where_it_stopped(tiny_ckpt, tmp_path, folder_bytes):
    out = tmp_path / "out"
    assert runner.invoke(app, sample_args(tiny_ckpt, out)).exit_code == 0
    made = folder_bytes(out)
    for name in ("mnistm/0_001.png", "svhn/4_002.png", "svhn/9_003.png"):  # a run killed before writing these
        (out / name).unlink()
    kept = (out / "mnistm" / "5_001.png").stat().st_mtime_ns
    r = runner.invoke(app, sample_args(tiny_ckpt, out))
    assert r.exit_code == 1 and "--resume" in str(r.exception)
    r = runner.invoke(app, [*sample_args(tiny_ckpt, out), "--resume"])
    assert r.exit_code == 0, r.output
    assert folder_bytes(out) == made
    assert (out / "mnistm" / "5_001.png").stat().st_mtime_ns == kept  # a finished batch is not sampled again
    r = runner.invoke(app, [*sample_args(tiny_ckpt, out), "--resume", "--guidance-digit", "2"])
    assert r.exit_code == 1 and "guidance_digit: 5.5 then, 2.0 now" in str(r.exception)


def test_processes_that_disagree_on_the_folder_write_nothing(tiny_ckpt, tmp_path, launch):
    script = tmp_path / "each_its_own_out.py"
    script.write_text(
        "import os, sys\n"
        "from difflab.cli import main\n"
        "i = sys.argv.index('--out') + 1\n"
        "sys.argv[i] += os.environ['RANK']\n"
        "main()\n"
    )
    r = launch(sample_args(tiny_ckpt, tmp_path / "out"), 2, script)
    assert r.returncode != 0
    assert "the 2 processes disagree on --out" in r.stderr
    assert not list(tmp_path.glob("out*"))


def test_large_layouts_number_their_files_wider():
    assert course_name(3, 0, 50) == "3_001.png" and course_name(3, 4999, 5000) == "3_5000.png"
    assert course_name(3, 0, 5000) == "3_0001.png"


def test_two_process_cpu_training(data_root, tmp_path, launch):
    """Data-parallel training with two CPU processes: accelerate picks up torchrun's environment (gloo)."""
    out = tmp_path / "ddp"
    args = ["digits", "train", "--data-root", str(data_root), "--out", str(out), "--steps", "2", "--batch-size", "4",
            "--precision", "fp32", "--device", "cpu"]  # fmt: skip
    proc = launch(args, 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = torch.load(out / "train_state.pt", weights_only=True)
    assert state["step"] == 2 and len(state["rng"]) == 2  # one RNG state per process
    assert not torch.equal(state["rng"][0], state["rng"][1])


def test_time_budget_shortens_the_run_and_saves(data_root, tiny_preset, tmp_path):
    cfg = TrainConfig(
        data_root=str(data_root),
        out_dir=str(tmp_path / "t"),
        preset=tiny_preset,
        steps=10_000,
        batch_size=4,
        max_minutes=1e-4,
        save_every=10_000,
        device="cpu",
        precision="fp32",
    )
    train(cfg)
    config = json.loads((tmp_path / "t" / "config.json").read_text())
    assert config["steps"] == 21  # fitted after the 20 timing steps; the budget is long spent by then


def test_earlier_work_is_never_replaced_and_resume_must_match(data_root, tiny_preset, tmp_path, folder_state):
    common = dict(
        data_root=str(data_root),
        preset=tiny_preset,
        batch_size=4,
        save_every=2,
        device="cpu",
        precision="fp32",
        out_dir=str(tmp_path / "run"),
    )
    run = tmp_path / "run"
    train(TrainConfig(steps=2, **common))
    (run / ".model.safetensors.x1.tmp").write_bytes(b"left by a killed save")
    state = folder_state(run)
    with pytest.raises(DifflabError, match="holds earlier results of `difflab digits train` .*--resume.*--overwrite"):
        train(TrainConfig(steps=2, **common))
    assert folder_state(run) == state  # a refused run touches nothing, not even stale temp files
    other = ScheduleConfig(num_steps=100, prediction="v_prediction")
    refusals = [
        ({"schedule": other}, 'schedule = .*"num_steps": 500.*resume with the same options'),
        ({"seed": 1}, "the run was started with seed = 0, not 1"),
        ({"optimizer": "adamw"}, 'the run was started with optimizer = "muon", not "adamw"'),
    ]
    for options, message in refusals:
        with pytest.raises(DifflabError, match=message):
            train(TrainConfig(**{"steps": 4, "resume": True, **common, **options}))
        assert folder_state(run) == state
    train(TrainConfig(steps=3, overwrite=True, **common))
    assert json.loads((run / "config.json").read_text())["steps"] == 3
    assert not list(run.glob(".*.tmp"))  # an accepted run clears them
    for bad, message in (
        (torch.zeros(3), "missing net, ema"),
        ({"net": {}, "ema": {}}, "missing opt"),
        (b"", "not a readable training state"),
        (b"PK\x03\x04 truncated", "not a readable training state"),
    ):
        if isinstance(bad, bytes):
            (run / "train_state.pt").write_bytes(bad)
        else:
            torch.save(bad, run / "train_state.pt")
        state = folder_state(run)
        with pytest.raises(DifflabError, match=message):
            train(TrainConfig(steps=4, resume=True, **common))
        assert folder_state(run) == state


def test_a_zero_terminal_snr_model_trains_saves_and_samples(data_root, tiny_preset, tmp_path):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    from difflab import DigitsPipeline

    r = runner.invoke(app, ["digits", "train", "--data-root", str(data_root), "--out", str(tmp_path / "m"),
                            "--preset", tiny_preset, "--steps", "2", "--batch-size", "4", "--precision", "fp32",
                            "--zero-terminal-snr"])  # fmt: skip
    assert r.exit_code == 0, r.output
    pipe = DigitsPipeline.from_pretrained(tmp_path / "m")
    assert pipe.schedule.alphas_cumprod[-1] == 0 and pipe.config.timesteps(pipe.schedule)[0] == 499
    images = pipe(digit=[1, 2], num_images=2, num_inference_steps=4, output_type="pt").images
    assert torch.isfinite(images).all() and images.std() > 0
    for scheduler in (DDIMScheduler, DPMSolverMultistepScheduler):  # both step from ᾱ_T = 0 once configured for it
        scheduler = scheduler.from_config(pipe.scheduler_config())
        out = pipe(digit=[1, 2], num_images=2, num_inference_steps=4, output_type="pt", scheduler=scheduler).images
        assert torch.isfinite(out).all(), type(scheduler).__name__


def test_model_guidance_shifts_the_target_by_its_formula():
    from difflab.digits.train import guidance_shift, guidance_weight

    torch.manual_seed(0)
    net, schedule = DigitsUNet(TINY), ScheduleConfig(prediction="v_prediction").build()
    x0, noise = torch.rand(4, 3, 28, 28) * 2 - 1, torch.randn(4, 3, 28, 28)
    t, cond = torch.tensor([10, 150, 300, 450]), make_conds([0, 1, 0, 1], [3, 10, 7, 2])  # 10: the digit dropped
    w = 0.75
    loss = schedule.training_loss(
        lambda x, tt: net(x, tt, cond), x0, t, noise, target_shift=guidance_shift(net, cond, w, 10)
    )
    x_t = schedule.q_sample(x0, t, noise)
    with torch.no_grad():
        pred, no_digit = net(x_t, t, cond), net(x_t, t, make_conds([0, 1, 0, 1], [10] * 4))
    given = torch.tensor([1.0, 0.0, 1.0, 1.0]).view(-1, 1, 1, 1)  # a sample without its digit learns the plain target
    target = schedule.velocity(x0, t, noise) + w * given * (pred - no_digit)
    assert loss.item() == pytest.approx(torch.nn.functional.mse_loss(pred, target).item(), rel=1e-5)
    # w = 1 - 1/s, after the start and ramped in over the warm-up; 0 when off.
    cfg = TrainConfig("d", "o", steps=1000, warmup_steps=100, model_guidance=4.0, model_guidance_start=0.5)
    assert guidance_weight(cfg, 499) == 0 and guidance_weight(cfg, 549) == pytest.approx(0.75 / 2)
    assert guidance_weight(cfg, 999) == 0.75 and guidance_weight(replace(cfg, model_guidance=1.0), 999) == 0
    # A fine-tune restarts the EMA's warm-up: it averages only weights that learned the guided target.
    from difflab.digits.train import ema_decay_at

    assert ema_decay_at(cfg, 499) == pytest.approx(500 / 509) and ema_decay_at(cfg, 500) == pytest.approx(0.1)
    assert ema_decay_at(replace(cfg, model_guidance=1.0), 500) == pytest.approx(501 / 510)  # no restart without it


def test_model_guidance_is_counted_and_trains(data_root, tiny_preset, tmp_path):
    from difflab.digits.train import forward_flops, step_flops, training_tflop

    cfg = TrainConfig("d", "o", steps=100, model_guidance=4.0, model_guidance_start=0.25)
    assert training_tflop(cfg) * 1e12 == pytest.approx(100 * step_flops(cfg) + 75 * forward_flops(cfg))
    assert 0.2 < forward_flops(cfg) / step_flops(cfg) < 0.4  # a forward pass, without backward or optimiser
    r = runner.invoke(app, ["digits", "train", "--data-root", str(data_root), "--out", str(tmp_path / "m"),
                            "--preset", tiny_preset, "--steps", "3", "--batch-size", "4", "--precision", "fp32",
                            "--model-guidance", "3"])  # fmt: skip
    assert r.exit_code == 0, r.output
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["train"]["model_guidance"] == 3.0
    # Sampled as trained: one network pass per step unless told otherwise; a classifier-free model at 5.5.
    from difflab import DigitsPipeline
    from difflab.digits.sample import CFG_GUIDANCE, SampleConfig

    assert DigitsPipeline.from_pretrained(tmp_path / "m").config.guidance_digit == 1.0
    assert SampleConfig().for_model({"train": {}}).guidance_digit == CFG_GUIDANCE
    assert SampleConfig(guidance_digit=2.0).for_model(config).guidance_digit == 2.0
    r = runner.invoke(app, ["digits", "train", "--data-root", str(data_root), "--out", str(tmp_path / "m"),
                            "--preset", tiny_preset, "--steps", "4", "--batch-size", "4", "--resume"])  # fmt: skip
    assert "the run was started with model_guidance = [3.0, 0.0], not [1.0, 0.0]" in str(r.exception)


def test_bad_options_and_configs_give_one_line(data_root, tmp_path):
    for args, message in (
        (["--save-every", "0"], "save-every"),
        (["--timesteps", "0"], "timesteps"),
        (["--prediction", "x0"], "unknown prediction 'x0'"),
        (["--zero-terminal-snr", "--prediction", "epsilon"], "a zero terminal SNR schedule needs v_prediction"),
        (["--timestep-sampling", "lognormal"], "unknown timestep sampling 'lognormal'"),
        (["--optimizer", "sgd"], "unknown optimizer 'sgd'; choose one of adamw, muon"),
        (["--min-snr-gamma", "0"], "needs a min-SNR γ (--min-snr-gamma > 0); without one, pass --timestep-sampling"),
    ):
        r = runner.invoke(app, ["digits", "train", "--data-root", str(data_root), "--out", str(tmp_path / "x"), *args])
        assert r.exit_code != 0 and message in (r.output + str(r.exception)), (args, r.output)
    save_model(tmp_path / "m", DigitsUNet(TINY), ScheduleConfig())
    sample = ["digits", "sample", "--ckpt", str(tmp_path / "m"), "--out", str(tmp_path / "o")]
    for args, message in (
        (["--steps", "1000"], "1..500"),
        (["--spacing", "middle"], "unknown spacing 'middle'"),
        (["--method", "euler"], "unknown sampler 'euler'"),
    ):
        r = runner.invoke(app, [*sample, *args])
        assert isinstance(r.exception, DifflabError) and message in str(r.exception), args
        assert not (tmp_path / "o").exists(), args  # refused before the output folder is made
    r = runner.invoke(
        app, ["digits", "sample", "--ckpt", str(tmp_path / "m"), "--out", str(tmp_path / "o"), "--eta", "-1"]
    )
    assert r.exit_code == 2 and "--eta" in r.output
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    for broken in ({k: v for k, v in config.items() if k != "net"}, [1, 2], {**config, "schedule": {"kind": "zigzag"}}):
        (tmp_path / "m" / "config.json").write_text(json.dumps(broken))
        with pytest.raises(DifflabError, match="config.json: (invalid digits model config|not a difflab digits)"):
            load_digits_model(tmp_path / "m")
    r = runner.invoke(app, ["digits", "make-data", "--out", str(data_root), "--n-per-domain", "10", "--n-val", "10"])
    assert isinstance(
        r.exception, DifflabError
    ) and "holds earlier results of `difflab digits make-data` (digits)" in str(r.exception)


def test_ctrl_c_saves_a_resumable_checkpoint_and_says_how_to_go_on(data_root, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "difflab.cli", "digits", "train", "--data-root", str(data_root), "--out", str(out)]
    cmd += ["--steps", "100000", "--batch-size", "4", "--precision", "fp32", "--device", "cpu", "--save-every", "50000"]
    cmd += ["--seed", str(2**63 - 1)]  # the largest seed works everywhere
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # training starts right after the precision line
        if line.startswith("precision:"):
            break
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: stopped at step ") and "continue with --resume" in last, last
    step = int(last.split("step ")[1].split()[0])
    assert torch.load(out / "train_state.pt", weights_only=True)["step"] == step > 0
    resumed = subprocess.run(
        [*cmd[: cmd.index("--steps") + 1], str(step + 2), *cmd[cmd.index("--steps") + 2 :], "--resume"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert torch.load(out / "train_state.pt", weights_only=True)["step"] == step + 2


def test_pipeline_draws_the_images_of_digits_sample(tmp_path):
    from PIL import Image

    from difflab import DigitsPipeline
    from difflab.digits.pipeline import layout_generators

    torch.manual_seed(0)
    ckpt = save_model(tmp_path / "model", DigitsUNet(TINY), ScheduleConfig(num_steps=50))
    args = ["--ckpt", str(ckpt), "--out", str(tmp_path / "s"), "--per-digit", "3", "--steps", "3", "--seed", "5"]
    r = runner.invoke(app, ["digits", "sample", *args, "--precision", "fp32", "--no-figures"])
    assert r.exit_code == 0, r.output
    pipe = DigitsPipeline.from_pretrained(ckpt).to("cpu")
    out = pipe(
        domain="svhn",
        digit=7,
        num_images=3,
        num_inference_steps=3,
        generator=layout_generators(5, "svhn", 7, 3),
        output_type="np",
    )
    ours = np.round(out.images * 255).astype(int)
    theirs = np.stack([np.asarray(Image.open(tmp_path / "s" / "svhn" / f"7_00{n}.png")) for n in (1, 2, 3)])
    # The same noises; another batch composition may move a few pixels by one grey level (CPU kernels).
    diff = np.abs(ours - theirs)
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    pils = pipe(domain=1, digit=[1, 2], num_images=2, num_inference_steps=2).images
    assert [p.size for p in pils] == [(28, 28)] * 2
    pt = pipe(num_images=2, num_inference_steps=2, output_type="pt").images
    assert pt.shape == (2, 3, 28, 28) and 0 <= pt.min() and pt.max() <= 1
    for bad, match in (({"domain": "mnist"}, "domain"), ({"digit": 10}, "digit"), ({"output_type": "jpg"}, "output")):
        with pytest.raises(DifflabError, match=match):
            pipe(num_inference_steps=1, **bad)


def test_training_reports_to_tensorboard(data_root, tiny_preset, tmp_path):
    pytest.importorskip("tensorboard", reason="the [track] extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = ["--data-root", str(data_root), "--out", str(tmp_path / "m"), "--preset", tiny_preset, "--steps", "5"]
    more = ["--batch-size", "4", "--report-to", "tensorboard", "--validation-every", "2", "--device", "cpu"]
    r = runner.invoke(app, ["digits", "train", *args, *more, "--precision", "fp32"])
    assert r.exit_code == 0, r.output
    (run,) = (tmp_path / "m" / "logs").iterdir()
    events = EventAccumulator(str(run), size_guidance={"images": 0}).Reload()
    assert {"loss", "lr", "grad_norm", "step_time_s"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("loss")] == [5]  # one log window of 20 steps, cut at the last step
    assert [e.step for e in events.Images("validation")] == [2, 4, 5]  # and the last step's, as diffusers does
    bad = runner.invoke(app, ["digits", "train", *args, "--report-to", "mlflow"])
    assert isinstance(bad.exception, DifflabError) and "--report-to 'mlflow'" in str(bad.exception)


def test_a_model_card_that_does_not_parse_is_rewritten_and_the_user_told(tmp_path, capsys):
    from difflab.io.cards import set_card_metrics

    (tmp_path / "README.md").write_text("---\nlicense: [mit\n---\n# my notes\n\nkept text\n")
    set_card_metrics(tmp_path, "unconditional-image-generation", {"accuracy": 0.99})
    assert "not a readable model card" in capsys.readouterr().out
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.eval_results[0].metric_value == 0.99 and "kept text" in card.text


def test_pipeline_takes_a_diffusers_scheduler(tmp_path):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

    from difflab import DigitsPipeline

    torch.manual_seed(0)
    pipe = DigitsPipeline.from_pretrained(save_model(tmp_path / "m", DigitsUNet(TINY), ScheduleConfig()))
    # Guidance pinned: on this random net float32 rounding grows with the guidance scale and the step count, and the
    # tolerance below is set for guidance 6 (the comparison is of the scheduler wiring, not of a default).
    pipe.config = replace(pipe.config, precision="fp32", guidance_digit=6.0)
    trailing = DDIMScheduler.from_config(pipe.scheduler_config())
    trailing.set_timesteps(10)
    assert trailing.timesteps.tolist() == pipe.config.timesteps(pipe.schedule)
    # From t = T-1 on this random tiny net, float32 rounding grows to several grey levels in a few steps; the
    # leading timesteps keep the comparison of the wiring within one.
    pipe.config = replace(pipe.config, spacing="leading")
    ddim = DDIMScheduler.from_config(pipe.scheduler_config())
    ours = pipe(digit=3, num_images=2, num_inference_steps=10, eta=0.0, method="ddim", output_type="pt",
                generator=torch.Generator().manual_seed(1)).images  # fmt: skip
    theirs = pipe(digit=3, num_images=2, num_inference_steps=10, output_type="pt", scheduler=ddim,
                  generator=torch.Generator().manual_seed(1)).images  # fmt: skip
    # Within about one grey level: diffusers forms its step coefficients in float32, difflab in float64.
    assert torch.allclose(ours, theirs, atol=1 / 255), (ours - theirs).abs().max()
    for other in (DPMSolverMultistepScheduler, UniPCMultistepScheduler):  # UniPC's step takes no generator
        scheduler = other.from_config(pipe.scheduler_config())
        out = pipe(digit=3, num_images=2, num_inference_steps=8, output_type="np", scheduler=scheduler).images
        assert out.shape == (2, 28, 28, 3) and np.isfinite(out).all()
