"""Muon for a net's hidden weight matrices and AdamW for the rest, in one optimiser, so a training loop, its
checkpoints and accelerate handle a single object. Muon (Jordan et al., 2024) replaces each matrix's momentum by the
nearest semi-orthogonal matrix, found by a Newton-Schulz iteration: every direction of the update gets the same
step, which at a fixed FLOP budget trains a small conv net further than AdamW does."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

# Muon's quintic, steep at zero: 5 steps bring the singular values of a matrix with spectral norm <= 1 near 1 (most
# between about 0.7 and 1.2) without converging exactly, which its authors found to train as well as the exact U Vᵀ.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def direct_flops(rows: int, cols: int, steps: int) -> int:
    """Matmul FLOPs of the iteration on the short-side x long-side matrix itself."""
    return steps * (4 * rows * rows * cols + 2 * rows**3)


def gram_flops(rows: int, cols: int, steps: int) -> int:
    """Matmul FLOPs of the same iteration on the rows x rows Gram matrix: two products with the long side, the rest
    small."""
    return 4 * rows * rows * cols + 2 * rows**3 + 8 * (steps - 1) * rows**3


def orthogonalize(update: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """About U Vᵀ of the SVD U S Vᵀ of `update` (a conv kernel counts as out x in·kh·kw), by Muon's Newton-Schulz
    iteration X <- aX + (bA + cA²)X with A = XXᵀ. Every iterate is P(G)X₀ for the Gram matrix G = X₀X₀ᵀ and a
    polynomial P, so for a wide matrix the iteration runs on the small G and touches the long side twice: the same
    result for about a third of the FLOPs on a 3x3 conv's kernel."""
    a, b, c = NS_COEFFICIENTS
    x = update.reshape(len(update), -1)
    wide = x.shape[0] <= x.shape[1]
    x = x if wide else x.T
    x = x / x.norm().clamp(min=eps)
    rows, cols = x.shape
    if gram_flops(rows, cols, steps) < direct_flops(rows, cols, steps):
        eye = torch.eye(rows, dtype=x.dtype, device=x.device)
        gram, q = x @ x.T, None
        for _ in range(steps):
            g = gram if q is None else q @ gram @ q
            poly = a * eye + b * g + c * (g @ g)
            q = poly if q is None else poly @ q
        x = q @ x
    else:
        for _ in range(steps):
            g = x @ x.T
            x = a * x + (b * g + c * (g @ g)) @ x
    return (x if wide else x.T).reshape(update.shape)


def hidden_matrices(net: torch.nn.Module, outer: Iterable[str]) -> tuple[list, list]:
    """(Muon's parameters, AdamW's): the weight matrices and conv kernels, except embeddings and the modules named in
    `outer` (the net's first and last layers, whose shapes are set by the data, not by the net's width)."""
    outer = tuple(f"{name}." for name in outer)
    embeddings = {id(m.weight) for m in net.modules() if isinstance(m, torch.nn.Embedding)}
    muon, rest = [], []
    for name, p in net.named_parameters():
        hidden = p.ndim >= 2 and id(p) not in embeddings and not name.startswith(outer)
        (muon if hidden else rest).append(p)
    return muon, rest


class MuonAdamW(torch.optim.Optimizer):
    """Muon (Nesterov momentum, orthogonalised, scaled by 0.2·√max(out, in) to AdamW's update size as in torch's
    Muon with adjust_lr_fn="match_rms_adamw") for the first list of parameters, AdamW for the second. Both use `lr`
    and decoupled `weight_decay`."""

    def __init__(self, muon: list, rest: list, lr: float, betas=(0.9, 0.999), momentum: float = 0.95,
                 ns_steps: int = 5, weight_decay: float = 0.0, eps: float = 1e-8):  # fmt: skip
        defaults = dict(lr=lr, betas=betas, momentum=momentum, ns_steps=ns_steps, weight_decay=weight_decay, eps=eps)
        groups = [dict(params=muon, muon=True), dict(params=rest, muon=False)]
        super().__init__([g for g in groups if g["params"]], defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else torch.enable_grad()(closure)()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                    (self._muon if group["muon"] else self._adamw)(p, group)
        return loss

    def _muon(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if not state:
            state["momentum"] = torch.zeros_like(p)
        buf = state["momentum"].lerp_(p.grad, 1 - group["momentum"])
        update = orthogonalize(p.grad.lerp(buf, group["momentum"]), group["ns_steps"])
        p.add_(update, alpha=-group["lr"] * 0.2 * math.sqrt(max(len(p), p[0].numel())))

    def _adamw(self, p: torch.Tensor, group: dict) -> None:
        state, (beta1, beta2) = self.state[p], group["betas"]
        if not state:
            state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        state["step"] += 1
        state["exp_avg"].lerp_(p.grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        denom = (state["exp_avg_sq"] / (1 - beta2 ** state["step"])).sqrt_().add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1 ** state["step"]))
