"""One precision object for every difflab job: the dtype a job computes in, its memory format, how it was chosen.

The CLI turns `--precision` into a `Precision` once (`Precision.parse`) and hands it down; the job that runs it
calls `settle` once, with what it would run, and uses the answer throughout.

- "fp32": plain float32 (IEEE on CUDA too: TF32 is off inside `autocast`); "bf16" / "fp16": that dtype (fp16
  needs CUDA).
- "auto": the fastest precision whose result stays within the job's tolerance of fp32's. The rule:

    - Each job states a `tolerance` beside itself: the largest relative error ‖out − out_fp32‖ / ‖out_fp32‖ of its
      trial's output (one guided ε, one training step's gradient) that it accepts from a lower precision.
    - `REFERENCE` (0) marks a job whose output a user checks against a computation made elsewhere (DDIM from noise
      files, inversion, the course's MSE): "auto" is fp32 there on every device, untimed, because many deterministic
      steps in bf16 are not what the reference was computed with. A job that gives no trial is treated the same.
    - On a CPU nothing else is assumed, because the same choice goes opposite ways on machines of the same kind
      (benchmarks/results/precision.md). The trial runs every candidate (fp32 / bf16, contiguous / channels-last
      where the job allows it) once from the same random state, drops those outside the tolerance, times the rest
      interleaved and keeps the fastest if it beats plain fp32 by a clear margin. The answer, the timings, the
      errors and the tolerance are cached per CPU model and instruction set, torch version, thread count and job,
      so later runs on the machine make the same choice whatever the load then. A CPU without bf16 instructions
      emulates bf16 many times slower than fp32: bf16 is not tried there, and any candidate whose first call is far
      slower than fp32's is not timed further.
    - On CUDA bf16 is faster wherever the GPU supports it, so nothing is timed: the trial compares bf16's output
      with fp32's and bf16 is kept when it is within the tolerance.

Most jobs autocast to the dtype (`autocast`, `prepare`, `input`); Stable Diffusion pipelines hold their weights
in it instead (`cast`), as diffusers does.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from difflab.io import save_json
from difflab.utils import DifflabError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
REFERENCE = 0.0  # the tolerance of a job checked against a computation made elsewhere: "auto" is fp32 there
# A lower precision or another memory format must beat plain fp32 by this much: results then do not flip
# between runs on a machine whose two options are about as fast.
MARGIN = 0.10
# A candidate whose warm-up call takes this many times fp32's cannot win; timing it further only costs minutes.
PRUNE = 4.0
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
Trial = Callable[["Precision"], torch.Tensor]


def precision_help(auto: str) -> str:
    """The help of one command's --precision, saying what "auto" does there."""
    return f"auto ({auto}), fp32, bf16 or fp16 (CUDA only)."


