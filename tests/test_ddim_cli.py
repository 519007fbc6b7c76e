"""`difflab ddim ...` end to end on a small-width face UNet checkpoint: file names, determinism, the MSE
numbers, figures, and a clear one-line error for each kind of bad input."""

import errno

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from difflab.cli import app
from difflab.io import save_png
from difflab.nets.face_unet import FaceUNet, FaceUNetConfig
from difflab.utils import DifflabError

runner = CliRunner()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddim")
    torch.manual_seed(0)
    net = FaceUNet(FaceUNetConfig(channel=32))
    torch.save(net.state_dict(), root / "UNet.pt")
    noise = root / "noise"
    noise.mkdir()
    g = torch.Generator().manual_seed(1)
    torch.save(torch.randn(1, 3, 32, 32, generator=g), noise / "00.pt")
    torch.save(torch.randn(3, 32, 32, generator=g), noise / "01.pt")  # (C,H,W) is accepted too
    return root


def run(*args):
    return runner.invoke(app, ["ddim", *map(str, args)])


def error_of(result) -> str:
    assert result.exit_code == 1 and isinstance(result.exception, DifflabError), result.output
    msg = str(result.exception)
    assert "\n" not in msg
    return msg


def test_sample_writes_one_png_per_noise_and_is_deterministic(files, tmp_path):
    outs = []
    for name in ("a", "b"):
        r = run(
            "sample",
            "--noise-dir",
            files / "noise",
            "--ckpt",
            files / "UNet.pt",
            "--out",
            tmp_path / name,
            "--steps",
            2,
            "--batch-size",
            2,
            "--device",
            "cpu",
        )
        assert r.exit_code == 0, r.output
        outs.append(tmp_path / name)
    assert sorted(p.name for p in outs[0].glob("[!.]*")) == ["00.png", "01.png"]
    for png in outs[0].glob("*.png"):
        assert png.read_bytes() == (outs[1] / png.name).read_bytes()
        arr = np.asarray(Image.open(png))
        assert arr.shape == (32, 32, 3) and arr.min() == 0 and arr.max() == 255  # min-max per image


def test_diffusers_export_samples_the_same_images(files, tmp_path):
    r = run("export-diffusers", "--ckpt", files / "UNet.pt", "--out", tmp_path / "unet")
    assert r.exit_code == 0, r.output
    for name, ckpt in (("pt", files / "UNet.pt"), ("diffusers", tmp_path / "unet")):
        r = run(
            "sample",
            "--noise-dir",
            files / "noise",
            "--ckpt",
            ckpt,
            "--out",
            tmp_path / name,
            "--steps",
            2,
            "--precision",
            "fp32",
        )
        assert r.exit_code == 0, r.output
    for png in (tmp_path / "pt").glob("*.png"):
        a = np.asarray(Image.open(png), dtype=np.int16)
        b = np.asarray(Image.open(tmp_path / "diffusers" / png.name), dtype=np.int16)
        assert np.abs(a - b).max() <= 1


def test_mse_matches_numpy_and_fails_on_missing_files(tmp_path):
    rng = np.random.default_rng(0)
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    expected = {}
    for name in ("00", "01", "02"):
        a, b = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        save_png(a, pred / f"{name}.png")
        save_png(b, gt / f"{name}.png")
        expected[f"{name}.png"] = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    r = run("mse", "--pred", pred, "--gt", gt, "--json", tmp_path / "mse.json")
    assert r.exit_code == 0, r.output
    import json

    saved = json.loads((tmp_path / "mse.json").read_text())
    assert saved["per_image"] == pytest.approx(expected, abs=1e-9)
    assert saved["mean"] == pytest.approx(np.mean(list(expected.values())))
    assert f"mean MSE = {np.mean(list(expected.values())):.4f}" in r.output
    (gt / "01.png").rename(gt / "07.png")
    msg = error_of(run("mse", "--pred", pred, "--gt", gt))
    assert "01.png" in msg and "07.png" in msg


