"""Sampling the conditional digits model: the course output layout, 10x10 grids and reverse-process strips."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from difflab.digits.data import DOMAINS
from difflab.io import load_json, load_rgb, open_run, save_json, save_png
from difflab.nets.digits_unet import DigitsUNet
from difflab.parallel import Processes
from difflab.precision import Precision, settle_inference
from difflab.samplers import METHODS, SPACINGS, ddim_timesteps, guided, sample
from difflab.schedule import NoiseSchedule
from difflab.utils import DifflabError, image_grid, stream_seed, to_uint8

PER_DIGIT = 50  # the course layout: {digit}_{NNN}.png, NNN = 001..050, per domain
SETTINGS = "sampling.json"  # a `digits sample` run's settings, what --resume continues from
# "auto" may sample in a lower precision whose guided ε is this close to fp32's (relative error): sampled digits
# are judged, not compared with a reference, and the seed tables were sampled in bf16, within it. Guidance
# multiplies the branches' difference, so this is looser than the training step's tolerance.
SAMPLE_TOLERANCE = 0.05


# Classifier-free guidance of the digit for a checkpoint trained without model guidance: 5.5 rather than 6 kept every
# seed measured at or above 0.995 and moved the images closer to the real ones; 5 left one demo seed below it.
CFG_GUIDANCE = 5.5


@dataclass
class SampleConfig:
    # DDIM in 10 steps with η = 1: fresh noise at every step corrects the few-step error that a deterministic solver
    # keeps (docs, "The digits model").
    method: str = "ddim"  # "ddim", "dpm++2m" or "ddpm" (ancestral over all T steps)
    steps: int = 10  # DDIM / DPM-Solver++ steps; ignored by ddpm
    eta: float = 1.0  # DDIM only
    # "trailing" starts at T-1, where x_T really is pure noise; "leading" (diffusers' DDIM default) starts up to
    # T/steps lower, which costs accuracy at 10 steps.
    spacing: str = "trailing"
    # 1 = no guidance; None = the checkpoint's own (`for_model`): 1 where it learned its guidance (model guidance),
    # CFG_GUIDANCE otherwise.
    guidance_digit: float | None = None
    guidance_domain: float = 1.0
    # Guidance only where t / T lies in this range; the rest of the steps use the conditional ε alone.
    guidance_interval: tuple[float, float] = (0.0, 1.0)
    batch_size: int = 500
    seed: int = 0
    precision: Precision = Precision("auto")

    def for_model(self, model_config: dict) -> "SampleConfig":
        """This sampler with the digit guidance of the checkpoint described by `model_config` where it has none."""
        if self.guidance_digit is not None:
            return self
        return replace(self, guidance_digit=model_guidance_default(model_config))

    def interval_steps(self, schedule: NoiseSchedule) -> tuple[int, int] | None:
        """The guidance interval in timesteps, or None when guidance applies at every step."""
        lo, hi = self.guidance_interval
        if not 0.0 <= lo <= hi <= 1.0:
            raise DifflabError(f"guidance interval ({lo}, {hi}): need 0 <= low <= high <= 1")
        if (lo, hi) == (0.0, 1.0):
            return None
        return round(lo * (schedule.num_steps - 1)), round(hi * (schedule.num_steps - 1))

    def timesteps(self, schedule: NoiseSchedule) -> list[int]:
        if self.method == "ddpm":
            return list(range(schedule.num_steps - 1, -1, -1))
        if self.method not in METHODS:
            raise DifflabError(f"unknown sampler {self.method!r}; choose one of {', '.join(METHODS)}")
        if not 1 <= self.steps <= schedule.num_steps:
            raise DifflabError(f"--steps must be in 1..{schedule.num_steps} (the model's T), got {self.steps}")
        if self.spacing not in SPACINGS:
            raise DifflabError(f"unknown spacing {self.spacing!r}; choose one of {', '.join(SPACINGS)}")
        return ddim_timesteps(schedule.num_steps, self.steps, self.spacing)


def model_guidance_default(model_config: dict) -> float:
    """The digit guidance a checkpoint is sampled with by default: 1 (one network pass per step) where it was trained
    with model guidance, CFG_GUIDANCE otherwise."""
    return 1.0 if model_config.get("train", {}).get("model_guidance", 1.0) != 1.0 else CFG_GUIDANCE


def check_guidance(guidance_digit: float | None) -> None:
    if guidance_digit is None:
        raise ValueError("the digit guidance is None: resolve it for the model with SampleConfig.for_model")


def guided_digits_eps(
    net,
    cond: torch.Tensor,
    guidance_digit: float,
    guidance_domain: float,
    null_cond: tuple[int, int] | None = None,
    interval: tuple[int, int] | None = None,
):
    """ε = ε(∅,∅) + g_dom·(ε(dom,∅) − ε(∅,∅)) + g_dig·(ε(dom,dig) − ε(dom,∅)), in one batched forward.

    With g_dom = 1 the (∅,∅) branch drops out; with g_dom = g_dig the (dom,∅) branch does. `null_cond`
    (the null ids) defaults to `net.null_cond`. With `interval` (lo, hi), guidance applies only at timesteps
    lo <= t <= hi and elsewhere the conditional ε alone is used, one branch (Kynkäänniemi et al. 2024)."""
    check_guidance(guidance_digit)
    null_domain, null_digit = null_cond or net.null_cond
    domain_only = cond.clone()
    domain_only[:, 1] = null_digit
    nothing = torch.tensor([null_domain, null_digit], device=cond.device).expand_as(cond)
    weights = [guidance_digit, guidance_domain - guidance_digit, 1.0 - guidance_domain]
    guided_eps = guided(net, [cond, domain_only, nothing], weights)
    if interval is None:
        return guided_eps
    lo, hi = interval

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return guided_eps(x, t) if lo <= int(t[0]) <= hi else net(x, t, cond).float()

    return eps_fn


def sampling_precision(net: DigitsUNet, cond: torch.Tensor, cfg: SampleConfig, device: torch.device) -> Precision:
    """Settle `cfg.precision` on guided ε-calls of copies of the net for one batch of `cond`, at timesteps spread
    over a schedule, within SAMPLE_TOLERANCE of fp32's ε."""
    import copy

    check_guidance(cfg.guidance_digit)
    x = torch.randn(len(cond), net.config.in_channels, net.config.image_size, net.config.image_size, device=device)
    t = torch.linspace(0, 999, len(cond), device=device).long()  # the time embedding is sinusoidal: any T works

    def forward(model: DigitsUNet, p: Precision) -> torch.Tensor:
        run = lambda xx, tt, cc: model(p.input(xx), tt, cc)  # noqa: E731
        return guided_digits_eps(run, cond, cfg.guidance_digit, cfg.guidance_domain, net.null_cond)(x, t).float()

    weights = (cfg.guidance_digit, cfg.guidance_domain - cfg.guidance_digit, 1 - cfg.guidance_domain)
    branches = sum(w != 0 for w in weights)
    job = f"digits-sample {net.config.shape_name()} batch {len(cond)}x{branches}"
    return settle_inference(cfg.precision, device, job, lambda: copy.deepcopy(net), forward, tolerance=SAMPLE_TOLERANCE)


