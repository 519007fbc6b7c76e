"""Our schedule and samplers against diffusers' schedulers on the same ε-function and noise."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from difflab.samplers import cfg, ddim_invert, ddim_step, ddim_timesteps, guided, sample
from difflab.schedule import NoiseSchedule


def eps_fn(x, t):
    # A smooth, t-dependent stand-in for a network, so every step's output differs.
    w = torch.linspace(-0.5, 0.5, x[0].numel()).reshape(x.shape[1:])
    return torch.tanh(x * w + (t.float() / 1000).reshape(-1, *[1] * (x.ndim - 1)))


@pytest.mark.parametrize(
    "kind,dkind,start,end",
    [
        ("linear", "linear", 1e-4, 0.02),
        ("scaled_linear", "scaled_linear", 0.00085, 0.012),
        ("cosine", "squaredcos_cap_v2", 1e-4, 0.02),
    ],
)
def test_schedules_match_diffusers(kind, dkind, start, end):
    ours = NoiseSchedule.make(kind, 1000, start, end)
    theirs = DDPMScheduler(num_train_timesteps=1000, beta_schedule=dkind, beta_start=start, beta_end=end)
    torch.testing.assert_close(ours.betas.float(), theirs.betas, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours.alphas_cumprod.float(), theirs.alphas_cumprod, atol=1e-6, rtol=1e-5)


def test_q_sample_matches_add_noise(linear_spec):
    sched = NoiseSchedule.make()
    theirs = DDPMScheduler(**linear_spec)
    x0, noise = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    torch.testing.assert_close(sched.q_sample(x0, t, noise), theirs.add_noise(x0, noise, t), atol=1e-5, rtol=1e-5)


def test_training_loss_is_zero_for_the_true_noise_and_positive_otherwise():
    sched = NoiseSchedule.make()
    x0, noise, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.tensor([3, 700])
    assert sched.training_loss(lambda x, t: noise, x0, t, noise).item() == 0.0
    assert sched.training_loss(lambda x, t: torch.zeros_like(x), x0, t, noise).item() > 0.5


def test_spec_ddim_timesteps(linear_spec):
    ts = ddim_timesteps(1000, 50)
    assert ts[0] == 981 and ts[-1] == 1 and len(ts) == 50 and all(a - b == 20 for a, b in zip(ts, ts[1:]))
    theirs = DDIMScheduler(**linear_spec, steps_offset=1)
    theirs.set_timesteps(50)
    assert ts == theirs.timesteps.tolist()
    trailing = DDIMScheduler(**linear_spec, timestep_spacing="trailing")
    trailing.set_timesteps(10)
    assert ddim_timesteps(1000, 10, "trailing") == trailing.timesteps.tolist() == list(range(999, 0, -100))


def _diffusers_ddim(x, eta, set_alpha_to_one, steps, seed, full_precision, linear_spec, spacing="leading"):
    sch = full_precision(
        DDIMScheduler(
            **linear_spec, clip_sample=True, set_alpha_to_one=set_alpha_to_one, steps_offset=1, timestep_spacing=spacing
        )
    )
    sch.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    traj = {}
    for t in sch.timesteps:
        traj[int(t)] = x.clone()
        x = sch.step(eps_fn(x, t.repeat(x.shape[0])), t, x, eta=eta, generator=g).prev_sample
    return x, traj


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("set_alpha_to_one", [False, True])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_trajectory_matches_diffusers(eta, set_alpha_to_one, spacing, full_precision, linear_spec):
    sched = NoiseSchedule.make()
    x_T = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    theirs, their_traj = _diffusers_ddim(
        x_T.clone(), eta, set_alpha_to_one, 50, 1, full_precision, linear_spec, spacing
    )
    ours = sample(
        eps_fn,
        x_T.clone(),
        sched,
        ddim_timesteps(1000, 50, spacing),
        method="ddim",
        eta=eta,
        final_alpha=1.0 if set_alpha_to_one else None,
        generator=torch.Generator().manual_seed(1),
        capture="all",
    )
    for t, x in their_traj.items():
        assert (ours.trajectory[t] - x).abs().max() <= 1e-5, t
    assert (ours.images - theirs).abs().max() <= 1e-5


@pytest.mark.parametrize("steps", [1000, 50])
def test_ddpm_trajectory_matches_diffusers(steps, full_precision, linear_spec):
    theirs_sch = full_precision(DDPMScheduler(**linear_spec, clip_sample=True, variance_type="fixed_small"))
    sched = NoiseSchedule.make()
    theirs_sch.set_timesteps(steps)
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(7)
    x = x_T.clone()
    worst = 0.0
    ours = sample(
        eps_fn,
        x_T.clone(),
        sched,
        theirs_sch.timesteps.tolist(),
        method="ddpm",
        generator=torch.Generator().manual_seed(7),
        capture="all",
    )
    for t in theirs_sch.timesteps:
        worst = max(worst, (ours.trajectory[int(t)] - x).abs().max().item())
        x = theirs_sch.step(eps_fn(x, t.repeat(2)), t, x, generator=g).prev_sample
    assert worst <= 1e-5
    assert (ours.images - x).abs().max() <= 1e-5


def test_step_noise_overrides_generator_and_eta_zero_is_deterministic():
    sched = NoiseSchedule.make()
    ts = ddim_timesteps(1000, 10)
    x_T = torch.randn(2, 3, 4, 4)
    a = sample(eps_fn, x_T, sched, ts, eta=0.0, generator=torch.Generator().manual_seed(1)).images
    b = sample(eps_fn, x_T, sched, ts, eta=0.0, generator=torch.Generator().manual_seed(2)).images
    assert torch.equal(a, b)
    noises = [torch.randn(2, 3, 4, 4) for _ in ts]
    c = sample(eps_fn, x_T, sched, ts, eta=0.7, step_noise=noises).images
    d = sample(eps_fn, x_T, sched, ts, eta=0.7, step_noise=noises, generator=torch.Generator().manual_seed(9)).images
    assert torch.equal(c, d) and not torch.allclose(a, c)


def test_ddim_inversion_is_exact_when_eps_does_not_depend_on_x():
    # Inversion's only approximation is ε(x_t) ≈ ε(x_{t_next}); with an x-independent ε it must be exact.
    sched = NoiseSchedule.make()
    ts = ddim_timesteps(1000, 50)
    x0 = torch.rand(2, 3, 4, 4) * 1.6 - 0.8
    field = torch.randn(1, 3, 4, 4)
    eps = lambda x, t: field * torch.cos(t.float() / 300).reshape(-1, 1, 1, 1)  # noqa: E731
    x_T = ddim_invert(eps, x0, sched, ts)
    back = sample(eps, x_T, sched, ts, eta=0.0, final_alpha=1.0, clip_x0=False).images
    assert (back - x0).abs().max() < 1e-4
    assert (x_T - x0).abs().max() > 0.1


def test_guidance_is_one_batched_forward_and_matches_two_forwards():
    calls = []

    def model(x, t, c):
        calls.append(x.shape[0])
        return torch.tanh(x + c.float().reshape(-1, 1, 1, 1))

    x, t = torch.randn(3, 1, 2, 2), torch.full((3,), 5)
    c, u = torch.tensor([1, 2, 3]), torch.zeros(3, dtype=torch.long)
    out = cfg(model, c, u, 3.0)(x, t)
    assert calls == [6]
    expected = model(x, t, u) + 3.0 * (model(x, t, c) - model(x, t, u))
    torch.testing.assert_close(out, expected)
    calls.clear()
    guided(model, [c, u, u + 5], [2.0, -1.0, 0.0])(x, t)
    assert calls == [6]  # the zero-weight branch costs nothing
    with pytest.raises(ValueError):
        guided(model, [c, u], [2.0, 0.0])


def test_min_snr_weighting_matches_its_definition():
    sched = NoiseSchedule.make()
    x0, noise, t = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4), torch.tensor([5, 300, 900])
    zero = lambda x, tt: torch.zeros_like(x)  # noqa: E731
    ab = sched.alphas_cumprod[t]
    snr = ab / (1 - ab)
    weight = torch.minimum(snr, torch.tensor(5.0)) / snr
    expected = (weight.float() * noise.pow(2).flatten(1).mean(1)).mean()
    torch.testing.assert_close(sched.training_loss(zero, x0, t, noise, min_snr_gamma=5.0), expected)
    assert weight[0] < 0.1 and weight[2] == 1.0  # clean steps are down-weighted, noisy ones kept


@pytest.mark.parametrize("steps", [10, 20])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_dpm_solver_pp_2m_trajectory_matches_diffusers(steps, prediction, linear_spec):
    from diffusers import DPMSolverMultistepScheduler

    theirs_sch = DPMSolverMultistepScheduler(
        **linear_spec, prediction_type=prediction
    )  # algorithm dpmsolver++, order 2
    theirs_sch.alphas_cumprod = NoiseSchedule.make().alphas_cumprod  # float64, as in full_precision
    theirs_sch.set_timesteps(steps)
    sched = NoiseSchedule.make(prediction=prediction)
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = sample(eps_fn, x_T.clone(), sched, theirs_sch.timesteps.tolist(), method="dpm++2m", capture="all")
    x, worst = x_T.clone(), 0.0
    for t in theirs_sch.timesteps:
        # Relative: without clipping, x grows to ~500 under the stand-in ε (a tanh, not a denoiser).
        worst = max(worst, ((ours.trajectory[int(t)] - x).abs().max() / x.abs().max()).item())
        x = theirs_sch.step(eps_fn(x, t.repeat(2)), t, x).prev_sample
    assert worst <= 2e-6
    assert (ours.images - x).abs().max() <= 2e-6 * x.abs().max()


def test_v_prediction_loss_and_conversion_match_diffusers(linear_spec):
    theirs = DDPMScheduler(**linear_spec, prediction_type="v_prediction")
    sched = NoiseSchedule.make(prediction="v_prediction")
    x0, noise = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    v = theirs.get_velocity(x0, noise, t)
    torch.testing.assert_close(sched.velocity(x0, t, noise), v, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sched.to_eps(sched.q_sample(x0, t, noise), t, v), noise, atol=1e-4, rtol=1e-4)
    assert sched.training_loss(lambda x, tt: v, x0, t, noise).item() < 1e-9


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_timesteps_drawn_by_min_snr_weight_keep_the_expected_loss(prediction):
    sched = NoiseSchedule.make(num_steps=50, beta_start=1e-3, beta_end=0.2, prediction=prediction)  # digits-like ᾱ_T
    density = sched.min_snr_density(5.0)
    assert density.shape == (50,) and abs(float(density.sum()) - 1) < 1e-6
    t = torch.arange(50)  # every timestep once, each sample with the same x_0 and noise
    x0, noise = torch.randn(1, 3, 4, 4).expand(50, -1, -1, -1), torch.randn(1, 3, 4, 4).expand(50, -1, -1, -1)
    net = lambda x, tt: 0.5 * x  # noqa: E731

    def per_t(**kw):  # the loss of each timestep alone
        return torch.stack([sched.training_loss(net, x0[i : i + 1], t[i : i + 1], noise[i : i + 1], **kw) for i in t])

    uniform = per_t(min_snr_gamma=5.0).mean()  # E over uniform t
    drawn = (density * per_t(min_snr_gamma=5.0, density=density)).sum()  # E over t ~ density
    torch.testing.assert_close(drawn, uniform)
    if prediction == "v_prediction":  # the v weight vanishes at both ends: few draws are spent there
        assert density[0] < density[25] / 10 and density[-1] < density[25] / 10
    g = torch.Generator().manual_seed(0)
    draws = sched.sample_timesteps(20000, generator=g, density=density)
    torch.testing.assert_close(torch.bincount(draws, minlength=50) / 20000, density, atol=0.01, rtol=0)


def test_zero_terminal_snr_schedule_matches_diffusers(linear_spec):
    ours = NoiseSchedule.make("linear", 1000, 1e-4, 0.02, "v_prediction", zero_terminal_snr=True)
    theirs = DDIMScheduler(**linear_spec, rescale_betas_zero_snr=True).alphas_cumprod
    torch.testing.assert_close(ours.alphas_cumprod.float(), theirs, atol=1e-7, rtol=1e-5)
    assert theirs[-1] == ours.alphas_cumprod[-1] == 0
    assert NoiseSchedule.make().alphas_cumprod[-1] > 4e-5  # what the rescale removes: x_T keeps some of the image
    for refused in (lambda: NoiseSchedule.make(zero_terminal_snr=True), lambda: NoiseSchedule(ours.betas)):
        with pytest.raises(ValueError, match="needs v_prediction, not 'epsilon'"):
            refused()


def _zero_snr_trajectories(scheduler, method, steps):
    """(ours, theirs): x_t before each deterministic step and the images, on the zero-terminal-SNR schedule."""
    scheduler.set_timesteps(steps)
    sched = NoiseSchedule.make("linear", 1000, 1e-4, 0.02, "v_prediction", zero_terminal_snr=True)
    x_T = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = sample(eps_fn, x_T.clone(), sched, scheduler.timesteps.tolist(), method=method, capture="all")
    x, theirs = x_T.clone(), {}
    for t in scheduler.timesteps:
        theirs[int(t)] = x
        x = scheduler.step(eps_fn(x, t.repeat(3)), t, x).prev_sample
    theirs[-1] = x
    return ours.trajectory, theirs


def test_ddim_on_a_zero_terminal_snr_schedule_matches_diffusers(linear_spec):
    # The first step is at ᾱ = 0, where x̂_0 = −v: a sampler that formed x̂_0 from ε would divide by zero.
    scheduler = DDIMScheduler(
        **linear_spec, rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing"
    )
    ours, theirs = _zero_snr_trajectories(scheduler, "ddim", 10)
    assert next(iter(theirs)) == 999
    for t, x in theirs.items():
        assert (ours[t] - x).abs().max() <= 1e-5, t


def test_stochastic_ddim_from_zero_snr_forgets_x_T():
    # η = 1 from ᾱ_t = 0 leaves no room for the ε direction: x_prev = √ᾱ_prev x̂_0 + √(1−ᾱ_prev) z. (diffusers'
    # DDIM gives NaN here: its 1 − ᾱ_prev − σ² rounds below zero in float32.)
    sched = NoiseSchedule.make("linear", 1000, 1e-4, 0.02, "v_prediction", zero_terminal_snr=True)
    x_T, v, z = (torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(i)) for i in range(3))
    x0 = sched.v_to_x0(x_T, 999, v)
    torch.testing.assert_close(x0, -v)
    x_prev, _ = ddim_step(sched, sched.to_eps(x_T, 999, v), x_T, 999, 899, eta=1.0, noise=z, x0=x0)
    ab = float(sched.alphas_cumprod[899])
    torch.testing.assert_close(x_prev, ab**0.5 * x0.clamp(-1, 1) + (1 - ab) ** 0.5 * z)


def test_dpm_solver_on_a_zero_terminal_snr_schedule_matches_diffusers(linear_spec):
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler(
        **linear_spec, rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing"
    )
    ours, theirs = _zero_snr_trajectories(scheduler, "dpm++2m", 10)
    for t, x in theirs.items():
        # diffusers steps from ᾱ_T = 2^-24 (its floor), difflab from 0 with λ floored alike: x̂_0 differs by 2^-12 x_T
        assert ((ours[t] - x).abs().max() / x.abs().max()).item() <= 1e-3, t