def test_eta_grid_and_interpolation_figures(files, tmp_path):
    r = run(
        "eta-grid",
        "--noise-dir",
        files / "noise",
        "--ckpt",
        files / "UNet.pt",
        "--out",
        tmp_path,
        "--noises",
        "00,01",
        "--etas",
        "0,1",
        "--steps",
        1,
    )
    assert r.exit_code == 0, r.output
    assert Image.open(tmp_path / "eta_grid.png").size == (2 * 34 + 2, 2 * 34 + 2)
    assert 'class="px"' in (tmp_path / "eta_grid.html").read_text()  # a pixel grid: kept sharp when scaled
    r = run(
        "interpolate",
        "--a",
        files / "noise" / "00.pt",
        "--b",
        files / "noise" / "01.pt",
        "--ckpt",
        files / "UNet.pt",
        "--out",
        tmp_path / "interp",
        "--alphas",
        "0,0.5,1",
        "--steps",
        1,
    )
    assert r.exit_code == 0, r.output
    for method in ("lerp", "slerp"):
        assert Image.open(tmp_path / "interp" / f"interp_{method}.png").size == (3 * 34 + 2, 36)
    html = (tmp_path / "interp" / "interpolation.html").read_text()
    assert html.count('<img src="data:image/png;base64,') == 2
    assert html.count('class="px"') == 2


def test_invert_writes_a_noise_that_sample_accepts(files, tmp_path):
    save_png(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8), tmp_path / "img.png")
    r = run(
        "invert",
        "--image",
        tmp_path / "img.png",
        "--ckpt",
        files / "UNet.pt",
        "--out",
        tmp_path / "n" / "x.pt",
        "--steps",
        2,
    )
    assert r.exit_code == 0, r.output and "reconstruction MSE" in r.output
    assert torch.load(tmp_path / "n" / "x.pt", weights_only=True).shape == (1, 3, 32, 32)
    r = run("sample", "--noise-dir", tmp_path / "n", "--ckpt", files / "UNet.pt", "--out", tmp_path / "o", "--steps", 2)
    assert r.exit_code == 0 and (tmp_path / "o" / "x.png").is_file()


@pytest.mark.parametrize(
    "content,expected",
    [
        (torch.zeros(1, 3, 30, 32), "does not fit the face UNet"),
        (torch.zeros(2, 3, 32, 32), "expected (1, 3, H, W)"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.int64), "dtype torch.int64"),
        ({"noise": torch.zeros(1, 3, 32, 32)}, "holds a dict"),
    ],
)
def test_bad_noise_files(files, tmp_path, content, expected):
    (tmp_path / "noise").mkdir()
    torch.save(content, tmp_path / "noise" / "00.pt")
    msg = error_of(
        run("sample", "--noise-dir", tmp_path / "noise", "--ckpt", files / "UNet.pt", "--out", tmp_path / "o")
    )
    assert expected in msg and ("00.pt" in msg or "noise" in msg)
    assert not (tmp_path / "o").exists()


def test_empty_noise_folder_and_bad_checkpoint(files, tmp_path):
    (tmp_path / "empty").mkdir()
    msg = error_of(
        run("sample", "--noise-dir", tmp_path / "empty", "--ckpt", files / "UNet.pt", "--out", tmp_path / "o")
    )
    assert "no noise files" in msg
    sd = torch.load(files / "UNet.pt", weights_only=True)
    sd.pop("out.2.bias")
    sd["foo.bar"] = torch.zeros(2)
    torch.save(sd, tmp_path / "bad.pt")
    msg = error_of(
        run("sample", "--noise-dir", files / "noise", "--ckpt", tmp_path / "bad.pt", "--out", tmp_path / "o")
    )
    assert "missing keys: out.2.bias" in msg and "unexpected keys: foo.bar" in msg


def test_option_errors_are_one_line(files, tmp_path):
    assert "lerp, slerp or both" in error_of(
        run(
            "interpolate",
            "--a",
            files / "noise" / "00.pt",
            "--b",
            files / "noise" / "01.pt",
            "--ckpt",
            files / "UNet.pt",
            "--out",
            tmp_path,
            "--method",
            "cubic",
        )
    )
    assert "--etas" in error_of(
        run(
            "eta-grid", "--noise-dir", files / "noise", "--ckpt", files / "UNet.pt", "--out", tmp_path, "--etas", "zero"
        )
    )
    assert "fp16 needs CUDA" in error_of(
        run(
            "sample",
            "--noise-dir",
            files / "noise",
            "--ckpt",
            files / "UNet.pt",
            "--out",
            tmp_path,
            "--precision",
            "fp16",
            "--device",
            "cpu",
        )
    )


