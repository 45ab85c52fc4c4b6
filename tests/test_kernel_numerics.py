"""Numeric edges of the update kernels against torch.optim's single-tensor path: scalar
hyperparameters used in fp32 as torch uses them (a small beta1 or alpha), fp16 centered
RMSprop that stays finite where torch does, bf16 NaNs stored as 0x7FC0, and
(on a GPU) IEEE sqrt and division where the flush of a subnormal would divide by zero."""

import pytest
import torch
from torch import nn

import adam_triton
from conftest import DEVICE

BF16 = torch.bfloat16


def _step_both(ours, theirs, p_ours, p_theirs, grad):
    p_ours.grad = grad.to(p_ours.device, copy=True)
    p_theirs.grad = grad.to(p_theirs.device, copy=True)
    ours.step()
    theirs.step()


@pytest.mark.parametrize("name, make, key", [
    ("adam beta1=5e-5", lambda cls, ps: cls(ps, lr=1e-3, betas=(5e-5, 0.999)), "exp_avg"),
    ("adam beta1=5e-4", lambda cls, ps: cls(ps, lr=1e-3, betas=(5e-4, 0.999)), "exp_avg"),
    ("rmsprop centered alpha=5e-4", lambda cls, ps: cls(ps, lr=1e-3, alpha=5e-4, centered=True), "grad_avg"),
])
def test_lerp_weight_is_fp32_like_torch(device, name, make, key):
    """lerp(m, g, w) with w = 1 - beta1 (or 1 - alpha) close to 1 uses 1 - w: torch forms it
    from the fp32 w. Formed from the double w instead, it differs by ~1e-4 relative for
    beta1 = 5e-5, which shows after a zero grad (m = m * (1 - w))."""
    ours_cls = adam_triton.Adam if name.startswith("adam") else adam_triton.RMSprop
    torch_cls = torch.optim.Adam if name.startswith("adam") else torch.optim.RMSprop
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(5000, generator=gen)
    ours, theirs = nn.Parameter(p0.to(device, copy=True)), nn.Parameter(p0.clone())
    o_ours = make(ours_cls, [ours])
    o_theirs = make(lambda ps, **kw: torch_cls(ps, foreach=False, **kw), [theirs])
    grad = torch.randn(5000, generator=gen)
    for g in (grad, torch.zeros_like(grad), torch.zeros_like(grad)):
        _step_both(o_ours, o_theirs, ours, theirs, g)
        torch.testing.assert_close(o_ours.state[ours][key].cpu(), o_theirs.state[theirs][key], rtol=1e-6, atol=0)
    if name.startswith("adam"):  # (centered RMSprop with alpha this small cancels in v - ga^2)
        torch.testing.assert_close(ours.detach().cpu(), theirs.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_fp16_centered_rmsprop_finite_where_torch_is(device, momentum):
    """grad_avg = g and square_avg one fp16 step below or at g^2 (where a constant grad drives
    them): v - ga^2 is a hair below 0. torch forms it in fp16, where it often rounds to -0
    (sqrt -0 = -0, avg = eps: a finite update); formed from the fp32 values it stays negative
    and its sqrt is NaN. On the elements where torch stays finite, so must we."""
    gen = torch.Generator().manual_seed(0)
    g = (torch.rand(4000, generator=gen) * 0.03 + 0.001).half()
    near_sq = (g.float() ** 2).half().view(torch.int16)
    v = torch.cat([(near_sq - 1), near_sq]).view(torch.float16)  # one ulp below, and the nearest
    g = torch.cat([g, g])
    kw = dict(lr=1e-4, centered=True, momentum=momentum)
    ours, theirs = nn.Parameter(torch.zeros_like(g, device=device)), nn.Parameter(torch.zeros_like(g))
    o_ours, o_theirs = adam_triton.RMSprop([ours], **kw), torch.optim.RMSprop([theirs], foreach=False, **kw)
    _step_both(o_ours, o_theirs, ours, theirs, g)  # creates the state
    for opt, q in ((o_ours, ours), (o_theirs, theirs)):
        opt.state[q]["square_avg"].copy_(v)
        opt.state[q]["grad_avg"].copy_(g)
    _step_both(o_ours, o_theirs, ours, theirs, g)
    finite = torch.isfinite(theirs.detach())
    assert 0 < finite.sum() < len(g)  # torch is NaN on some, finite on others: the edge is there
    got = ours.detach().cpu()[finite]
    assert torch.isfinite(got).all(), f"{(~torch.isfinite(got)).sum()} NaN where torch is finite"


def test_bf16_nan_stored_as_0x7fc0(device):
    """A NaN grad makes the param NaN, stored as 0x7FC0 (the NaN of c10::BFloat16's scalar
    round-to-nearest-even; torch 2.13's vectorized CPU kernels write 0xFFFF) on every path."""
    p0 = torch.linspace(-2, 2, 4096).to(BF16)
    ours, theirs = nn.Parameter(p0.to(device, copy=True)), nn.Parameter(p0.clone())
    o_ours, o_theirs = adam_triton.Adam([ours], lr=1e-2), torch.optim.Adam([theirs], lr=1e-2, foreach=False)
    grad = torch.ones(4096, dtype=BF16)
    grad[[5, 700, 4095]] = float("nan")
    _step_both(o_ours, o_theirs, ours, theirs, grad)
    nan = [5, 700, 4095]
    assert torch.isnan(theirs.detach()[nan]).all()
    bits = ours.detach().cpu().view(torch.int16)
    assert (bits[nan] == 0x7FC0).all(), bits[nan]
    assert torch.isfinite(ours.detach()).sum() == 4096 - len(nan)


@pytest.mark.skipif(DEVICE != "cuda" or not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("amsgrad", [False, True])
def test_eps_zero_subnormal_second_moment_stays_finite_on_gpu(amsgrad):
    """eps = 0 and a subnormal exp_avg_sq: IEEE sqrt / division keep the update finite, as in
    torch's CUDA kernels; a flush to zero (approximate sqrt) would divide by 0."""
    n = 4096
    p = nn.Parameter(torch.ones(n, device="cuda"))
    t = nn.Parameter(torch.ones(n, device="cuda"))
    kw = dict(lr=1e-3, eps=0.0, amsgrad=amsgrad)
    ours, theirs = adam_triton.Adam([p], **kw), torch.optim.Adam([t], fused=True, **kw)
    grad = torch.full((n,), 1e-30, device="cuda")  # (1 - beta2) g^2 = 1e-63 -> 0; set v below instead
    _step_both(ours, theirs, p, t, grad)
    for opt, q in ((ours, p), (theirs, t)):
        for key in ("exp_avg_sq", "max_exp_avg_sq"):
            if key in opt.state[q]:
                opt.state[q][key].fill_(1e-40)  # subnormal in fp32
    _step_both(ours, theirs, p, t, grad)
    assert torch.isfinite(t).all()
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p, t, rtol=1e-5, atol=1e-6)
