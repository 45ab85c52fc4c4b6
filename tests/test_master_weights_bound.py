"""How far fp32 master weights may drift from an fp32 torch.optim run, and why (issue 13,
item 9, third bullet).

The master of a bf16/fp16 param is updated by exactly the fp32 math of our fp32 path: it is
bit-identical to ours run on fp32 params fed the same (upcast) grads. What is left between
it and torch.optim in fp32 is the two implementations' fp32 rounding, and that is not
bounded relative to the final value: an element that ends near zero after updates that
nearly cancel (p0 - sum of steps) carries the rounding of the whole path, so its relative
difference can be 1e-3 and more, for torch's own fp32 run against float64 as much as for
ours. The bound that holds is absolute, in fp32 ulps of the path an element travelled,
path = |p0| + sum over steps of |p_t - p_(t-1)| (from a float64 run):
  |master - torch fp32| <= 16 ulps of path     (measured: at most 6.2 over 230 random configs)
  |master - float64|    <= 32 ulps of path     (measured: 17.8; torch fp32: 17.8 too)
  and, per tensor, no worse than twice torch fp32's own error against float64."""

import random

import pytest
import torch
from torch import nn

import adam_triton

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
ULP = 2.0 ** -24  # half the fp32 spacing at 1: the unit roundoff


def _configs(n=24, seed=0):
    """Random hyperparameters over the ranges users set (the differential tests' kind)."""
    rng = random.Random(seed)
    out = []
    for k in range(n):
        name = ("Adam", "AdamW", "RMSprop")[k % 3]
        lr = 10 ** rng.uniform(-4, -1)
        eps = 10 ** rng.uniform(-10, -3)
        wd = rng.choice([0.0, 10 ** rng.uniform(-3, -0.5)])
        if name == "RMSprop":
            kw = dict(lr=lr, alpha=rng.choice([0.99, 0.9, rng.uniform(0.5, 0.999)]), eps=eps, weight_decay=wd,
                      momentum=rng.choice([0.0, rng.uniform(0.1, 0.95)]), centered=rng.random() < 0.5,
                      maximize=rng.random() < 0.3)
        else:
            kw = dict(lr=lr, betas=(rng.choice([0.9, rng.uniform(0.0, 0.99)]), rng.choice([0.999, rng.uniform(0.5, 0.9999)])),
                      eps=eps, weight_decay=wd, amsgrad=rng.random() < 0.5, maximize=rng.random() < 0.3)
        dtype = (BF16, F16)[(k // 3) % 2]
        out.append((name, kw, dtype, rng.choice([5, 10, 20]), rng.choice([1.0, 1e-2]), rng.choice([1.0, 1e-3])))
    return out


CONFIGS = _configs()


def _runs(device, name, kw, dtype, steps, scale, gscale, seed, n=512):
    """Final values of: ours with masters (fp32 states), ours on fp32 params, torch fp32,
    torch float64 (all from the same low-precision start on the same low-precision grads),
    and the float64 run's path length per element."""
    gen = torch.Generator().manual_seed(seed)
    p0 = (torch.randn(n, generator=gen) * scale).to(dtype)
    grads = [(torch.randn(n, generator=gen) * gscale).to(dtype) for _ in range(steps)]
    ours = nn.Parameter(p0.to(device, copy=True))
    o32 = nn.Parameter(p0.float().to(device))
    t32 = nn.Parameter(p0.float())
    r64 = nn.Parameter(p0.double())
    opts = [getattr(adam_triton, name)([ours], state_dtype=F32, master_weights=True, **kw),
            getattr(adam_triton, name)([o32], **kw),
            getattr(torch.optim, name)([t32], foreach=False, **kw),
            getattr(torch.optim, name)([r64], foreach=False, **kw)]
    path = p0.double().abs()
    for g in grads:
        prev = r64.detach().clone()
        ours.grad, o32.grad, t32.grad, r64.grad = g.to(device), g.float().to(device), g.float(), g.double()
        for o in opts:
            o.step()
        path += (r64.detach() - prev).abs()
    master = opts[0].state[ours]["master_param"].cpu()
    assert torch.equal(ours.detach().cpu(), master.to(dtype))  # the param is the master, rounded
    return master, o32.detach().cpu(), t32.detach(), r64.detach(), path


@pytest.mark.parametrize("k", range(len(CONFIGS)))
def test_master_weights_drift_is_bounded_by_the_path(device, k):
    name, kw, dtype, steps, scale, gscale = CONFIGS[k]
    master, ours32, torch32, exact, path = _runs(device, name, kw, dtype, steps, scale, gscale, seed=k)
    # the master adds no error of its own: it is our fp32 path, bit for bit
    assert torch.equal(master, ours32)
    m, t = master.double(), torch32.double()
    vs_torch = ((m - t).abs() / (ULP * path)).max().item()
    ours_err = (m - exact).abs() / (ULP * path)
    torch_err = (t - exact).abs() / (ULP * path)
    assert vs_torch <= 32, (name, kw, vs_torch)
    assert ours_err.max().item() <= 32, (name, kw, ours_err.max().item(), torch_err.max().item())
    assert ours_err.mean().item() <= 2 * torch_err.mean().item() + 0.1, (
        name, kw, ours_err.mean().item(), torch_err.mean().item())


def test_relative_drift_is_torchs_own_rounding(device):
    """The finding behind the reported 4.7e-5: over these configs the relative difference
    master vs torch fp32 exceeds 2e-5 somewhere (at elements that end near zero), and
    there torch fp32 is itself that far (> 2e-5 relative) from float64."""
    worst = []
    for k, (name, kw, dtype, steps, scale, gscale) in enumerate(CONFIGS[:12]):
        master, _, torch32, exact, _ = _runs(device, name, kw, dtype, steps, scale, gscale, seed=k)
        m, t = master.double(), torch32.double()
        rel = (m - t).abs() / t.abs().clamp_min(1e-30)
        i = int(rel.argmax())
        worst.append((rel[i].item(), abs(t[i] - exact[i]).item() / abs(exact[i]).item(), name))
    big = [w for w in worst if w[0] > 2e-5]
    assert big, worst
    for rel, torch_rel, name in big:
        assert torch_rel > 2e-5 or rel <= 2e-4, (rel, torch_rel, name)