def test_sample_drives_a_conditional_digits_checkpoint(tmp_path):
    from difflab.digits.model import ScheduleConfig, save_model
    from difflab.nets.digits_unet import DigitsUNet, DigitsUNetConfig

    torch.manual_seed(0)
    save_model(
        tmp_path / "digits", DigitsUNet(DigitsUNetConfig(channels=(16, 32), emb_dim=32)), ScheduleConfig(num_steps=500)
    )
    (tmp_path / "noise").mkdir()
    torch.save(torch.randn(1, 3, 28, 28), tmp_path / "noise" / "n0.pt")
    outs = {}
    for digit in (3, 7):
        r = run(
            "sample",
            "--noise-dir",
            tmp_path / "noise",
            "--ckpt",
            tmp_path / "digits",
            "--out",
            tmp_path / str(digit),
            "--domain",
            "svhn",
            "--digit",
            digit,
            "--guidance",
            2.0,
            "--steps",
            5,
        )
        assert r.exit_code == 0, r.output
        outs[digit] = np.asarray(Image.open(tmp_path / str(digit) / "n0.png"))
    assert outs[3].shape == (28, 28, 3) and not np.array_equal(outs[3], outs[7])  # the condition reaches the net
    assert "mnistm, svhn" in error_of(
        run(
            "sample",
            "--noise-dir",
            tmp_path / "noise",
            "--ckpt",
            tmp_path / "digits",
            "--out",
            tmp_path / "x",
            "--domain",
            "mars",
            "--digit",
            1,
        )
    )
    assert "--domain and --digit" in error_of(
        run("sample", "--noise-dir", tmp_path / "noise", "--ckpt", tmp_path / "digits", "--out", tmp_path / "y")
    )
    # Seeded noises take the net's own size; the η grid takes the same condition options.
    r = run(
        "eta-grid",
        "--ckpt",
        tmp_path / "digits",
        "--out",
        tmp_path / "grid",
        "--domain",
        "mnistm",
        "--digit",
        2,
        "--noises",
        "00,01",
        "--etas",
        "0,1",
        "--steps",
        3,
    )
    assert r.exit_code == 0, r.output
    assert np.asarray(Image.open(tmp_path / "grid" / "eta_grid.png")).shape[:2] == (2 * 30 + 2, 2 * 30 + 2)


def test_seeded_noises_instead_of_a_noise_folder(files, tmp_path):
    r = run(
        "sample",
        "--noise-seed",
        5,
        "--num-noises",
        3,
        "--size",
        32,
        "--ckpt",
        files / "UNet.pt",
        "--out",
        tmp_path / "seeded",
        "--steps",
        2,
    )
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "seeded").glob("*.png")) == ["00.png", "01.png", "02.png"]
    assert sorted(p.name for p in (tmp_path / "seeded" / "noise").iterdir()) == ["00.pt", "01.pt", "02.pt"]
    # The saved noises reproduce the run through the usual --noise-dir path.
    r = run(
        "sample",
        "--noise-dir",
        tmp_path / "seeded" / "noise",
        "--ckpt",
        files / "UNet.pt",
        "--out",
        tmp_path / "again",
        "--steps",
        2,
    )
    assert r.exit_code == 0, r.output
    for png in (tmp_path / "again").glob("*.png"):
        assert png.read_bytes() == (tmp_path / "seeded" / png.name).read_bytes()
    r = run(
        "eta-grid",
        "--noise-seed",
        5,
        "--size",
        32,
        "--ckpt",
        files / "UNet.pt",
        "--out",
        tmp_path / "grid",
        "--noises",
        "00,01",
        "--etas",
        "0,1",
        "--steps",
        2,
    )
    assert r.exit_code == 0 and (tmp_path / "grid" / "eta_grid.png").is_file(), r.output
    assert torch.equal(
        torch.load(tmp_path / "grid" / "noise" / "00.pt"), torch.load(tmp_path / "seeded" / "noise" / "00.pt")
    )
    r = run(
        "interpolate",
        "--size",
        32,
        "--ckpt",
        files / "UNet.pt",
        "--out",
        tmp_path / "interp",
        "--steps",
        2,
        "--alphas",
        "0,0.5,1",
    )
    assert r.exit_code == 0 and (tmp_path / "interp" / "interp_slerp.png").is_file(), r.output
    assert "--a and --b go together" in error_of(
        run("interpolate", "--a", files / "noise" / "00.pt", "--ckpt", files / "UNet.pt", "--out", tmp_path / "x")
    )
    assert "does not fit" in error_of(run("sample", "--size", 30, "--ckpt", files / "UNet.pt", "--out", tmp_path / "y"))


