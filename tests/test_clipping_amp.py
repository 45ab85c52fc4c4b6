"""Fused global grad-norm clipping (max_grad_norm, last_grad_norm) and GradScaler support,
against torch's recipes: clip_grad_norm_ then torch.optim's step, and GradScaler driving
torch.optim.Adam / RMSprop (foreach=False)."""

import pytest
import torch
from _util import (
    FP32_TOL,
    SmallModel,
    assert_state_matches,
    clone_params,
    make_model,
    random_grads,
    set_grads,
)
from torch import nn

import adam_triton

# Adam is nearly invariant to the scale of its grads; an eps comparable to the clipped
# grads' size makes the result depend on the clip coefficient itself
OPTIMIZERS = {
    "Adam": (adam_triton.Adam, torch.optim.Adam, dict(betas=(0.8, 0.95), eps=1e-4)),
    "AdamW": (adam_triton.AdamW, torch.optim.AdamW, dict(weight_decay=0.1, eps=1e-4)),
    "RMSprop": (adam_triton.RMSprop, torch.optim.RMSprop, dict(momentum=0.5)),
}


def two_groups(params, **kw):
    """The params split into two groups with different learning rates."""
    return [dict(params=params[:3], lr=1e-2, **kw), dict(params=params[3:], lr=3e-3, **kw)]


def snapshot(opt, params):
    """Copies of every param and state tensor (for exact before/after comparisons)."""
    return [(p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}) for p in params]


def assert_unchanged(opt, params, before):
    for i, (p, (p0, s0)) in enumerate(zip(params, before)):
        assert torch.equal(p.detach(), p0), f"param {i} changed"
        assert set(opt.state[p]) == set(s0)
        for k, v in s0.items():
            assert torch.equal(opt.state[p][k], v), f"param {i} state {k} changed"


# -- max_grad_norm ------------------------------------------------------------------------

