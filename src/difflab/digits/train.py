"""Training the conditional digits DDPM: Muon + AdamW, EMA, condition dropout per factor, atomic checkpoints,
resume, and multi-process data parallelism through `accelerate` (`accelerate launch -m difflab.cli ...`)."""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from difflab.digits.data import DOMAINS, load_split
from difflab.digits.model import STATE_FILE, ScheduleConfig, save_model
from difflab.digits.sample import model_guidance_default, progress_grid
from difflab.io import (
    atomic_write,
    check_state_dict,
    load_json,
    open_run,
    read_torch,
    save_json,
    save_png,
    write_model_card,
)
from difflab.nets.digits_unet import DigitsUNet, DigitsUNetConfig
from difflab.optim import MuonAdamW, hidden_matrices
from difflab.parallel import end_training
from difflab.precision import Precision, cpu_name, settle_training
from difflab.report.tracking import accelerator_kwargs, flat_config, log_images
from difflab.schedule import NoiseSchedule
from difflab.utils import DifflabError, Interrupted, StopRequest, count_flops, stream_seed

WARMUP_STEPS, TIMING_STEPS, REFIT_EVERY = 5, 20, 100
LOSSES_FILE = "losses.json"
TRACKER_PROJECT = "difflab-digits"  # the run name trackers file the training under, in <out>/logs
# "auto" may train in a lower precision whose gradient of one step is this close to fp32's (relative error): the
# recipe's seed tables were trained in bf16 within it, and fp32 is kept on a machine whose bf16 drifts further.
TRAIN_TOLERANCE = 0.05

PRESETS = {
    # For the CPU demo: 1.4 M parameters on 2x2 pixel patches (14x14 and 7x7); why this width: README,
    # "The digits model".
    "cpu": DigitsUNetConfig(channels=(48, 96), blocks_per_level=1, patch=2, conv_before_upsample=True),
    # For a GPU: wider and deeper, the usual small-image DDPM shape.
    "full": DigitsUNetConfig(channels=(64, 128, 256), blocks_per_level=2, dropout=0.1),
}


@dataclass
class TrainConfig:
    """The digits recipe, the one source of its defaults; how each was chosen, with the measurements, is in the
    README ("The digits model") and benchmarks/results/digits_recipe.md."""

    data_root: str
    out_dir: str
    preset: str = "cpu"
    # Fixed work, the same model on a machine whatever its speed or load: 45 TFLOP by the FLOP counter, Muon's
    # Newton-Schulz matmuls included. Batch 16: with the digit dropped less often and a longer EMA it scores as batch
    # 8 does for the same FLOPs, and its steps run at a higher FLOP rate on a CPU.
    steps: int = 4512
    batch_size: int = 16
    lr: float = 2.5e-3
    # Muon trains this net further per FLOP than AdamW, its Newton-Schulz matmuls counted (README, "The digits model").
    optimizer: str = "muon"  # OPTIMIZERS
    warmup_steps: int = 200
    lr_final: float = 0.1  # the cosine decay ends at this fraction of the peak
    weight_decay: float = 0.0
    adam_beta2: float = 0.99  # with the warm-up: less spread between seeds
    ema_decay: float = 0.999
    p_drop_domain: float = 0.1
    p_drop_digit: float = 0.1
    # Model guidance (Tang et al. 2025): the (domain, digit) branch learns the digit-guided prediction itself, so a
    # sampler needs one network pass per step. The value is the guidance scale s it learns (1: off). Its target
    # gains w·sg(pred(domain, digit) − pred(domain, ∅)), w = 1 − 1/s: the fixed point is guidance at scale s.
    model_guidance: float = 1.0
    model_guidance_start: float = 0.0  # fraction of `steps` before it starts (then w ramps in over `warmup_steps`)
    # γ = 0.5 draws more timesteps at high noise than γ = 5, where the digit's identity is decided.
    min_snr_gamma: float | None = 0.5
    # "min-snr": t drawn in proportion to its min-SNR weight, the same objective as "uniform" with a lower-variance
    # gradient
    timestep_sampling: str = "min-snr"
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(prediction="v_prediction"))
    seed: int = 0
    save_every: int = 500
    sample_every: int = 0
    log_every: int = 20
    report_to: str = "none"  # difflab.report.tracking.REPORT_TO
    validation_every: int = 500  # a validation grid to the trackers every N steps (0: never)
    max_minutes: float | None = None  # a wall-clock budget instead of fixed work: the step count is fitted to it
    device: str | None = None
    precision: Precision = Precision("auto")
    resume: bool = False
    overwrite: bool = False  # start over in a folder that holds a checkpoint (deletes it)

    @staticmethod
    def default_schedule() -> ScheduleConfig:
        return TrainConfig.__dataclass_fields__["schedule"].default_factory()

    def net_config(self) -> DigitsUNetConfig:
        if self.preset not in PRESETS:
            raise DifflabError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        return PRESETS[self.preset]