def test_commands_refuse_to_replace_earlier_results(files, tmp_path):
    common = ["--ckpt", files / "UNet.pt", "--out", tmp_path / "out", "--steps", 1, "--device", "cpu"]
    assert run("sample", "--noise-dir", files / "noise", *common).exit_code == 0
    before = (tmp_path / "out" / "00.png").read_bytes()
    r = run("sample", "--noise-dir", files / "noise", *common, "--eta", 1)
    assert (
        r.exit_code == 1
        and "holds earlier results of `difflab ddim sample` (00.png, 01.png)" in error_of(r)
        and "--overwrite" in error_of(r)
    )
    assert (tmp_path / "out" / "00.png").read_bytes() == before
    assert run("sample", "--noise-dir", files / "noise", *common, "--eta", 1, "--overwrite").exit_code == 0
    assert (tmp_path / "out" / "00.png").read_bytes() != before
    grid = ["eta-grid", "--noise-dir", files / "noise", "--noises", "00", "--etas", "0", *common]
    grid[grid.index("--out") + 1] = tmp_path / "grid"
    assert run(*grid).exit_code == 0
    assert "holds earlier results of `difflab ddim eta-grid` (eta_grid.html, eta_grid.png" in error_of(run(*grid))


def test_a_full_disk_is_one_line_and_leaves_the_earlier_results_whole(files, tmp_path, monkeypatch):
    common = ["--ckpt", files / "UNet.pt", "--out", tmp_path / "out", "--steps", 1, "--noise-dir", files / "noise"]
    assert run("sample", *common).exit_code == 0
    before = (tmp_path / "out" / "00.png").read_bytes()
    saved = []
    real_save = Image.Image.save

    def fills_up(self, fp, *args, **kwargs):  # the second image finds the disk full
        if saved:
            raise OSError(errno.ENOSPC, "No space left on device")
        saved.append(fp)
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", fills_up)
    msg = error_of(run("sample", *common, "--eta", 1, "--overwrite"))
    assert "no space left on" in msg and ".difflab-staging" in msg
    assert (tmp_path / "out" / "00.png").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "out").glob("[!.]*")) == ["00.png", "01.png"]
    assert not list((tmp_path / "out").glob(".difflab-staging*"))


