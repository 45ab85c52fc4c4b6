"""The host side of step(): the launch plan is built once and then only checked, re-reading
just what a training loop changes (reallocated grads, scheduled hyperparameters); the host
benchmark measures and counts what it says."""

import pytest
import torch
from _util import Lockstep, make_model, torch_adamw

import adam_triton
from adam_triton import _plan, host_bench


@pytest.fixture
def builds(monkeypatch):
    """A list that receives one entry per launch-plan build."""
    calls = []
    original = _plan.Plan.build.__func__

    def build(cls, opt):
        calls.append(opt)
        return original(cls, opt)

    monkeypatch.setattr(_plan.Plan, "build", classmethod(build))
    return calls


@pytest.mark.parametrize("fresh_grads", [False, True])
def test_plan_is_built_once_in_a_training_loop(device, builds, fresh_grads):
    """Ten steps with a scheduler changing lr (and OneCycleLR's betas) every step, with the
    same grad tensors or new ones each step (zero_grad()'s default): one build, and the
    numbers follow torch's."""
    params = list(make_model(device).parameters())
    run = Lockstep(params, lambda ps: adam_triton.AdamW(ps, lr=1e-3), lambda ps: torch_adamw(ps, lr=1e-3))
    scheds = [torch.optim.lr_scheduler.OneCycleLR(o, max_lr=1e-2, total_steps=20) for o in (run.ours, run.torch)]
    for s in range(10):
        if fresh_grads or s == 0:
            run.step()  # new grad tensors every step
        else:  # the same grad tensors, new values written into them
            from _util import random_grads

            grads = random_grads(run.params_ours, s)
            for ps in (run.params_ours, run.params_torch):
                for p, g in zip(ps, grads):
                    p.grad.copy_(g)
            run.ours.step()
            run.torch.step()
            run.check()
        for sched in scheds:
            sched.step()
    assert len(builds) == 1


def test_grad_of_another_kind_rebuilds(device, builds):
    """A new grad that does not fit its entry (here: non-contiguous where the last one was
    contiguous, so the kernel must read a staged copy) is not patched in: the plan is
    rebuilt, and the numbers stay torch's."""
    params = list(make_model(device).parameters())
    run = Lockstep(params, lambda ps: adam_triton.Adam(ps, lr=1e-2),
                   lambda ps: torch.optim.Adam(ps, lr=1e-2, foreach=False))
    run.step()
    run.step()
    assert len(builds) == 1
    grads = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) for i, p in enumerate(params)]
    for ps in (run.params_ours, run.params_torch):
        for p, g in zip(ps, grads):
            g = g.to(device)
            p.grad = g.t().contiguous().t() if g.dim() == 2 else g.clone()  # same values, transposed layout
    assert any(not p.grad.is_contiguous() for p in run.params_ours)
    run.ours.step()
    run.torch.step()
    run.check()
    assert len(builds) == 2


def test_host_bench_counts_and_ratios():
    """`bench --host` on two groups: our launches are stubbed and counted (2 a step: steps
    and one update for both groups), torch's fused AdamW makes one fused call and one step
    increment per group, and the ratios are the quotients of the times it reports. The
    stubs leave the params untouched, so no kernel ran."""
    row = host_bench.measure(n_tensors=12, n_groups=2, numel=8, steps=3, device=torch.device("cpu"))
    assert row["launches"] == 2
    assert row["torch_calls"] == 4
    for key in ("ours", "ours_fresh", "torch", "torch_fresh"):
        assert row[key] > 0
    assert row["ratio"] == pytest.approx(row["ours"] / row["torch"])
    assert row["ratio_fresh"] == pytest.approx(row["ours_fresh"] / row["torch_fresh"])


def test_stubbed_launches_run_no_kernel_and_are_restored():
    from adam_triton import kernels

    original = kernels.adam_update
    p = torch.nn.Parameter(torch.ones(5))
    opt = adam_triton.AdamW([p], lr=0.1)
    with host_bench.stubbed_launches() as counter:
        p.grad = torch.ones(5)
        opt.step()
        assert counter["launches"] == 2
        assert torch.equal(p.detach(), torch.ones(5))  # nothing computed
    assert kernels.adam_update is original


def test_zero_grad_lets_go_of_the_grads(device, builds):
    """After zero_grad() (set_to_none) the optimizer holds no reference to the old grads, so
    they are freed there as with torch's optimizers; the next step takes the new grads on
    the fast path (no rebuild) and matches torch; zero_grad(set_to_none=False) keeps them."""
    import gc
    import weakref

    params = list(make_model(device).parameters())
    run = Lockstep(params, lambda ps: adam_triton.AdamW(ps, lr=1e-2), lambda ps: torch_adamw(ps, lr=1e-2))
    run.step()
    run.step()
    for s in range(3):
        refs = [weakref.ref(p.grad) for p in run.params_ours]
        run.ours.zero_grad()
        run.torch.zero_grad()
        gc.collect()
        assert all(r() is None for r in refs), "the optimizer still holds a grad after zero_grad()"
        run.step()  # new grads, compared with torch
    assert len(builds) == 1
    grads = [p.grad for p in run.params_ours]
    run.ours.zero_grad(set_to_none=False)
    assert all(p.grad is g for p, g in zip(run.params_ours, grads))
    assert all(not g.any() for g in grads)
