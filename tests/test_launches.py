"""Kernel launches: one Adam step over 150 tensors is at most two launches (step increment +
update), and a changing learning rate never selects a new kernel specialization."""

import inspect

import pytest
import torch
from _util import Lockstep, make_model, torch_adam

import adam_triton
from adam_triton import tuning
from adam_triton.kernels import adam as adam_kernels


def _kernel_class():
    """The class whose `run` every Triton launch goes through: InterpretedFunction under the
    interpreter, JITFunction when compiling."""
    cls = type(adam_kernels._adam_kernel)
    assert hasattr(cls, "run")
    return cls


def _kernel_name(kernel):
    return kernel.fn.__name__


@pytest.fixture
def launches(monkeypatch):
    """A list that receives (kernel name, {arg name: value}) for every Triton launch."""
    cls = _kernel_class()
    original = cls.run
    calls = []

    def run(self, *args, grid, warmup, **kwargs):
        if not warmup:
            names = list(inspect.signature(self.fn).parameters)
            bound = dict(zip(names, args))
            bound.update(kwargs)
            calls.append((_kernel_name(self), bound))
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(cls, "run", run)
    return calls


def _constexpr_names(kernel):
    import triton.language as tl

    sig = inspect.signature(kernel.fn)
    return [n for n, p in sig.parameters.items() if p.annotation is tl.constexpr]


def _many_params(device, n=150):
    gen = torch.Generator().manual_seed(2)
    sizes = [1 + (7 * i) % 40 for i in range(n)]
    return [torch.randn(s, generator=gen).to(device).requires_grad_() for s in sizes]


def test_one_step_150_tensors_is_at_most_two_launches(device, launches):
    params = _many_params(device)
    kw = dict(lr=1e-2, betas=(0.8, 0.99))
    run = Lockstep(params, lambda ps: adam_triton.Adam(ps, **kw), lambda ps: torch_adam(ps, **kw))
    if not tuning.interpreter_on():
        run.step()  # the first compiled step may autotune (launches on scratch tensors)
        del launches[:]
    run.step()  # the numbers match torch (checked inside)
    names = [name for name, _ in launches]
    assert 0 < len(names) <= 2, names
    assert names.count("_adam_kernel") == 1, names
    # the one update launch covers all 150 tensors: its tensor table has 150 rows
    (update,) = [args for name, args in launches if name == "_adam_kernel"]
    assert update["table_ptr"].shape[0] == 150


def test_lr_schedule_adds_no_specializations(device, launches):
    params = list(make_model(device).parameters())
    kw = dict(lr=1e-3, weight_decay=0.01, decoupled_weight_decay=True)
    run = Lockstep(params, lambda ps: adam_triton.Adam(ps, **kw), lambda ps: torch_adam(ps, **kw))

    def schedule(opt):
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=5e-2, total_steps=25)

    s_ours, s_torch = schedule(run.ours), schedule(run.torch)
    kernel = adam_kernels._adam_kernel
    compiled = not tuning.interpreter_on()
    cache_sizes = []
    for _ in range(20):
        run.step()  # lockstep with torch: the scheduled lr is used correctly
        s_ours.step()
        s_torch.step()
        if compiled:
            cache_sizes.append(sum(len(c[0]) for c in kernel.device_caches.values()))
    updates = [args for name, args in launches if name == "_adam_kernel"]
    assert len(updates) == 20
    constexprs = _constexpr_names(kernel)
    assert {"AMSGRAD", "MAXIMIZE", "WD_MODE", "CHUNK", "BLOCK"} <= set(constexprs)
    first = {n: updates[0][n] for n in constexprs}
    for args in updates[1:]:
        assert {n: args[n] for n in constexprs} == first
    # lr really changed from step to step (it is a runtime argument, not a constexpr)
    lrs = {float(args["lr"]) for args in updates}
    assert len(lrs) >= 15
    if compiled:
        assert cache_sizes[0] >= 1 and cache_sizes[-1] == cache_sizes[0], cache_sizes