def test_export_never_writes_into_a_folder_it_did_not_write(files, tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')
    msg = error_of(run("export-diffusers", "--ckpt", files / "UNet.pt", "--out", tmp_path / "unet", "--overwrite"))
    assert "holds files difflab did not write here (config.json)" in msg
    assert (tmp_path / "unet" / "config.json").read_text() == '{"_class_name": "UNet2DConditionModel"}'
    (tmp_path / "afile").write_text("x")
    assert "is a file, not a folder" in error_of(
        run("export-diffusers", "--ckpt", files / "UNet.pt", "--out", tmp_path / "afile")
    )
    assert "is a folder, not a checkpoint file" in error_of(
        run("export-diffusers", "--ckpt", files, "--out", tmp_path / "new")
    )
    assert run("export-diffusers", "--ckpt", files / "UNet.pt", "--out", tmp_path / "new").exit_code == 0
    assert run("export-diffusers", "--ckpt", files / "UNet.pt", "--out", tmp_path / "new", "--overwrite").exit_code == 0


def test_numbers_that_make_garbage_are_refused(files, tmp_path):
    common = ["--ckpt", files / "UNet.pt", "--out", tmp_path / "o"]
    for bad in (["--etas", "0,nan"], ["--etas", "0,inf"], ["--etas", "0,2"]):
        assert "not a finite number in [0.0, 1.0]" in error_of(run("eta-grid", *common, *bad))
    for alphas in ("0,nan,1", "nan,inf,-1,2"):
        assert "--alphas" in error_of(run("interpolate", *common, "--alphas", alphas))
    for option, value in (("--eta", "inf"), ("--guidance", "nan"), ("--seed", "-1"), ("--noise-seed", str(2**64))):
        r = run("sample", *common, option, value)
        assert r.exit_code == 2 and option in r.output, (option, r.output)
    assert not (tmp_path / "o").exists()


def test_mse_json_is_not_replaced_unasked(files, tmp_path):
    pred = tmp_path / "pred"
    save_png(np.zeros((4, 4, 3), dtype=np.uint8), pred / "00.png")
    (tmp_path / "mse.json").write_text("earlier")
    assert "already exists" in error_of(run("mse", "--pred", pred, "--gt", pred, "--json", tmp_path / "mse.json"))
    assert (tmp_path / "mse.json").read_text() == "earlier"
    assert run("mse", "--pred", pred, "--gt", pred, "--json", tmp_path / "mse.json", "--overwrite").exit_code == 0


def _course_reference(files, full_precision, linear_spec) -> dict[str, np.ndarray]:
    """The course's ground truth, computed elsewhere: diffusers' DDIM (η = 0, 50 steps) driving the face UNet in
    fp32, each image min-max stretched to 0-255. A random net is chaotic, so the noises are batched as the wrapper
    batches them: fp32 then agrees to rounding, and bf16 does not."""
    from diffusers import DDIMScheduler

    from difflab.nets.face_unet import face_unet_from_state_dict

    net = face_unet_from_state_dict(torch.load(files / "UNet.pt", weights_only=True)).eval()
    scheduler = full_precision(DDIMScheduler(**linear_spec, clip_sample=True, set_alpha_to_one=False, steps_offset=1))
    scheduler.set_timesteps(50)
    names = ("00", "01")
    x = torch.cat([torch.load(files / "noise" / f"{n}.pt", weights_only=True).reshape(1, 3, 32, 32) for n in names])
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(net(x, t.repeat(len(x))), t, x, eta=0.0).prev_sample
    images = {}
    for name, image in zip(names, x):
        v = image.permute(1, 2, 0).double().numpy()
        images[name] = np.floor(255 * (v - v.min()) / (v.max() - v.min()) + 0.5)
    return images


def test_the_course_wrapper_reproduces_the_fp32_reference_whatever_the_precision_cache_holds(
    files, tmp_path, full_precision, linear_spec
):
    import json
    import os
    import subprocess
    from pathlib import Path

    from difflab.precision import cpu_name

    # A cache that says bf16 + channels-last for DDIM under every key an earlier difflab or this one could use.
    choice = {"name": "bf16", "channels_last": True, "timings_ms": {}, "errors": {}, "tolerance": 1.0}
    jobs = ("ddim", f"ddim {(files / 'UNet.pt').resolve()}")
    cache = {f"{cpu_name()} | torch {torch.__version__} | {n} threads | {j}": choice for n in (1, 2, 4) for j in jobs}
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "precision.json").write_text(json.dumps(cache))
    env = {**os.environ, "DIFFLAB_CACHE": str(tmp_path / "cache")}
    script = Path(__file__).resolve().parents[1] / "scripts" / "hw2_2.sh"
    reference = _course_reference(files, full_precision, linear_spec)

    def course_mse(out: Path) -> list[float]:
        return [float(((np.asarray(Image.open(out / f"{n}.png"), dtype=np.float64) - reference[n]) ** 2).mean())
                for n in ("00", "01")]  # fmt: skip

    done = subprocess.run(["bash", script, files / "noise", tmp_path / "out", files / "UNet.pt"], env=env,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert max(course_mse(tmp_path / "out")) < 1
    # The same command in `auto` and, asked for, in bf16: the instrument tells the two apart.
    r = run("sample", "--noise-dir", files / "noise", "--ckpt", files / "UNet.pt", "--out", tmp_path / "auto",
            "--eta", 0, "--steps", 50, "--device", "cpu")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert max(course_mse(tmp_path / "auto")) < 1
    r = run("sample", "--noise-dir", files / "noise", "--ckpt", files / "UNet.pt", "--out", tmp_path / "bf16",
            "--eta", 0, "--steps", 50, "--device", "cpu", "--precision", "bf16")  # fmt: skip
    assert r.exit_code == 0 and "may drift from an fp32 reference" in r.output
    assert max(course_mse(tmp_path / "bf16")) > 1
