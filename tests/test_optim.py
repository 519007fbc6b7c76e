"""Muon + AdamW against torch's own Muon and AdamW, and what it counts in the digits recipe's FLOPs."""

from dataclasses import replace

import pytest
import torch

from difflab.digits.train import PRESETS, TrainConfig, make_optimizer, step_flops
from difflab.nets.digits_unet import DigitsUNet
from difflab.optim import MuonAdamW, direct_flops, gram_flops, hidden_matrices, orthogonalize


@pytest.mark.parametrize("shape", [(48, 432), (96, 96), (300, 40)])  # wide (Gram path), square, tall
def test_muon_steps_match_torch_muon(shape):
    torch.manual_seed(0)
    ours, theirs = torch.nn.Parameter(torch.randn(shape)), torch.nn.Parameter(torch.randn(shape))
    theirs.data.copy_(ours.data)
    start = ours.detach().clone()
    opt = MuonAdamW([ours], [], lr=0.01, weight_decay=0.1)
    reference = torch.optim.Muon([theirs], lr=0.01, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    for _ in range(3):
        ours.grad = torch.randn(shape)
        theirs.grad = ours.grad.clone()
        opt.step()
        reference.step()
    # torch's Newton-Schulz runs in bf16, ours in the gradient's dtype: they agree to bf16's precision.
    moved, moved_ref = ours.detach() - start, theirs.detach() - start
    assert (moved - moved_ref).norm() < 0.03 * moved_ref.norm()


def test_a_conv_kernel_steps_as_torch_muon_steps_its_flattened_matrix():
    torch.manual_seed(0)
    kernel = torch.nn.Parameter(torch.randn(96, 48, 3, 3))
    flat = torch.nn.Parameter(kernel.detach().reshape(96, -1).clone())
    opt = MuonAdamW([kernel], [], lr=0.01)
    reference = torch.optim.Muon([flat], lr=0.01, weight_decay=0.0, adjust_lr_fn="match_rms_adamw")
    start = flat.detach().clone()
    for _ in range(2):
        kernel.grad = torch.randn(96, 48, 3, 3)
        flat.grad = kernel.grad.reshape(96, -1).clone()
        opt.step()
        reference.step()
    moved, moved_ref = kernel.detach().reshape(96, -1) - start, flat.detach() - start
    assert (moved - moved_ref).norm() < 0.03 * moved_ref.norm()
    singular = torch.linalg.svdvals(orthogonalize(kernel.grad.double()).reshape(96, -1))
    assert singular.min() > 0.6 and singular.max() < 1.25


def test_the_gram_iteration_is_the_direct_one_for_fewer_flops():
    wide = torch.randn(64, 900, dtype=torch.float64)
    assert gram_flops(64, 900, 5) < direct_flops(64, 900, 5) / 2
    x = wide / wide.norm()
    for _ in range(5):  # Muon's iteration as written in its paper, on the matrix itself
        a = x @ x.T
        x = 3.4445 * x + (-4.7750 * a + 2.0315 * a @ a) @ x
    torch.testing.assert_close(orthogonalize(wide), x)
    torch.testing.assert_close(orthogonalize(wide.T.float()), x.T.float(), atol=1e-4, rtol=1e-4)


def test_the_adamw_part_matches_torch_adamw():
    torch.manual_seed(0)
    ours, theirs = torch.nn.Parameter(torch.randn(10, 7)), torch.nn.Parameter(torch.randn(10, 7))
    theirs.data.copy_(ours.data)
    opt = MuonAdamW([], [ours], lr=0.01, betas=(0.9, 0.99), weight_decay=0.1)
    reference = torch.optim.AdamW([theirs], lr=0.01, betas=(0.9, 0.99), weight_decay=0.1)
    for _ in range(5):
        ours.grad = torch.randn(10, 7)
        theirs.grad = ours.grad.clone()
        opt.step()
        reference.step()
    torch.testing.assert_close(ours, theirs)


def test_muon_takes_the_hidden_matrices_and_its_flops_are_counted():
    net = DigitsUNet(PRESETS["cpu"])
    muon, rest = hidden_matrices(net, outer=("stem", "out"))
    names = {id(p): n for n, p in net.named_parameters()}
    assert all(p.ndim >= 2 for p in muon) and len(muon) + len(rest) == len(list(net.parameters()))
    adamw_names = {names[id(p)] for p in rest}
    assert {"stem.weight", "out.2.weight", "domain_emb.weight", "digit_emb.weight"} <= adamw_names
    assert "mid1.conv1.weight" in {names[id(p)] for p in muon}

    adamw = TrainConfig("data", "out", optimizer="adamw")
    extra = step_flops(replace(adamw, optimizer="muon")) - step_flops(adamw)
    shapes = [sorted((len(p), p[0].numel())) for p in muon]
    assert extra == sum(min(direct_flops(a, b, 5), gram_flops(a, b, 5)) for a, b in shapes)
    assert isinstance(make_optimizer(net, adamw), torch.optim.AdamW)
    assert isinstance(make_optimizer(net, replace(adamw, optimizer="muon")), MuonAdamW)