@pytest.mark.parametrize("max_norm", [1e-3, 1e6], ids=["active", "inactive"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_max_grad_norm_matches_clip_grad_norm(device, name, max_norm):
    """ours(max_grad_norm=c) == clip_grad_norm_(all params, c) then torch's step; clipping is
    global over both param groups; last_grad_norm is the pre-clip norm; grads untouched."""
    ours_cls, torch_cls, kw = OPTIMIZERS[name]
    params = list(make_model(device).parameters())
    pa, pb, pc = clone_params(params), clone_params(params), clone_params(params)
    ours = ours_cls(two_groups(pa, **kw), max_grad_norm=max_norm)
    theirs = torch_cls(two_groups(pb, **kw), foreach=False)
    unclipped = torch_cls(two_groups(pc, **kw), foreach=False)
    for s in range(6):
        # grads of very different sizes from step to step, so clipping changes the result
        grads = random_grads(pa, s, scale=1.0 + 3 * s)
        set_grads(pa, grads)
        set_grads(pb, grads)
        set_grads(pc, grads)
        ours.step()
        norm = torch.nn.utils.clip_grad_norm_(pb, max_norm)
        theirs.step()
        unclipped.step()
        assert_state_matches(ours, theirs, pa, pb)
        assert all(float(ours.state[p]["step"]) == s + 1 for p in pa)
        got = ours.last_grad_norm
        assert torch.is_tensor(got) and got.dim() == 0 and got.device == pa[0].device
        torch.testing.assert_close(got, norm.to(got.dtype), rtol=1e-5, atol=0)
        expected = torch.linalg.vector_norm(torch.cat([g.double().flatten() for g in grads]))
        torch.testing.assert_close(got.double(), expected.to(device), rtol=1e-5, atol=0)
        for p, g in zip(pa, grads):
            assert torch.equal(p.grad, g), "step rewrote a grad"
    gap = max(float((a - c).detach().abs().max()) for a, c in zip(pa, pc))
    if max_norm < 1.0:
        assert gap > 1e-3  # clipping really changed the trajectory
    else:
        assert gap < 1e-5  # an inactive clip is a no-op


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("value", [-1.0, -1e-9])
def test_negative_max_grad_norm_raises(device, name, value):
    p = [nn.Parameter(torch.zeros(3, device=device))]
    with pytest.raises(ValueError, match=f"max_grad_norm.*{value}"):
        OPTIMIZERS[name][0](p, max_grad_norm=value)


def test_last_grad_norm_without_clipping_is_none(device):
    p = [nn.Parameter(torch.ones(3, device=device))]
    opt = adam_triton.Adam(p, lr=0.1)
    p[0].grad = torch.ones(3, device=device)
    opt.step()
    assert opt.last_grad_norm is None
    torch.testing.assert_close(p[0].detach(), torch.full((3,), 0.9, device=device))


@pytest.mark.parametrize("name", ["Adam", "RMSprop"])
def test_clipping_is_deterministic(device, name):
    """Two identical runs (several chunks per tensor, two groups): bit-identical params,
    states and last_grad_norm."""
    ours_cls, _, kw = OPTIMIZERS[name]
    torch.manual_seed(3)
    params = list(SmallModel(96, 128, 40).to(device).parameters())  # fc1.weight: 3 chunks of 4096
    runs = []
    for _ in range(2):
        ps = clone_params(params)
        opt = ours_cls(two_groups(ps, **kw), max_grad_norm=0.5)
        norms = []
        for s in range(3):
            set_grads(ps, random_grads(ps, s))
            opt.step()
            norms.append(opt.last_grad_norm.clone())
        runs.append((opt, ps, norms))
    (a, pa, na), (b, pb, nb) = runs
    assert_state_matches(a, b, pa, pb, exact=True)
    for x, y in zip(na, nb):
        assert torch.equal(x, y)
    grads = random_grads(pa, 2)
    expected = torch.linalg.vector_norm(torch.cat([g.double().flatten() for g in grads]))
    torch.testing.assert_close(na[-1].double(), expected.to(device), rtol=1e-5, atol=0)


# -- GradScaler -----------------------------------------------------------------------------

AMP_OPTIMIZERS = {
    "Adam": (adam_triton.Adam, torch.optim.Adam, dict(lr=1e-2)),
    "RMSprop": (adam_triton.RMSprop, torch.optim.RMSprop, dict(lr=1e-3, momentum=0.9, centered=True)),
}
INF_AT = 3
N_ITERS = 6
# init 2**10, growth_interval 2: grows after iterations 1 and 5, halves at the inf (3)
EXPECTED_SCALES = [1024.0, 2048.0, 2048.0, 1024.0, 1024.0, 2048.0]


def tiny_net(device):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).to(device)


def batch(device, it):
    gen = torch.Generator().manual_seed(100 + it)
    return torch.randn(32, 8, generator=gen).to(device), torch.randn(32, 4, generator=gen).to(device)


def make_scaler(device):
    return torch.amp.GradScaler(device.type, init_scale=2.0**10, growth_interval=2)


def backward_scaled(net, scaler, x, y, it):
    loss = nn.functional.mse_loss(net(x), y)
    scaler.scale(loss).backward()
    if it == INF_AT:
        net[0].weight.grad[0, 0] = float("inf")


@pytest.mark.parametrize("name", AMP_OPTIMIZERS)
def test_grad_scaler_matches_torch(device, name):
    ours_cls, torch_cls, kw = AMP_OPTIMIZERS[name]
    net_o, net_t = tiny_net(device), tiny_net(device)
    pa, pb = list(net_o.parameters()), list(net_t.parameters())
    ours = ours_cls(pa, **kw)
    theirs = torch_cls(pb, foreach=False, **kw)
    assert ours._step_supports_amp_scaling
    sc_o, sc_t = make_scaler(device), make_scaler(device)
    scales = []
    for it in range(N_ITERS):
        x, y = batch(device, it)
        for net, opt, sc in ((net_o, ours, sc_o), (net_t, theirs, sc_t)):
            opt.zero_grad()
            backward_scaled(net, sc, x, y, it)
        before = snapshot(ours, pa)
        sc_o.step(ours)
        sc_t.step(theirs)
        sc_o.update()
        sc_t.update()
        assert sc_o.get_scale() == sc_t.get_scale()
        scales.append(sc_t.get_scale())
        if it == INF_AT:
            assert_unchanged(ours, pa, before)
        assert_state_matches(ours, theirs, pa, pb, FP32_TOL)
        assert all(float(ours.state[p]["step"]) == it + (it < INF_AT) for p in pa)
        # GradScaler's attributes are gone again after the step
        assert not hasattr(ours, "grad_scale") and not hasattr(ours, "found_inf")
    assert scales == EXPECTED_SCALES
    assert (pa[0] - tiny_net(device)[0].weight).abs().max() > 1e-3


@pytest.mark.parametrize("name", AMP_OPTIMIZERS)
def test_grad_scaler_with_max_grad_norm_matches_torch_recipe(device, name):
    """ours(max_grad_norm) under GradScaler == torch's recipe: unscale_, clip_grad_norm_, step."""
    ours_cls, torch_cls, kw = AMP_OPTIMIZERS[name]
    max_norm = 0.05
    net_o, net_t = tiny_net(device), tiny_net(device)
    pa, pb = list(net_o.parameters()), list(net_t.parameters())
    ours = ours_cls(pa, max_grad_norm=max_norm, **kw)
    theirs = torch_cls(pb, foreach=False, **kw)
    sc_o, sc_t = make_scaler(device), make_scaler(device)
    scales, clipped = [], 0
    for it in range(N_ITERS):
        x, y = batch(device, it)
        for net, opt, sc in ((net_o, ours, sc_o), (net_t, theirs, sc_t)):
            opt.zero_grad()
            backward_scaled(net, sc, x, y, it)
        scaled_grads = [p.grad.clone() for p in pa]
        before = snapshot(ours, pa)
        sc_o.step(ours)
        sc_t.unscale_(theirs)
        norm = torch.nn.utils.clip_grad_norm_(pb, max_norm)
        sc_t.step(theirs)
        sc_o.update()
        sc_t.update()
        assert sc_o.get_scale() == sc_t.get_scale()
        scales.append(sc_t.get_scale())
        got = ours.last_grad_norm
        assert got.dim() == 0 and got.device == pa[0].device
        if it == INF_AT:
            assert_unchanged(ours, pa, before)
            assert not torch.isfinite(got) and not torch.isfinite(norm)
        else:
            torch.testing.assert_close(got, norm.to(got.dtype), rtol=1e-5, atol=0)
            clipped += float(norm) > max_norm
        assert_state_matches(ours, theirs, pa, pb, FP32_TOL)
        assert all(float(ours.state[p]["step"]) == it + (it < INF_AT) for p in pa)
        for p, g in zip(pa, scaled_grads):
            assert torch.equal(p.grad, g), "step rewrote a grad"
    assert scales == EXPECTED_SCALES
    assert clipped >= 3  # clipping was active on most iterations


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_step_has_no_host_sync_on_cuda(device):
    """With grad_scale/found_inf and max_grad_norm, step() never synchronizes with the host
    (no .item()): run under torch.cuda.set_sync_debug_mode('error') after a warm-up step,
    with fresh grad tensors every step, and still match torch's recipe."""
    if device.type != "cuda":
        pytest.skip("sync check needs CUDA tensors (ADAM_TRITON_TEST_DEVICE=cuda)")
    params = list(make_model(device).parameters())
    pa, pb = clone_params(params), clone_params(params)
    ours = adam_triton.Adam(two_groups(pa), max_grad_norm=0.1)
    theirs = torch.optim.Adam(two_groups(pb), foreach=False)
    scale = torch.tensor(256.0, device=device)
    for s in range(4):
        grads = random_grads(pa, s)
        set_grads(pa, [g * 256.0 for g in grads])  # scaled grads, fresh allocations
        set_grads(pb, grads)
        found_inf = torch.zeros((), device=device)
        torch.cuda.synchronize()
        ours.grad_scale, ours.found_inf = scale, found_inf
        try:
            if s == 0:
                ours.step()  # warm-up: autotuning and first table uploads may synchronize
            else:
                torch.cuda.set_sync_debug_mode("error")
                try:
                    ours.step()
                finally:
                    torch.cuda.set_sync_debug_mode(0)
        finally:
            del ours.grad_scale, ours.found_inf
        norm = torch.nn.utils.clip_grad_norm_(pb, 0.1)
        theirs.step()
        assert_state_matches(ours, theirs, pa, pb, FP32_TOL)
        torch.testing.assert_close(ours.last_grad_norm, norm, rtol=1e-5, atol=0)