@dataclass(frozen=True)
class Precision:
    """A precision a job runs in: a dtype (`name`), a memory format, and how it was chosen, with the timings and
    errors of the candidates when "auto" tried them."""

    name: str = "fp32"  # one of PRECISIONS; "auto" until `settle` picks one
    channels_last: bool = False
    how: str = "requested"  # "requested", "reference job", "untried", "measured", "cached" or "checked on CUDA"
    timings_ms: dict[str, float] = field(default_factory=dict, compare=False)
    errors: dict[str, float] = field(default_factory=dict, compare=False)  # relative error against fp32's output
    tolerance: float | None = field(default=None, compare=False)

    @classmethod
    def parse(cls, value: str | Precision) -> Precision:
        if isinstance(value, Precision):
            return value
        if value not in PRECISIONS:
            raise DifflabError(f"unknown precision {value!r}; choose one of {', '.join(PRECISIONS)}")
        return cls(value)

    def __str__(self) -> str:
        return self.label

    @property
    def auto(self) -> bool:
        return self.name == "auto"

    @property
    def dtype(self) -> torch.dtype | None:
        if self.auto:
            raise RuntimeError("precision 'auto' must be settled before it is used")
        return _DTYPES[self.name]

    def settle(
        self,
        device: torch.device,
        job: str = "",
        trial: Trial | None = None,
        candidates: tuple[Precision, ...] | None = None,
        rounds: int = 5,
        tolerance: float = REFERENCE,
    ) -> Precision:
        """The precision to run `job` in. "auto" with a `trial` (one representative step run in the given
        precision, returning its output) and a `tolerance` above REFERENCE tries the `candidates` as the module
        says; otherwise it is fp32."""
        if self.name == "fp16" and device.type != "cuda":
            raise DifflabError("fp16 needs CUDA; use bf16 or fp32 on CPU")
        if not self.auto:
            return self
        if tolerance < 0:
            raise ValueError(f"tolerance {tolerance} is negative")
        if tolerance == REFERENCE:
            return Precision("fp32", how="reference job")
        if trial is None:
            return Precision("fp32", how="untried")
        if device.type == "cuda":
            return _checked_on_cuda(trial, tolerance)
        if device.type != "cpu":
            return Precision("fp32", how="untried")
        return _measured(job, trial, candidates or CANDIDATES, rounds, tolerance)

    @property
    def label(self) -> str:
        return self.name + ("+channels_last" if self.channels_last else "")

    def cast(self, module: torch.nn.Module) -> torch.nn.Module:
        return module.to(self.dtype or torch.float32)

    def autocast(self, device: torch.device):
        if self.dtype is None:
            return _ieee_fp32() if device.type == "cuda" else contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.dtype)

    def prepare(self, module: torch.nn.Module) -> torch.nn.Module:
        return module.to(memory_format=torch.channels_last) if self.channels_last else module

    def input(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.ndim == 4 else x

    def describe(self) -> str:
        text = f"{self.label} ({self.how})"
        if self.timings_ms:
            text += ": " + ", ".join(f"{k} {v:.1f} ms" for k, v in self.timings_ms.items())
        if self.errors:
            shown = ", ".join(f"{k} {v:.2%}" for k, v in self.errors.items() if k != "fp32")
            text += f"; error against fp32: {shown} (tolerance {self.tolerance:.2%})"
        return text


CANDIDATES = (Precision("fp32"), Precision("bf16"), Precision("fp32", True), Precision("bf16", True))
DTYPE_CANDIDATES = CANDIDATES[:2]  # for a job that cannot change its model's memory format


@contextlib.contextmanager
def _ieee_fp32():
    """cuDNN convolutions run in TF32 by default on recent GPUs (a 10-bit mantissa, like fp16's): fp32 means fp32."""
    cudnn = torch.backends.cudnn
    with cudnn.flags(
        enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic, allow_tf32=False
    ):
        yield


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    """‖out − reference‖ / ‖reference‖ in float64: how far a candidate's output is from fp32's."""
    out, reference = out.detach().double(), reference.detach().double()
    if out.shape != reference.shape:
        raise ValueError(f"trial outputs differ in shape: {tuple(out.shape)} against {tuple(reference.shape)}")
    error = (out - reference).norm() / reference.norm().clamp_min(1e-30)
    return float(error) if torch.isfinite(error) else float("inf")


def native_bf16() -> bool:
    """Whether this CPU computes in bf16 (avx512_bf16 or AMX); elsewhere autocast emulates it, slowly."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    found = [getattr(torch.cpu, name, None) for name in checks]
    return any(f() for f in found if f is not None) or all(f is None for f in found)


def _checked_on_cuda(trial: Trial, tolerance: float) -> Precision:
    if not torch.cuda.is_bf16_supported():
        return Precision("fp32", how="CUDA without bf16")
    _, errors = measure(trial, DTYPE_CANDIDATES, rounds=0)
    name = "bf16" if errors["bf16"] <= tolerance else "fp32"
    return Precision(name, how="checked on CUDA", errors=errors, tolerance=tolerance)


def _measured(job: str, trial: Trial, candidates: tuple[Precision, ...], rounds: int, tolerance: float) -> Precision:
    key = f"{cpu_name()} | torch {torch.__version__} | {torch.get_num_threads()} threads | {job}"
    cache = _read_cache()
    hit = cache.get(key)
    if (
        isinstance(hit, dict)
        and hit.get("name") in _DTYPES
        and isinstance(hit.get("channels_last"), bool)
        and hit.get("tolerance") == tolerance
    ):
        timings, errors = hit.get("timings_ms") or {}, hit.get("errors") or {}
        return Precision(hit["name"], hit["channels_last"], "cached", timings, errors, tolerance)
    if not native_bf16():
        candidates = tuple(c for c in candidates if c.dtype is None)
    timings, errors = measure(trial, candidates, rounds, tolerance)
    within = [c for c in candidates if errors[c.label] <= tolerance]
    best = min(within, key=lambda c: timings[c.label], default=CANDIDATES[0])
    if timings[best.label] > (1 - MARGIN) * timings[CANDIDATES[0].label]:
        best = CANDIDATES[0]
    chosen = Precision(
        best.name,
        best.channels_last,
        "measured",
        {k: round(v, 2) for k, v in timings.items()},
        {k: float(f"{v:.3g}") for k, v in errors.items()},
        tolerance,
    )
    cache[key] = {
        "name": chosen.name,
        "channels_last": chosen.channels_last,
        "timings_ms": chosen.timings_ms,
        "errors": chosen.errors,
        "tolerance": tolerance,
    }
    with contextlib.suppress(OSError):  # a read-only home only costs the trial next time
        save_json(cache, cache_path())
    return chosen


def _training_trial(device: torch.device, make_model, loss) -> Trial:
    """One forward + backward step of a throw-away model per candidate (`make_model()`, then `loss(model,
    candidate)` runs the forward pass); its output is the gradient, what the step would apply. The run's own
    weights stay untouched."""
    models: dict[str, torch.nn.Module] = {}

    def trial(p: Precision) -> torch.Tensor:
        if p.label not in models:  # made in the first call, from the random state `measure` sets for all alike
            models[p.label] = p.prepare(make_model().to(device))
        model = models[p.label]
        with p.autocast(device):
            loss(model, p).float().mean().backward()
        grads = [q.grad.flatten() for q in model.parameters() if q.grad is not None]
        model.zero_grad(set_to_none=True)
        return torch.cat(grads)

    return trial


def settle_training(
    precision: Precision | str,
    device: torch.device,
    job: str,
    make_model,
    loss,
    candidates=None,
    tolerance: float = REFERENCE,
) -> Precision:
    """`settle` for a training job, the trial being one training step's gradient (`_training_trial`)."""
    trial = _training_trial(device, make_model, loss)
    return Precision.parse(precision).settle(device, job, trial, candidates, tolerance=tolerance)


def settle_inference(
    precision: Precision | str,
    device: torch.device,
    job: str,
    make_model,
    forward,
    candidates=None,
    rounds: int = 3,
    tolerance: float = REFERENCE,
) -> Precision:
    """`settle` for an inference job: the trial is `forward(model, candidate)` (returning its output) on
    `make_model()` prepared for each candidate, in inference mode."""
    models: dict[str, torch.nn.Module] = {}

    def trial(p: Precision) -> torch.Tensor:
        if p.label not in models:
            models[p.label] = p.prepare(make_model())
        with torch.inference_mode(), p.autocast(device):
            return forward(models[p.label], p)

    return Precision.parse(precision).settle(device, job, trial, candidates, rounds, tolerance)


def measure(
    trial: Trial, candidates: tuple[Precision, ...], rounds: int = 5, tolerance: float = float("inf")
) -> tuple[dict[str, float], dict[str, float]]:
    """Median milliseconds of `trial` per candidate, and each candidate's relative error against the first one's
    (fp32's) output. Every candidate's warm-up call starts from the same random state and gives the output
    compared; then the candidates are timed interleaved, so that a load change hits all alike. The global RNG is
    restored afterwards, so trying or not leaves the job's random draws unchanged. A candidate outside the
    `tolerance`, or whose warm-up call takes PRUNE times the first candidate's, is reported by that call alone."""
    times: dict[str, list[float]] = {c.label: [] for c in candidates}
    errors: dict[str, float] = {}
    reference: torch.Tensor | None = None  # fp32's output; a training trial's is a whole gradient, so only it is kept
    gpus = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=gpus):
        for c in candidates:  # warm-up: first calls pick kernels and allocate
            torch.manual_seed(0)
            out = _timed(trial, c, times)
            reference = out if reference is None else reference
            errors[c.label] = relative_error(out, reference)
        reference = out = None
        first = times[candidates[0].label][0]
        kept = [c for c in candidates if times[c.label][0] <= PRUNE * first and errors[c.label] <= tolerance]
        for _ in range(rounds):
            for c in kept:
                _timed(trial, c, times)
    return {k: statistics.median(v[1:] or v) for k, v in times.items()}, errors


def _timed(trial: Trial, c: Precision, times: dict[str, list[float]]) -> torch.Tensor:
    start = time.perf_counter()
    out = trial(c)
    times[c.label].append(1000 * (time.perf_counter() - start))
    return out


def cpu_name() -> str:
    """The CPU model with its widest vector instructions, e.g. "AMD EPYC (AVX2)" or "Intel Xeon (AVX512, bf16,
    AMX)": machines sold under one model name differ in what makes bf16 pay."""
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    isa = torch.backends.cpu.get_cpu_capability()
    # Two Intel Xeons seen share a model name and avx512_bf16; only the one with AMX gains from bf16.
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return f"{name} ({isa}{', bf16' if native_bf16() else ''}{', AMX' if amx else ''})"


def cache_path() -> Path:
    root = os.environ.get("DIFFLAB_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "difflab"
    return Path(root) / "precision.json"


def _read_cache() -> dict:
    try:
        data = json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