OPTIMIZERS = {"adamw": "AdamW", "muon": "Muon"}  # the choices, and how reports name them


def make_optimizer(net: DigitsUNet, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW for every weight, or Muon for the hidden convs and matrices (AdamW for the stem, the output conv, the
    embeddings, biases and norms); both at `cfg.lr`."""
    if cfg.optimizer not in OPTIMIZERS:
        raise DifflabError(f"unknown optimizer {cfg.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    betas = (0.9, cfg.adam_beta2)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(net.parameters(), lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay)
    muon, rest = hidden_matrices(net, outer=("stem", "out"))
    return MuonAdamW(muon, rest, lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay)


def _counted_batch(cfg: TrainConfig) -> tuple[DigitsUNet, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fresh net and a zero batch (x, t, cond) of `cfg`'s shape, for the FLOP counter."""
    with torch.random.fork_rng(devices=[]):  # counting leaves the run's random draws as they were
        net = DigitsUNet(cfg.net_config())
    size = net.config.image_size
    x = torch.zeros(cfg.batch_size, net.config.in_channels, size, size)
    return net, x, torch.zeros(cfg.batch_size, dtype=torch.long), torch.zeros(cfg.batch_size, 2, dtype=torch.long)


def step_flops(cfg: TrainConfig) -> int:
    """FLOPs of one training step (forward + backward of the loss at `cfg.batch_size`, fp32, and the optimiser's
    step) by torch's FLOP counter: the work a recipe costs, whatever the machine's speed. AdamW's and the EMA's
    updates are elementwise and count nothing; Muon's Newton-Schulz iterations are matmuls and count."""
    net, x0, t, cond = _counted_batch(cfg)
    opt = make_optimizer(net, cfg)
    schedule = cfg.schedule.build()

    def step() -> None:
        schedule.training_loss(lambda x, tt: net(x, tt, cond), x0, t, torch.zeros_like(x0)).backward()
        opt.step()

    return count_flops(step)


def forward_flops(cfg: TrainConfig) -> int:
    """FLOPs of the one extra forward pass (no gradient) that a model-guidance step makes; 0 without it."""
    if cfg.model_guidance == 1.0:
        return 0
    net, x, t, cond = _counted_batch(cfg)
    with torch.no_grad():
        return count_flops(lambda: net(x, t, cond))


def sampling_guidance(cfg: TrainConfig) -> float:
    """The digit guidance the run's model is sampled with by default (`sample.model_guidance_default`)."""
    return model_guidance_default({"train": {"model_guidance": cfg.model_guidance}})


def guidance_start(cfg: TrainConfig) -> int | None:
    """The step model guidance starts at, or None when it is off."""
    return round(cfg.model_guidance_start * cfg.steps) if cfg.model_guidance != 1.0 else None


def run_tflop(cfg: TrainConfig, steps: int, per_step: int, per_forward: int) -> float:
    """The compute of `steps` steps of one process: every step, plus the extra forward of each guided one."""
    start = guidance_start(cfg)
    guided = 0 if start is None else max(0, steps - start)
    return (steps * per_step + guided * per_forward) / 1e12


def training_tflop(cfg: TrainConfig) -> float:
    return run_tflop(cfg, cfg.steps, step_flops(cfg), forward_flops(cfg))


def guidance_weight(cfg: TrainConfig, step: int) -> float:
    """Model guidance's w at `step`: 0 before its start, then ramping to 1 − 1/s over `warmup_steps`."""
    start = guidance_start(cfg)
    if start is None or step < start:
        return 0.0
    return (1 - 1 / cfg.model_guidance) * min(1.0, (step - start + 1) / max(1, cfg.warmup_steps))


def ema_decay_at(cfg: TrainConfig, step: int) -> float:
    """The EMA's decay, warmed up from the first step, and again from the start of a model-guidance fine-tune: an
    average reaching back before it would hold weights that never learned the guided target."""
    start = guidance_start(cfg) or 0
    k = step - start if step >= start else step
    return min(cfg.ema_decay, (1 + k) / (10 + k))


def guidance_shift(net, cond: torch.Tensor, w: float, null_digit: int):
    """The target shift of model guidance, `target_shift` of `NoiseSchedule.training_loss`: w·(pred − pred(domain,
    ∅)) with both terms held constant, on the samples whose digit is given (the others learn the plain target)."""
    no_digit = cond.clone()
    no_digit[:, 1] = null_digit
    given = (cond[:, 1] != null_digit).float().view(-1, 1, 1, 1)

    def shift(x_t: torch.Tensor, t: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return w * given * (pred.detach().float() - net(x_t, t, no_digit).float())

    return shift


def read_losses(ckpt: str | os.PathLike) -> tuple[list[int], list[float]]:
    """The logged training loss of a checkpoint folder: (steps, mean loss over each log window)."""
    data = load_json(Path(ckpt) / LOSSES_FILE, "loss log")
    if not isinstance(data, dict) or not isinstance(data.get("steps"), list) or not isinstance(data.get("loss"), list):
        raise DifflabError(f"{Path(ckpt) / LOSSES_FILE}: not a difflab loss log (lists 'steps' and 'loss')")
    return data["steps"], data["loss"]


def load_training_set(data_root: str, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """All training images (or `split`'s) of both domains as uint8 (N,3,28,28) and conditions (N,2) = [domain,
    digit]."""
    images, conds = [], []
    for d, domain in enumerate(DOMAINS):
        x, y = load_split(data_root, domain, split)
        images.append(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous())
        conds.append(torch.stack([torch.full((len(y),), d), torch.from_numpy(y)], dim=1))
    return torch.cat(images), torch.cat(conds).long()


def lr_at(step: int, cfg: TrainConfig, total_steps: int | None = None) -> float:
    """Linear warm-up, then cosine decay to `cfg.lr_final` x the peak at `total_steps` (default cfg.steps)."""
    total = cfg.steps if total_steps is None else total_steps
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.lr * (cfg.lr_final + (1 - cfg.lr_final) * 0.5 * (1 + math.cos(math.pi * progress)))


def drop_conditions(cond: torch.Tensor, net: DigitsUNet, cfg: TrainConfig, g: torch.Generator) -> torch.Tensor:
    """Replace each factor by its null id independently, so the net learns every guidance branch."""
    cond = cond.clone()
    null_domain, null_digit = net.null_cond
    cond[torch.rand(len(cond), generator=g) < cfg.p_drop_domain, 0] = null_domain
    cond[torch.rand(len(cond), generator=g) < cfg.p_drop_digit, 1] = null_digit
    return cond


@torch.no_grad()
def ema_update(ema: torch.nn.Module, net: torch.nn.Module, decay: float) -> None:
    torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1.0 - decay)


@dataclass
class Run:
    """What a training run holds between steps."""

    cfg: TrainConfig
    accelerator: Any
    net: torch.nn.Module  # wrapped by accelerate
    ema: torch.nn.Module
    opt: torch.optim.Optimizer
    schedule: NoiseSchedule
    precision: Precision
    images: torch.Tensor  # uint8 (N, 3, 28, 28), on the device
    conds: torch.Tensor  # (N, 2) [domain, digit], on the CPU where the condition dropout is drawn
    g: torch.Generator
    identity: dict
    step: int = 0
    losses: list = field(default_factory=list)  # (step, mean loss of the log window)
    running: list = field(default_factory=list)  # the losses of the log window in progress
    t_density: torch.Tensor | None = None  # where timesteps are drawn from; None: uniformly
    flops_per_step: int = 0  # counted once by `step_flops`, for each process
    flops_per_forward: int = 0  # the extra forward of a model-guidance step, `forward_flops`
    grad_norm: float = 0.0  # of the last step, before clipping

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


def train(cfg: TrainConfig) -> Path:
    """Train and write the checkpoint folder `cfg.out_dir`; returns it. Every `sample_every` steps the main
    process writes a grid of both domains and all digits to <out>/progress/. The first Ctrl-C or SIGTERM saves
    the state after the current step and stops with `Interrupted`."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=cfg.device == "cpu", **accelerator_kwargs(cfg.report_to, cfg.out_dir))
    folder = open_run(
        cfg.out_dir,
        "digits train",
        overwrite=cfg.overwrite,
        resume=cfg.resume,
        checkpoint=STATE_FILE,
        main=accelerator.is_main_process,
        check=(lambda: read_state(Path(cfg.out_dir) / STATE_FILE, run_identity(cfg))) if cfg.resume else None,
    )
    with folder, StopRequest() as stop:
        accelerator.wait_for_everyone()
        run = start_run(cfg, accelerator)
        accelerator.init_trackers(TRACKER_PROJECT, flat_config({**_jsonable(cfg), "precision": run.precision.label}))
        start = time.perf_counter()
        try:
            train_loop(run, stop)
        finally:
            run.net, run.opt = end_training(accelerator, [run.net, run.opt])
        if accelerator.is_main_process:
            write_card(run, time.perf_counter() - start)
    if accelerator.is_main_process:
        tflop = load_json(Path(cfg.out_dir) / "config.json")["training_tflop"]
        print(f"training compute: {tflop:.1f} TFLOP (torch's FLOP counter: forward, backward, optimiser)", flush=True)
        print(f"checkpoint: {cfg.out_dir}", flush=True)
    return Path(cfg.out_dir)


def write_card(run: Run, seconds: float) -> None:
    """The model card (README.md) of the checkpoint folder, with a grid of both domains x all digits."""
    cfg, out = run.cfg, Path(run.cfg.out_dir)
    save_png(progress_grid(run.ema, run.schedule, cfg.seed, sampling_guidance(cfg)), out / "samples.png")
    config = load_json(out / "config.json")
    made = {
        "command": f"`difflab digits train --data-root {cfg.data_root} --out {cfg.out_dir} --steps {cfg.steps} "
        f"--seed {cfg.seed}`",
        "data": f"`{cfg.data_root}`",
        "network": f"preset {cfg.preset}, {sum(p.numel() for p in run.ema.parameters()) / 1e6:.2f} M parameters",
        "steps x batch": f"{run.step} x {cfg.batch_size} x {run.accelerator.num_processes} process(es)",
        "optimizer": f"{OPTIMIZERS[cfg.optimizer]}, peak learning rate {cfg.lr:g}",
        "training compute": f"{config['training_tflop']} TFLOP (torch's FLOP counter: forward, backward, optimiser)",
        "machine": f"{cpu_name()}, {torch.get_num_threads()} threads"
        if run.device.type == "cpu"
        else torch.cuda.get_device_name(run.device),
        "precision": run.precision.describe(),
        "training time": f"{seconds:.0f} s",
    }
    usage = f"""import torch
from difflab import DigitsPipeline

pipe = DigitsPipeline.from_pretrained("{out}")
images = pipe(domain="svhn", digit=7, num_images=8, generator=torch.Generator().manual_seed(0)).images"""
    summary = (
        "A conditional DDPM for 28x28 digits in two domains (MNIST-M-like and SVHN-like), conditioned on domain and "
        "digit with per-factor classifier-free guidance. Rows of the image: MNIST-M, SVHN; columns: digits 0-9."
    )
    write_model_card(out, "difflab digits DDPM", summary, made, usage, ["diffusion", "ddpm", "digits"],
                     "unconditional-image-generation", image="samples.png")  # fmt: skip


def train_loop(run: Run, stop: StopRequest) -> None:
    cfg, main = run.cfg, run.accelerator.is_main_process
    budget, total, saved_at = TimeBudget(cfg.max_minutes, run.step, cfg.steps, run.accelerator), cfg.steps, -1
    stopped = False
    bar = tqdm(total=cfg.steps, initial=run.step, desc="train digits", disable=not main, dynamic_ncols=True)
    window_start = time.perf_counter()
    run.net.train()
    while run.step < total:
        run.running.append(train_step(run, total))
        run.step += 1
        bar.update(1)
        total = bar.total = budget.fit(run.step, total, bar.write)
        if run.step % cfg.log_every == 0 or run.step == total:
            loss, lr = close_log_window(run), lr_at(run.step - 1, cfg, total)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.1e}")
            seconds, window_start = time.perf_counter() - window_start, time.perf_counter()
            values = {"loss": loss, "lr": lr, "grad_norm": run.grad_norm, "step_time_s": seconds / cfg.log_every}
            run.accelerator.log(values, step=run.step)
            if budget.spent(run.step):
                bar.write(f"time budget of {cfg.max_minutes} min reached at step {run.step}; saving")
                break
        if run.step % cfg.save_every == 0:
            saved_at = save_state(run)
        write_progress(run, last=run.step >= total)
        if stop_requested(run, stop):
            stopped = True
            break
    bar.close()
    if saved_at != run.step:
        save_state(run)
    run.accelerator.wait_for_everyone()
    if stopped:
        raise Interrupted(
            f"stopped at step {run.step} of {total}; checkpoint saved in {cfg.out_dir}; continue with --resume"
        )


def stop_requested(run: Run, stop: StopRequest) -> bool:
    """Whether any process was asked to stop (all of them must leave the loop at the same step)."""
    if run.accelerator.num_processes == 1:
        return stop.requested
    flag = torch.tensor(float(stop.requested), device=run.device)
    return float(run.accelerator.reduce(flag, "max")) > 0


TIMESTEP_SAMPLING = ("uniform", "min-snr")


def timestep_density(cfg: TrainConfig, schedule: NoiseSchedule) -> torch.Tensor | None:
    if cfg.timestep_sampling not in TIMESTEP_SAMPLING:
        raise DifflabError(
            f"unknown timestep sampling {cfg.timestep_sampling!r}; choose one of {', '.join(TIMESTEP_SAMPLING)}"
        )
    if cfg.timestep_sampling == "uniform":
        return None
    if not cfg.min_snr_gamma:
        raise DifflabError(
            "timestep sampling 'min-snr' needs a min-SNR γ (--min-snr-gamma > 0); without one, "
            "pass --timestep-sampling uniform"
        )
    return schedule.min_snr_density(cfg.min_snr_gamma)


def start_run(cfg: TrainConfig, accelerator) -> Run:
    """Data, net, EMA, optimiser and batch generator, resumed from the folder's state when asked, in the
    precision chosen for this machine."""
    images, conds = load_training_set(cfg.data_root)
    try:
        schedule = cfg.schedule.build()
    except ValueError as e:
        raise DifflabError(f"schedule: {e}") from None
    torch.manual_seed(cfg.seed)
    net = DigitsUNet(cfg.net_config())
    ema = copy.deepcopy(net).requires_grad_(False).eval()
    opt = make_optimizer(net, cfg)
    # Every process draws its own batches; seeds differ by rank so the batches do too.
    g = torch.Generator().manual_seed(stream_seed(cfg.seed, accelerator.process_index, stride=1000))
    run = Run(cfg, accelerator, net, ema, opt, schedule, Precision(), images, conds, g, run_identity(cfg))
    run.t_density = timestep_density(cfg, schedule)
    run.flops_per_step = step_flops(cfg)
    run.flops_per_forward = forward_flops(cfg)
    if cfg.resume:
        path = Path(cfg.out_dir) / STATE_FILE
        run.step, run.losses, run.running = resume_from(
            read_state(path, run.identity), net, ema, opt, g, accelerator.process_index, path
        )
    run.precision = choose_precision(cfg, net, schedule, accelerator.device, accelerator)
    if accelerator.is_main_process:
        print(f"precision: {run.precision.describe()}", flush=True)
    run.net, run.opt = accelerator.prepare(run.precision.prepare(net), opt)
    run.ema.to(accelerator.device)
    run.images = images.to(accelerator.device)
    return run


def write_progress(run: Run, last: bool = False) -> None:
    """The grid of both domains x all digits from the EMA weights: a PNG every `sample_every` steps, and to the
    trackers every `validation_every` steps and at the `last` step, so that a run shorter than `validation_every`
    logs one too, as diffusers' training examples do (main process)."""
    cfg = run.cfg
    to_png = bool(cfg.sample_every) and run.step % cfg.sample_every == 0
    due = bool(cfg.validation_every) and (run.step % cfg.validation_every == 0 or last)
    to_trackers = due and bool(run.accelerator.trackers)
    if not run.accelerator.is_main_process or not (to_png or to_trackers):
        return
    grid = progress_grid(run.ema, run.schedule, cfg.seed, sampling_guidance(cfg))
    if to_png:
        save_png(grid, Path(cfg.out_dir) / "progress" / f"step_{run.step:06d}.png")
    if to_trackers:
        log_images(run.accelerator, "validation", grid, run.step)


def train_step(run: Run, total_steps: int) -> float:
    """One optimiser step on a fresh batch (conditions dropped per factor); returns its loss."""
    cfg, g, device = run.cfg, run.g, run.device
    idx = torch.randint(0, len(run.images), (cfg.batch_size,), generator=g)
    x0 = run.precision.input(run.images[idx.to(device)].float() / 127.5 - 1.0)
    unwrapped = run.accelerator.unwrap_model(run.net)
    cond = drop_conditions(run.conds[idx], unwrapped, cfg, g).to(device)
    t = run.schedule.sample_timesteps(cfg.batch_size, device, g, run.t_density)
    noise = torch.randn(x0.shape, generator=g).to(device)
    for group in run.opt.param_groups:
        group["lr"] = lr_at(run.step, cfg, total_steps)
    w = guidance_weight(cfg, run.step)
    with run.precision.autocast(device):
        loss = run.schedule.training_loss(
            lambda x, tt: run.net(x, tt, cond),
            x0,
            t,
            noise,
            min_snr_gamma=cfg.min_snr_gamma,
            density=run.t_density,
            target_shift=guidance_shift(run.net, cond, w, unwrapped.null_cond[1]) if w else None,
        )
    run.opt.zero_grad(set_to_none=True)
    run.accelerator.backward(loss)
    run.grad_norm = float(run.accelerator.clip_grad_norm_(run.net.parameters(), 1.0))
    run.opt.step()
    ema_update(run.ema, unwrapped, ema_decay_at(cfg, run.step))
    return loss.item()


def close_log_window(run: Run) -> float:
    """Log the mean loss of the window (over all processes) and start a new one; returns the mean."""
    mean = float(run.accelerator.reduce(torch.tensor(np.mean(run.running), device=run.device), "mean"))
    run.losses.append((run.step, mean))
    run.running = []
    return mean


def save_state(run: Run) -> int:
    """Atomically write the training state, the EMA model and the loss log; returns the step saved."""
    rng = run.accelerator.gather(torch.stack([run.g.get_state()]).to(run.device)).cpu()
    if run.accelerator.is_main_process:
        cfg, out = run.cfg, Path(run.cfg.out_dir)
        state = {
            "net": run.accelerator.unwrap_model(run.net).state_dict(),
            "ema": run.ema.state_dict(),
            "opt": run.opt.state_dict(),
            "step": run.step,
            "rng": list(rng),
            "losses": run.losses,
            "running": run.running,
            "net_config": cfg.net_config().to_dict(),
            "run": run.identity,
        }
        atomic_write(out / STATE_FILE, lambda tmp: torch.save(state, tmp))
        tflop = run_tflop(cfg, run.step, run.flops_per_step, run.flops_per_forward) * run.accelerator.num_processes
        extra = {
            "steps": run.step,
            "train": _jsonable(cfg),
            "precision": run.precision.describe(),
            "training_tflop": round(tflop, 2),
        }
        save_model(out, run.ema, cfg.schedule, extra=extra)
        save_json({"steps": [s for s, _ in run.losses], "loss": [v for _, v in run.losses]}, out / LOSSES_FILE)
    return run.step


class TimeBudget:
    """Without `minutes` the run is fixed work and this does nothing. With them, the step count is fitted
    to the wall-clock budget from TIMING_STEPS on, refitted every REFIT_EVERY steps (the first steps are slow
    and the machine's load changes), so the learning-rate decay still completes; `spent` is a safety net."""

    def __init__(self, minutes: float | None, first_step: int, max_steps: int, accelerator):
        self.minutes, self.first_step, self.max_steps, self.accelerator = minutes, first_step, max_steps, accelerator
        self.start = time.perf_counter()
        self.timed_from = self.timed_step = None

    def _max_over_processes(self, value: float) -> float:
        return float(self.accelerator.reduce(torch.tensor(value, device=self.accelerator.device), "max"))

    def fit(self, step: int, total: int, say) -> int:
        if self.minutes is None:
            return total
        if step == self.first_step + WARMUP_STEPS:
            self.timed_from, self.timed_step = time.perf_counter(), step
        if step < self.first_step + TIMING_STEPS or step % REFIT_EVERY not in (0, TIMING_STEPS):
            return total
        per_step = self._max_over_processes((time.perf_counter() - self.timed_from) / (step - self.timed_step))
        left = 60 * self.minutes - (time.perf_counter() - self.start)
        fitted = max(step + 1, min(self.max_steps, step + int(left / per_step)))
        if abs(fitted - total) > 0.02 * total:
            say(f"{per_step:.2f} s/step: {fitted} steps fit the {self.minutes} min budget")
        return fitted

    def spent(self, step: int) -> bool:
        over = (
            self.minutes is not None
            and step > self.first_step + TIMING_STEPS
            and time.perf_counter() - self.start > 60 * self.minutes
        )
        return self._max_over_processes(float(over)) > 0


STATE_KEYS = ("net", "ema", "opt", "step", "rng", "losses")


def resume_from(state: dict, net, ema, opt, g: torch.Generator, rank: int, path: Path) -> tuple[int, list, list]:
    """Load a checked training state into the run's objects; returns (step, logged losses, the losses of the
    log window in progress), so the loss log continues as if the run had never stopped."""
    check_state_dict(net, state["net"], str(path))
    check_state_dict(ema, state["ema"], str(path))
    try:
        opt.load_state_dict(state["opt"])
        g.set_state(state["rng"][rank % len(state["rng"])])
    except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as e:
        raise DifflabError(f"{path}: optimiser or random state does not fit this run ({e})") from None
    return int(state["step"]), [tuple(x) for x in state["losses"]], list(state.get("running", []))


def run_identity(cfg: TrainConfig) -> dict:
    """What defines a run: a resume with other values would silently train another model."""
    return {
        "schedule": asdict(cfg.schedule),
        "net": cfg.net_config().to_dict(),
        "seed": cfg.seed,
        "batch_size": cfg.batch_size,
        "optimizer": cfg.optimizer,
        "data_root": str(Path(cfg.data_root).resolve()),
        "model_guidance": [cfg.model_guidance, cfg.model_guidance_start],
    }


def read_state(path: Path, identity: dict) -> dict:
    """The training state at `path`, checked to belong to the run described by `identity`."""
    if not path.is_file():
        raise DifflabError(f"{path}: nothing to resume from (no training state in {path.parent})")
    state = read_torch(path, "training state")
    missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise DifflabError(f"{path}: not a difflab digits training state (missing {', '.join(missing)})")
    saved = state.get("run", {"net": state.get("net_config")})
    for key, value in saved.items():
        if key in identity and identity[key] != value:
            raise DifflabError(
                f"{path}: the run was started with {key} = {json.dumps(value)}, not "
                f"{json.dumps(identity[key])}; resume with the same options"
            )
    return state


def choose_precision(cfg: TrainConfig, net: DigitsUNet, schedule, device: torch.device, accelerator) -> Precision:
    """Settle `cfg.precision` by timing forward + backward passes of a copy of the net (the run's own
    weights and random streams stay untouched); every process then uses the main process's choice."""
    from accelerate.utils import broadcast_object_list

    x0 = torch.randn(
        cfg.batch_size, net.config.in_channels, net.config.image_size, net.config.image_size, device=device
    )
    t = torch.randint(0, schedule.num_steps, (cfg.batch_size,), device=device)
    cond = torch.zeros(cfg.batch_size, 2, dtype=torch.long, device=device)

    def loss(model: DigitsUNet, p: Precision) -> torch.Tensor:
        return schedule.training_loss(lambda x, tt: model(x, tt, cond), p.input(x0), t, torch.randn_like(x0))

    shape = f"digits-train {net.config.shape_name()} batch {cfg.batch_size}"
    chosen = [
        settle_training(cfg.precision, device, shape, lambda: copy.deepcopy(net), loss, tolerance=TRAIN_TOLERANCE)
        if accelerator.is_main_process
        else None
    ]
    if accelerator.num_processes > 1:
        broadcast_object_list(chosen)
    return chosen[0]


def _jsonable(cfg: TrainConfig) -> dict:
    d = asdict(cfg)
    d["net"] = cfg.net_config().to_dict()
    return d
