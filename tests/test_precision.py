"""The precision policy: explicit choices pass through; "auto" keeps fp32 for a job checked against a reference;
elsewhere on a CPU it drops the candidates whose output is outside the job's tolerance of fp32's, times the rest,
keeps a clear winner, caches it per machine and job with the errors and the tolerance, and leaves the caller's
random streams alone."""

import json
import time

import pytest
import torch

from difflab import precision as P
from difflab.utils import DifflabError

CPU = torch.device("cpu")


LOOSE = 0.5  # a tolerance every fake candidate meets unless a test gives it a larger error


def fake_trial(ms: dict[str, float], calls: list[str], errors: dict[str, float] | None = None):
    """A trial taking `ms` per candidate whose output is off fp32's by `errors` (relative), plus a random part that
    is the same for every candidate only when each starts from the same random state."""

    def trial(p: P.Precision) -> torch.Tensor:
        calls.append(p.label)
        noise = torch.rand(3)  # consumes the global RNG, which `settle` must restore
        time.sleep(ms[p.label] / 1000)
        return (torch.ones(3) + 1e-3 * noise) * (1 + (errors or {}).get(p.label, 0.0))

    return trial


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path))
    monkeypatch.setattr(P, "native_bf16", lambda: True)  # a CPU with bf16 instructions, unless a test says not
    return tmp_path / "precision.json"


def resolve(name: str, device: torch.device, *args, **kwargs) -> P.Precision:
    return P.Precision.parse(name).settle(device, *args, **kwargs)


def test_explicit_choices_and_errors():
    assert resolve("fp32", CPU).dtype is None
    assert resolve("bf16", CPU).dtype is torch.bfloat16
    with pytest.raises(DifflabError, match="fp16 needs CUDA"):
        resolve("fp16", CPU)
    with pytest.raises(DifflabError, match="unknown precision 'half'"):
        resolve("half", CPU)
    assert resolve("auto", CPU).label == "fp32"  # nothing to time: the safe default
    with pytest.raises(RuntimeError, match="must be settled"):
        P.Precision.parse("auto").dtype  # noqa: B018


def test_the_generic_training_trial_times_every_candidate_on_its_own_copy():
    made: list[torch.nn.Module] = []

    def make_model():
        made.append(torch.nn.Conv2d(3, 4, 3))
        return made[-1]

    x = torch.randn(2, 3, 8, 8)
    chosen = P.settle_training("auto", CPU, "conv", make_model, lambda m, p: m(p.input(x)), tolerance=LOOSE)
    assert chosen.how == "measured" and set(chosen.timings_ms) == {c.label for c in P.CANDIDATES}
    assert len(made) == len(P.CANDIDATES) and all(m.weight.grad is None for m in made)
    # Every candidate's copy starts from the same weights, so fp32 in another memory format has the same gradient.
    assert all(torch.equal(m.weight, made[0].weight) for m in made)
    assert chosen.errors["fp32+channels_last"] < 1e-5 and 0 < chosen.errors["bf16"] < LOOSE
    assert P.settle_training("bf16", CPU, "conv", make_model, None).label == "bf16"  # explicit: nothing timed


def test_auto_keeps_a_clear_winner_and_caches_it(cache):
    calls: list[str] = []
    ms = {"fp32": 12, "bf16": 4, "fp32+channels_last": 12, "bf16+channels_last": 12}
    torch.manual_seed(0)
    chosen = resolve("auto", CPU, "job A", fake_trial(ms, calls), rounds=2, tolerance=LOOSE)
    after = torch.rand(1)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(1))  # the trial's draws did not shift the caller's stream
    assert chosen.label == "bf16" and chosen.how == "measured" and chosen.timings_ms["fp32"] > chosen.timings_ms["bf16"]
    assert len(calls) == 4 * 3  # warm-up + 2 rounds, interleaved
    entry = next(iter(json.loads(cache.read_text()).values()))
    assert entry["name"] == "bf16" and "job A" in next(iter(json.loads(cache.read_text())))
    assert entry["tolerance"] == LOOSE and entry["errors"]["bf16"] < 1e-6  # every candidate drew the same numbers
    calls.clear()
    again = resolve("auto", CPU, "job A", fake_trial(ms, calls), tolerance=LOOSE)
    assert calls == [] and again.label == "bf16" and again.how == "cached" and again.tolerance == LOOSE
    resolve("auto", CPU, "job B", fake_trial(ms, calls), rounds=1, tolerance=LOOSE)
    assert calls  # another job is timed on its own
    calls.clear()
    resolve("auto", CPU, "job A", fake_trial(ms, calls), rounds=1, tolerance=0.25)
    assert calls  # the same job with another tolerance is tried again


def test_auto_needs_a_clear_margin_to_leave_fp32():
    ms = {"fp32": 100, "bf16": 97, "fp32+channels_last": 130, "bf16+channels_last": 130}
    assert resolve("auto", CPU, "close call", fake_trial(ms, []), rounds=3, tolerance=LOOSE).label == "fp32"


def test_a_cpu_without_bf16_instructions_times_fp32_only(monkeypatch):
    monkeypatch.setattr(P, "native_bf16", lambda: False)
    calls: list[str] = []
    ms = {"fp32": 12, "fp32+channels_last": 4}
    chosen = resolve("auto", CPU, "no bf16", fake_trial(ms, calls), rounds=1, tolerance=LOOSE)
    assert chosen.label == "fp32+channels_last" and set(calls) == set(ms)
    assert "bf16" not in chosen.timings_ms