class ImageNoise:
    """The noise of a batch: x_T first (`initial`), then one draw per stochastic step (`[i]`). With one generator per
    image, each image draws from its own, so an image is the same in any batch, process or pipeline call; with a
    single generator the whole batch draws from it, as a diffusers pipeline does."""

    def __init__(self, generators: list[torch.Generator] | torch.Generator, n: int, shape: tuple[int, ...]):
        if isinstance(generators, list) and len(generators) != n:
            raise DifflabError(f"{len(generators)} generators for {n} images: give one per image, or one for all")
        self.generators, self.n, self.shape = generators, n, tuple(shape)

    def initial(self) -> torch.Tensor:
        return self[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        if isinstance(self.generators, list):
            return torch.stack([torch.randn(self.shape, generator=g) for g in self.generators])
        return torch.randn(self.n, *self.shape, generator=self.generators)


def image_seed(seed: int, domain: int, digit: int, n: int) -> int:
    """The seed of image `n` of (domain, digit) in a run seeded `seed` (the course layout, the pipeline)."""
    return stream_seed(seed, (domain * 100 + digit) * 1_000_000 + n, stride=1_000_000_007)


def image_generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def make_conds(domains: list[int] | torch.Tensor, digits: list[int] | torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.as_tensor(domains), torch.as_tensor(digits)], dim=1).long()


