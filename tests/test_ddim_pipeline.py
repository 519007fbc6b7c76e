"""The DDIM pipeline on a (small-width) face UNet against diffusers: our checkpoint loader + batching + sampler
must give the same trajectory as diffusers' UNet2DModel with the same weights driven by its DDIMScheduler."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, UNet2DModel

from difflab.ddim.models import face_eps_model, load_eps_model
from difflab.ddim.pipeline import (
    DDIMConfig,
    ddim_sample,
    eta_grid,
    interpolate,
    invert_image,
    lerp,
    precision_mse,
    slerp,
)
from difflab.io import save_png
from difflab.nets.face_unet import FaceUNet, FaceUNetConfig, to_diffusers
from difflab.precision import Precision

# Layout-independent tests run on a three-level member of the family (16x16 inputs) to stay fast on a CPU;
# the real six-level layout is checked against diffusers below and in test_face_unet.py.
TINY = FaceUNetConfig(channel=32, channel_multiplier=(1, 2, 2), attention_levels=(1,))


def wrap(net, precision="auto"):
    """A small face UNet in memory as the `EpsModel` the loader would make of it (the loader itself reads only
    the course's six-level layout)."""
    cpu = torch.device("cpu")
    return face_eps_model(net, Path("<memory>"), cpu, Precision.parse(precision).settle(cpu))


@pytest.fixture(scope="module")
def tiny_net():
    torch.manual_seed(0)
    return FaceUNet(TINY).eval()


@pytest.fixture(scope="module")
def model(tiny_net):
    return wrap(tiny_net)


@pytest.fixture(scope="module")
def diffusers_dir(tiny_net, tmp_path_factory):
    path = tmp_path_factory.mktemp("diffusers") / "unet"
    to_diffusers(tiny_net).save_pretrained(path)
    return path


def _diffusers_trajectory(unet, x, eta, steps, seed, full_precision, linear_spec):
    sch = full_precision(DDIMScheduler(**linear_spec, clip_sample=True, set_alpha_to_one=False, steps_offset=1))
    sch.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    traj = []
    with torch.no_grad():
        for t in sch.timesteps:
            x = sch.step(unet(x, t.repeat(len(x))).sample, t, x, eta=eta, generator=g).prev_sample
            traj.append((int(t), x))
    return traj


# A random-weight UNet makes the reverse process chaotic: float32 rounding differences of 1e-7 between two
# implementations of the same net grow ~3x per step. So the oracle is split in two exact checks: (1) with the
# same ε-network, our pipeline's trajectory equals diffusers' DDIMScheduler loop; (2) along that trajectory our
# network equals diffusers' UNet2DModel holding the same weights.
@pytest.mark.parametrize("eta,steps", [(0.0, 50), (0.6, 10)])
def test_trajectory_matches_diffusers_ddim_scheduler(diffusers_dir, eta, steps, full_precision, linear_spec):
    their_model = load_eps_model(diffusers_dir, "cpu", "fp32")
    assert their_model.kind == "diffusers UNet2DModel"
    x_T = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    theirs = _diffusers_trajectory(
        UNet2DModel.from_pretrained(diffusers_dir).eval(),
        x_T.clone(),
        eta,
        steps,
        seed=5,
        full_precision=full_precision,
        linear_spec=linear_spec,
    )
    ours = []
    images = ddim_sample(
        their_model,
        x_T.clone(),
        DDIMConfig(steps=steps, eta=eta, seed=5),
        progress=False,
        on_step=lambda i, t, x: ours.append((t, x.clone())),
    )
    assert [t for t, _ in ours] == [t for t, _ in theirs] and ours[-1][0] == 1
    assert max((a - b).abs().max().item() for (_, a), (_, b) in zip(ours, theirs)) <= 1e-5
    assert torch.equal(images, ours[-1][1])
    assert (images - x_T).abs().mean() > 0.1  # the trajectory went somewhere


def test_real_layout_network_matches_diffusers_along_a_trajectory(full_precision, linear_spec):
    torch.manual_seed(1)
    net = FaceUNet(FaceUNetConfig(channel=32)).eval()
    unet = to_diffusers(net)
    x_T = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    traj = _diffusers_trajectory(unet, x_T, 0.0, 5, seed=0, full_precision=full_precision, linear_spec=linear_spec)
    states = [(801 + 200, x_T)] + [(t - 200, x) for t, x in traj[:-1]]  # (timestep x is fed at, x)
    eps = wrap(net).eps_fn(2)
    with torch.no_grad():
        for t, x in states:
            tt = torch.full((2,), t)
            assert (eps(x, tt) - unet(x, tt).sample).abs().max() <= 1e-4, t


def test_batching_does_not_change_results(model):
    noises = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    one_batch = ddim_sample(model, noises, DDIMConfig(steps=3, batch_size=3), progress=False)
    per_image = ddim_sample(model, noises, DDIMConfig(steps=3, batch_size=1), progress=False)
    assert (one_batch - per_image).abs().max() < 1e-4


def test_eta_grid_is_seeded_and_eta_zero_column_is_deterministic(model):
    noises = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    a = eta_grid(model, noises, [0.0, 1.0], DDIMConfig(steps=3, seed=1), progress=False)
    b = eta_grid(model, noises, [0.0, 1.0], DDIMConfig(steps=3, seed=1), progress=False)
    c = eta_grid(model, noises, [0.0, 1.0], DDIMConfig(steps=3, seed=2), progress=False)
    assert a.shape == (2, 2, 3, 16, 16)
    assert torch.equal(a, b)
    assert torch.equal(a[:, 0], c[:, 0]) and not torch.allclose(a[:, 1], c[:, 1])


def test_slerp_and_lerp_formulas():
    g = torch.Generator().manual_seed(7)
    x0, x1 = torch.randn(1, 3, 8, 8, generator=g), torch.randn(1, 3, 8, 8, generator=g)
    a, b = x0.flatten().double().numpy(), x1.flatten().double().numpy()
    theta = math.acos(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    for alpha in (0.0, 0.3, 1.0):
        expected = (math.sin((1 - alpha) * theta) * a + math.sin(alpha * theta) * b) / math.sin(theta)
        np.testing.assert_allclose(slerp(x0, x1, alpha).flatten().numpy(), expected, atol=1e-5)
        np.testing.assert_allclose(lerp(x0, x1, alpha).flatten().numpy(), (1 - alpha) * a + alpha * b, atol=1e-6)
    # Orthogonal unit vectors: slerp stays on the sphere, lerp cuts inside it.
    e0, e1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert slerp(e0, e1, 0.5).norm().item() == pytest.approx(1.0)
    assert lerp(e0, e1, 0.5).norm().item() == pytest.approx(math.sqrt(0.5))
    torch.testing.assert_close(slerp(e0, 2 * e0, 0.5), 1.5 * e0)  # parallel: falls back to lerp


def test_interpolation_endpoints_are_the_plain_samples(model):
    g = torch.Generator().manual_seed(8)
    x0, x1 = torch.randn(1, 3, 16, 16, generator=g), torch.randn(1, 3, 16, 16, generator=g)
    cfg = DDIMConfig(steps=2, batch_size=8)
    strips = interpolate(model, x0, x1, ["lerp", "slerp"], [0.0, 0.5, 1.0], cfg, progress=False)
    ends = ddim_sample(model, torch.cat([x0, x1]), cfg, progress=False)
    for strip in strips.values():
        assert strip.shape == (3, 3, 16, 16)
        assert (strip[0] - ends[0]).abs().max() < 1e-4 and (strip[2] - ends[1]).abs().max() < 1e-4
    assert not torch.allclose(strips["lerp"][1], strips["slerp"][1])


def test_low_precision_check_runs_on_cpu_bf16(tiny_net, model):
    noises = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(9))
    cfg = DDIMConfig(steps=3)
    assert precision_mse(model, model, noises, cfg, progress=False) == [0.0, 0.0]
    bf16 = wrap(tiny_net, precision="bf16")
    mses = precision_mse(model, bf16, noises, cfg, progress=False)
    assert len(mses) == 2 and all(math.isfinite(v) for v in mses) and max(mses) > 0  # autocast really ran


def test_inversion_reconstructs_when_eps_does_not_depend_on_x(tmp_path):
    # With ε independent of x the inversion is exact but for ᾱ_0 ≠ 1 at the last sampling step, so the image
    # must come back; a random-weight net would only test the approximation error.
    net = FaceUNet(TINY)
    const = torch.tensor([0.4, -0.3, 0.2])
    with torch.no_grad():
        net.out[2].weight.zero_()
        net.out[2].bias.copy_(const)
    model = wrap(net)
    yy, xx = np.mgrid[0:16, 0:16]
    image = np.stack([yy * 14 + 10, xx * 14 + 12, (yy + xx) * 6 + 40], -1).clip(0, 255).astype(np.uint8)
    save_png(image, tmp_path / "img.png")
    result = invert_image(model, tmp_path / "img.png", tmp_path / "noise.pt", DDIMConfig(steps=10), progress=False)
    assert result.noise.shape == (1, 3, 16, 16) and (tmp_path / "noise.pt").is_file()
    assert result.mse < 1.0
    # x_T at t = 901 is almost pure "noise", here the constant ε.
    assert (result.noise - const.reshape(1, 3, 1, 1)).abs().max() < 0.05