def test_a_candidate_far_slower_than_fp32_is_not_timed_again():
    calls: list[str] = []
    # the others are clearly slower than fp32 too, so sleep jitter on a loaded machine cannot crown one of them
    ms = {"fp32": 10, "bf16": 100, "fp32+channels_last": 20, "bf16+channels_last": 20}
    chosen = resolve("auto", CPU, "slow bf16", fake_trial(ms, calls), rounds=2, tolerance=LOOSE)
    assert calls.count("bf16") == 1 and calls.count("fp32") == 3
    assert chosen.label == "fp32" and chosen.timings_ms["bf16"] >= 100


def test_the_machine_name_carries_its_instruction_set():
    assert f"({torch.backends.cpu.get_cpu_capability()}" in P.cpu_name()


@pytest.mark.parametrize("amx", [True, False])
def test_the_machine_name_says_whether_it_has_amx(monkeypatch, amx):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    assert P.cpu_name().endswith(", AMX)") == amx


def test_a_broken_cache_is_ignored(cache):
    cache.write_text("{not json")
    ms = {"fp32": 5, "bf16": 20, "fp32+channels_last": 20, "bf16+channels_last": 20}
    assert resolve("auto", CPU, "job", fake_trial(ms, []), rounds=1, tolerance=LOOSE).label == "fp32"
    key = next(iter(json.loads(cache.read_text())))
    for broken in ({"name": "int4", "channels_last": "yes"}, {"name": "bf16", "channels_last": False}):  # no tolerance
        cache.write_text(json.dumps({key: {**broken, "timings_ms": {}}}))
        calls: list[str] = []
        assert resolve("auto", CPU, "job", fake_trial(ms, calls), rounds=1, tolerance=LOOSE).how == "measured" and calls


def test_channels_last_precision_runs_a_net():
    from difflab.nets.digits_unet import DigitsUNet, DigitsUNetConfig

    net = DigitsUNet(DigitsUNetConfig(channels=(8, 16), patch=2)).eval()
    x, t, c = torch.randn(2, 3, 28, 28), torch.tensor([3, 400]), torch.tensor([[0, 1], [1, 2]])
    ref = net(x, t, c)
    p = P.Precision("fp32", channels_last=True)
    with torch.inference_mode(), p.autocast(CPU):
        out = p.prepare(net)(p.input(x), t, c)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_a_faster_candidate_outside_the_tolerance_is_not_chosen(cache):
    calls: list[str] = []
    ms = {"fp32": 12, "bf16": 2, "fp32+channels_last": 12, "bf16+channels_last": 6}
    errors = {"bf16": 0.2, "bf16+channels_last": 0.01}
    chosen = resolve("auto", CPU, "drifting bf16", fake_trial(ms, calls, errors), rounds=2, tolerance=0.05)
    assert chosen.label == "bf16+channels_last" and chosen.errors["bf16"] == pytest.approx(0.2, rel=1e-2)
    assert calls.count("bf16") == 1  # outside the tolerance: not timed beyond its first call
    assert "bf16 20.00%" in chosen.describe() and "tolerance 5.00%" in chosen.describe()
    entry = next(iter(json.loads(cache.read_text()).values()))
    assert entry["name"] == "bf16" and entry["channels_last"] and entry["tolerance"] == 0.05
    assert entry["errors"]["bf16"] == pytest.approx(0.2, rel=1e-2) and set(entry["timings_ms"]) == set(ms)
    assert resolve("auto", CPU, "all drift", fake_trial(ms, [], {**errors, "bf16+channels_last": 0.3}), rounds=1,
                   tolerance=0.05).label in ("fp32", "fp32+channels_last")  # fmt: skip


def test_a_candidate_whose_output_is_not_finite_is_never_chosen():
    def trial(p: P.Precision) -> torch.Tensor:
        return torch.full((3,), float("nan")) if p.dtype is not None else torch.ones(3)

    chosen = resolve("auto", CPU, "overflow", trial, rounds=1, tolerance=LOOSE)
    assert chosen.dtype is None and chosen.errors["bf16"] == float("inf")


@pytest.mark.parametrize("device", [CPU, torch.device("cuda")])
def test_a_reference_job_is_fp32_whatever_the_cache_holds(cache, device):
    calls: list[str] = []
    ms = {"fp32": 12, "bf16": 1, "fp32+channels_last": 12, "bf16+channels_last": 1}
    resolve("auto", CPU, "ddim", fake_trial(ms, calls), rounds=1, tolerance=LOOSE)  # a cache entry saying bf16
    assert next(iter(json.loads(cache.read_text()).values()))["name"] == "bf16"
    calls.clear()
    chosen = resolve("auto", device, "ddim", fake_trial(ms, calls))  # REFERENCE is the default tolerance
    assert chosen.label == "fp32" and chosen.how == "reference job" and calls == []
    assert resolve("auto", device, "untried job", None, tolerance=LOOSE).label == "fp32"
    assert resolve("bf16", device, "ddim").label == "bf16"  # the user's explicit choice stands


def test_cuda_keeps_bf16_only_within_the_tolerance(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    calls: list[str] = []
    ms = {"fp32": 1, "bf16": 1}
    cuda = torch.device("cuda")
    chosen = resolve("auto", cuda, "gpu job", fake_trial(ms, calls, {"bf16": 0.01}), tolerance=0.05)
    assert chosen.label == "bf16" and chosen.how == "checked on CUDA" and calls == ["fp32", "bf16"]
    assert resolve("auto", cuda, "gpu job", fake_trial(ms, [], {"bf16": 0.1}), tolerance=0.05).label == "fp32"