@torch.inference_mode()
def generate(
    net: DigitsUNet,
    schedule: NoiseSchedule,
    cond: torch.Tensor,
    cfg: SampleConfig,
    device: torch.device,
    capture: list[int] | None = None,
    progress: bool = True,
    seeds: list[int] | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Images in [-1, 1] (on CPU) for every row of `cond`, and the captured x_t per timestep.

    Each row draws its noise (x_T, then fresh noise at each stochastic step) from its own generator, seeded by
    `seeds` (default: a stream of `cfg.seed` per row), so an image does not depend on the batch size or on the
    other rows. `generator` overrides them: a list gives each row its generator, a single one is shared by all."""
    if generator is None:
        seeds = seeds if seeds is not None else [stream_seed(cfg.seed, i, stride=1_000_003) for i in range(len(cond))]
        generator = image_generators(seeds)
    shape = (net.config.in_channels, net.config.image_size, net.config.image_size)
    timesteps = cfg.timesteps(schedule)
    # Timed on a slice of a batch: the ranking of the candidates holds, at a fraction of the cost.
    precision = sampling_precision(net, cond[: min(cfg.batch_size, 64)].to(device), cfg, device)
    model = precision.prepare(net)
    outs, traj = [], {}
    batches = range(0, len(cond), cfg.batch_size)
    for start in tqdm(batches, desc=f"sampling {cfg.method}", disable=not progress or len(batches) == 1):
        c = cond[start : start + cfg.batch_size].to(device)
        gens = generator[start : start + cfg.batch_size] if isinstance(generator, list) else generator
        noise = ImageNoise(gens, len(c), shape)
        eps_fn = guided_digits_eps(
            lambda x, t, cc: model(precision.input(x), t, cc),
            c,
            cfg.guidance_digit,
            cfg.guidance_domain,
            net.null_cond,
            cfg.interval_steps(schedule),
        )
        with precision.autocast(device):
            res = sample(
                eps_fn,
                noise.initial().to(device),
                schedule,
                timesteps,
                method=cfg.method,
                eta=cfg.eta,
                capture=capture,
                step_noise=noise,
                progress=progress and len(batches) == 1,
            )
        outs.append(res.images.float().clamp(-1, 1).cpu())
        for t, x in res.trajectory.items():
            traj.setdefault(t, []).append(x)
    return torch.cat(outs), {t: torch.cat(xs) for t, xs in traj.items()}


def course_name(digit: int, n: int, per_digit: int) -> str:
    """`{digit}_{NNN}.png`, NNN = n + 1 in three figures (more for over 999 images per digit)."""
    return f"{digit}_{n + 1:0{max(3, len(str(per_digit)))}d}.png"


def course_plan(per_digit: int) -> list[tuple[int, int, int]]:
    """Every image of the layout as (domain, digit, n), in the order they are sampled: domain, then digit."""
    return [(d, k, n) for d in range(len(DOMAINS)) for k in range(10) for n in range(per_digit)]


def plan_conds(images: list[tuple[int, int, int]]) -> torch.Tensor:
    """The (domain, digit) conditions of some images of the plan."""
    return make_conds([d for d, _, _ in images], [k for _, k, _ in images])


def write_course_layout(
    net: DigitsUNet,
    schedule: NoiseSchedule,
    out_dir: str | os.PathLike,
    cfg: SampleConfig,
    device: torch.device,
    per_digit: int = PER_DIGIT,
    processes: Processes | None = None,
    columns: int | None = None,
) -> dict[str, np.ndarray]:
    """`<out>/mnistm/{d}_{NNN}.png` and `<out>/svhn/...`, NNN = 001..per_digit; returns the first `columns`
    (default all) uint8 images of each digit per domain, digit-major. The caller owns the folder (`open_run`).

    The batches are cut from the whole layout and dealt out to the `processes`, so any number of processes
    samples the same batches and writes the same files, byte for byte. A batch whose files are all there already
    is kept (a resumed run makes only what is missing)."""
    processes = processes or Processes()
    out = Path(out_dir)
    plan = course_plan(per_digit)
    # Timed once, on the main process, so that every process samples in the same precision.
    first = plan_conds(plan[:64]).to(device)
    precision = processes.from_main(sampling_precision(net, first, cfg, device) if processes.is_main else None)
    cfg = replace(cfg, precision=precision)

    def path(domain: int, digit: int, n: int) -> Path:
        return out / DOMAINS[domain] / course_name(digit, n, per_digit)

    batches = [plan[i : i + cfg.batch_size] for i in range(0, len(plan), cfg.batch_size)]
    mine = processes.share([b for b in batches if not all(path(*image).is_file() for image in b)])
    where = f" (process 1 of {processes.count})" if processes.count > 1 else ""
    with tqdm(total=sum(map(len, mine)), desc=f"sampling{where}", unit="img", disable=not processes.is_main) as bar:
        for batch in mine:
            seeds = [image_seed(cfg.seed, *image) for image in batch]
            images, _ = generate(net, schedule, plan_conds(batch), cfg, device, progress=False, seeds=seeds)
            for image, pixels in zip(batch, to_uint8(images)):
                save_png(pixels, path(*image))
            bar.update(len(batch))
    processes.wait()
    return read_course_layout(out, per_digit, columns)


def read_course_layout(out_dir: str | os.PathLike, per_digit: int, columns: int | None = None) -> dict[str, np.ndarray]:
    """The first `columns` (default all) images of each digit of a course layout, uint8 per domain, digit-major."""
    columns = min(columns or per_digit, per_digit)
    return {
        domain: np.stack(
            [
                np.asarray(load_rgb(Path(out_dir) / domain / course_name(k, n, per_digit)))
                for k in range(10)
                for n in range(columns)
            ]
        )
        for domain in DOMAINS
    }


def course_images(
    net: DigitsUNet, schedule: NoiseSchedule, cfg: SampleConfig, device: torch.device, per_digit: int = PER_DIGIT
) -> dict[str, np.ndarray]:
    """The course layout's images without writing them: uint8 per domain, digit-major, image n of (domain, digit)
    drawn from `image_seed(cfg.seed, domain, digit, n)`."""
    plan = course_plan(per_digit)
    seeds = [image_seed(cfg.seed, *image) for image in plan]
    images = to_uint8(generate(net, schedule, plan_conds(plan), cfg, device, progress=False, seeds=seeds)[0])
    per_domain = 10 * per_digit
    return {domain: images[d * per_domain : (d + 1) * per_domain] for d, domain in enumerate(DOMAINS)}


def digit_grid(per_domain_images: np.ndarray, per_digit: int, columns: int = 10) -> np.ndarray:
    """10 x `columns` grid: row = digit, columns = the first images (different noises) of that digit."""
    rows = [per_domain_images[d * per_digit : d * per_digit + columns] for d in range(10)]
    return image_grid(np.concatenate(rows), 10, columns)


def snapshot_timesteps(cfg: SampleConfig, schedule: NoiseSchedule, snapshots: int = 6) -> list[int]:
    """`snapshots - 1` of the sampler's timesteps, evenly from the first to the last (x_0 makes the last frame)."""
    timesteps = cfg.timesteps(schedule)
    return [timesteps[round(i * (len(timesteps) - 1) / (snapshots - 2))] for i in range(snapshots - 1)]


def reverse_process_strip(
    net: DigitsUNet,
    schedule: NoiseSchedule,
    cfg: SampleConfig,
    device: torch.device,
    digit: int = 0,
    snapshots: int = 6,
) -> tuple[np.ndarray, list[int]]:
    """One row per domain: x_t of the first `digit` image of the course layout at `snapshots` timesteps, T to 0."""
    picks = snapshot_timesteps(cfg, schedule, snapshots)
    # The same noises as the first image of `digit` in each domain of `write_course_layout`.
    seeds = [image_seed(cfg.seed, d, digit, 0) for d in range(len(DOMAINS))]
    cond = make_conds(list(range(len(DOMAINS))), [digit] * len(DOMAINS))
    final, traj = generate(net, schedule, cond, cfg, device, capture=picks, progress=False, seeds=seeds)
    frames = [traj[t].clamp(-1, 1) for t in picks] + [final]
    tiles = np.stack([to_uint8(f) for f in frames], axis=1).reshape(-1, *to_uint8(final).shape[1:])
    return image_grid(tiles, len(DOMAINS), snapshots), picks + [0]


def sample_to_folder(
    net: DigitsUNet,
    schedule: NoiseSchedule,
    out_dir: str | os.PathLike,
    cfg: SampleConfig,
    device: torch.device,
    per_digit: int = PER_DIGIT,
    figures: bool = True,
    overwrite: bool = False,
    resume: bool = False,
    processes: Processes | None = None,
) -> tuple[int, list[int] | None]:
    """The `digits sample` job: the course layout, and with `figures` the 10x10 grids and the reverse process
    (main process only). The settings go to `sampling.json` first; `resume` makes the images a killed run did not
    write, with the same settings. Returns (images in the layout, the strip's timesteps or None)."""
    processes = processes or Processes()
    # Bad settings fail here, before --out is touched.
    cfg.timesteps(schedule)
    cfg.interval_steps(schedule)
    # Not the precision: "auto" may settle otherwise on a resume, and the images' seeds do not depend on it.
    sampler = {k: v for k, v in asdict(cfg).items() if k != "precision"}
    settings = json.loads(json.dumps({"per_digit": per_digit, **sampler}))
    processes.agree("--out and the sampling settings", [str(Path(out_dir).resolve()), settings])
    main = processes.is_main
    with open_run(out_dir, "digits sample", overwrite=overwrite, resume=resume, checkpoint=SETTINGS, main=main) as run:
        if main:
            keep_settings(run.path / SETTINGS, settings, resume)
        columns = min(10, per_digit)
        first = write_course_layout(net, schedule, run.path, cfg, device, per_digit, processes, columns)
        strip_ts = None
        if figures and main:
            strip_ts = write_sample_figures(net, schedule, first, cfg, device, columns, run.path / "figures")[-1]
    return len(DOMAINS) * 10 * per_digit, strip_ts


def keep_settings(file: Path, settings: dict, resume: bool) -> None:
    """Write the run's settings; when resuming, first refuse settings other than the earlier run's."""
    if resume:
        earlier = load_json(file)
        changed = [f"{k}: {earlier.get(k)} then, {v} now" for k, v in settings.items() if earlier.get(k) != v]
        if changed:
            raise DifflabError(
                f"{file}: the run was started with other settings ({'; '.join(changed)}); resume with the same"
            )
    save_json(settings, file)


def write_sample_figures(
    net: DigitsUNet,
    schedule: NoiseSchedule,
    per_domain: dict[str, np.ndarray],
    cfg: SampleConfig,
    device: torch.device,
    per_digit: int,
    folder: Path,
) -> tuple[dict[str, Path], Path, list[int]]:
    """`grid_<domain>.png` (10x10: rows digits, columns noises) and `reverse_process.png` in `folder`; returns the
    grids' paths, the strip's path and its timesteps."""
    grids = {
        domain: save_png(digit_grid(images, per_digit, columns=min(10, per_digit)), folder / f"grid_{domain}.png")
        for domain, images in per_domain.items()
    }
    strip, strip_ts = reverse_process_strip(net, schedule, cfg, device)
    return grids, save_png(strip, folder / "reverse_process.png"), strip_ts


def progress_grid(
    net: DigitsUNet, schedule: NoiseSchedule, seed: int, guidance_digit: float = CFG_GUIDANCE
) -> np.ndarray:
    """Both domains (rows) x all digits (columns) from the same seeded noises: how training is going."""
    cond = make_conds([0] * 10 + [1] * 10, list(range(10)) * 2)
    device = next(net.parameters()).device
    cfg = SampleConfig(steps=20, seed=seed, guidance_digit=guidance_digit)
    images, _ = generate(net, schedule, cond, cfg, device, progress=False)
    return image_grid(to_uint8(images), 2, 10)
