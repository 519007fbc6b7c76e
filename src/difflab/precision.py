"""One precision object for every difflab job: the dtype a job computes in, its memory format, how it was chosen.

The CLI turns `--precision` into a `Precision` once (`Precision.parse`) and hands it down; the job that runs it
calls `settle` once, with what it would run, and uses the answer throughout.
- "fp32": plain float32; "bf16" / "fp16": that dtype (fp16 needs CUDA).
- "auto": on CUDA, bf16 where the GPU supports it, else fp32. On a CPU nothing is assumed, because the same
  choice goes opposite ways on machines of the same kind (benchmarks/results/precision.md): `settle` times a few
  steps of each candidate (fp32 / bf16, and contiguous / channels-last where the job allows it) on the machine at
  hand and keeps the fastest, if it beats plain fp32 by a clear margin. The answer is cached per CPU model and
  instruction set, torch version, thread count and job, so later runs on the machine skip the timing and make the
  same choice whatever the load then. A CPU without bf16 instructions emulates bf16 many times slower than fp32:
  bf16 is not timed at all there, and any candidate whose first call is far slower than fp32's is dropped.
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
# A lower precision or another memory format must beat plain fp32 by this much: results then do not flip
# between runs on a machine whose two options are about as fast.
MARGIN = 0.10
# A candidate whose warm-up call takes this many times fp32's cannot win; timing it further only costs minutes.
PRUNE = 4.0
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def precision_help(auto: str) -> str:
    """The help of one command's --precision, saying what "auto" does there."""
    return f"auto ({auto}; CUDA: bf16 where supported), fp32, bf16 or fp16 (CUDA only)."


@dataclass(frozen=True)
class Precision:
    name: str = "fp32"  # one of PRECISIONS; "auto" until `settle` picks one
    channels_last: bool = False
    how: str = "requested"  # "requested", "measured", "cached", "CUDA default" or "default"
    timings_ms: dict[str, float] = field(default_factory=dict, compare=False)

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
        trial: Callable[[Precision], object] | None = None,
        candidates: tuple[Precision, ...] | None = None,
        rounds: int = 5,
    ) -> Precision:
        """The precision to run `job` in. "auto" on a CPU with a `trial` (one representative step run in the
        given precision) times the `candidates` interleaved (median of `rounds`) unless the answer is cached;
        without a trial it is fp32."""
        if self.name == "fp16" and device.type != "cuda":
            raise DifflabError("fp16 needs CUDA; use bf16 or fp32 on CPU")
        if not self.auto:
            return self
        if device.type == "cuda":
            return Precision("bf16" if torch.cuda.is_bf16_supported() else "fp32", how="CUDA default")
        if trial is None or device.type != "cpu":
            return Precision("fp32", how="default")
        return _measured(device, job, trial, candidates or CANDIDATES, rounds)

    @property
    def label(self) -> str:
        return self.name + ("+channels_last" if self.channels_last else "")

    def cast(self, module: torch.nn.Module) -> torch.nn.Module:
        return module.to(self.dtype or torch.float32)

    def autocast(self, device: torch.device):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.dtype)

    def prepare(self, module: torch.nn.Module) -> torch.nn.Module:
        return module.to(memory_format=torch.channels_last) if self.channels_last else module

    def input(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.ndim == 4 else x

    def describe(self) -> str:
        text = f"{self.label} ({self.how})"
        if self.timings_ms:
            text += ": " + ", ".join(f"{k} {v:.1f} ms" for k, v in self.timings_ms.items())
        return text


CANDIDATES = (Precision("fp32"), Precision("bf16"), Precision("fp32", True), Precision("bf16", True))
DTYPE_CANDIDATES = CANDIDATES[:2]  # for a job that cannot change its model's memory format


def native_bf16() -> bool:
    """Whether this CPU computes in bf16 (avx512_bf16 or AMX); elsewhere autocast emulates it, slowly."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    found = [getattr(torch.cpu, name, None) for name in checks]
    return any(f() for f in found if f is not None) or all(f is None for f in found)


def _measured(
    device: torch.device, job: str, trial: Callable[[Precision], object], candidates, rounds: int
) -> Precision:
    key = f"{cpu_name()} | torch {torch.__version__} | {torch.get_num_threads()} threads | {job}"
    cache = _read_cache()
    hit = cache.get(key)
    if isinstance(hit, dict) and hit.get("name") in _DTYPES and isinstance(hit.get("channels_last"), bool):
        return Precision(hit["name"], hit["channels_last"], "cached", hit.get("timings_ms") or {})
    if not native_bf16():
        candidates = tuple(c for c in candidates if c.dtype is None)
    timings = measure(trial, candidates, rounds)
    best = min(candidates, key=lambda c: timings[c.label])
    if timings[best.label] > (1 - MARGIN) * timings[CANDIDATES[0].label]:
        best = CANDIDATES[0]
    chosen = Precision(best.name, best.channels_last, "measured", {k: round(v, 2) for k, v in timings.items()})
    cache[key] = {"name": chosen.name, "channels_last": chosen.channels_last, "timings_ms": chosen.timings_ms}
    with contextlib.suppress(OSError):  # a read-only home only costs the timing next time
        save_json(cache, cache_path())
    return chosen


def settle_training(
    precision: Precision | str, device: torch.device, job: str, make_model, loss, candidates=None
) -> Precision:
    """`settle` for a training job: the trial is one forward + backward step of a throw-away model per candidate
    (`make_model()`, then `loss(model, candidate)` runs the forward pass), so the run's own weights stay untouched."""
    models: dict[str, torch.nn.Module] = {}

    def trial(p: Precision) -> None:
        if p.label not in models:
            models[p.label] = p.prepare(make_model().to(device))
        model = models[p.label]
        with p.autocast(device):
            loss(model, p).float().mean().backward()
        model.zero_grad(set_to_none=True)

    return Precision.parse(precision).settle(device, job, trial, candidates)


def settle_inference(
    precision: Precision | str, device: torch.device, job: str, make_model, forward, candidates=None, rounds: int = 3
) -> Precision:
    """`settle` for an inference job: the trial is `forward(model, candidate)` on `make_model()` prepared for each
    candidate, in inference mode."""
    models: dict[str, torch.nn.Module] = {}

    def trial(p: Precision) -> None:
        if p.label not in models:
            models[p.label] = p.prepare(make_model())
        with torch.inference_mode(), p.autocast(device):
            forward(models[p.label], p)

    return Precision.parse(precision).settle(device, job, trial, candidates, rounds)


def measure(
    trial: Callable[[Precision], object], candidates: tuple[Precision, ...], rounds: int = 5
) -> dict[str, float]:
    """Median milliseconds of `trial` per candidate, interleaved so that a load change hits all alike. The
    global RNG is restored afterwards, so measuring or not leaves the job's random draws unchanged. A
    candidate whose warm-up call takes PRUNE times the first candidate's is reported by that call alone."""
    times: dict[str, list[float]] = {c.label: [] for c in candidates}
    with torch.random.fork_rng(devices=[]):
        for c in candidates:  # warm-up: first calls pick kernels and allocate
            times[c.label].append(_timed(trial, c))
        first = times[candidates[0].label][0]
        kept = [c for c in candidates if times[c.label][0] <= PRUNE * first]
        for c in kept:
            times[c.label].clear()
        for _ in range(rounds):
            for c in kept:
                times[c.label].append(_timed(trial, c))
    return {k: statistics.median(v) for k, v in times.items()}


def _timed(trial: Callable[[Precision], object], c: Precision) -> float:
    start = time.perf_counter()
    trial(c)
    return 1000 * (time.perf_counter() - start)


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
