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
    assert update["n_rows"] == 150 and update["table_ptr"].shape[1] == 150


def test_lr_schedule_adds_no_specializations(device, launches):
    params = list(make_model(device).parameters())
    kw = dict(lr=1e-3, weight_decay=0.01, decoupled_weight_decay=True)
    run = Lockstep(params, lambda ps: adam_triton.Adam(ps, **kw), lambda ps: torch_adam(ps, **kw))

    def schedule(opt):
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=5e-2, total_steps=25)

    s_ours, s_torch = schedule(run.ours), schedule(run.torch)
    kernel = adam_kernels._adam_kernel
    compiled = not tuning.interpreter_on()
    cache_sizes, lrs = [], set()
    for _ in range(20):
        run.step()  # lockstep with torch: the scheduled lr is used correctly
        # the lr the launch read: column 0 of the hyperparameter table (float64 bits)
        hyper = launches[-1][1]["hyper_ptr"]
        lrs.add(float(hyper[0, :1].cpu().view(torch.float64)))
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
    # lr really changed from step to step (a table entry, not a constexpr)
    assert len(lrs) >= 15
    if compiled:
        assert cache_sizes[0] >= 1 and cache_sizes[-1] == cache_sizes[0], cache_sizes


def _groups(params, n_groups):
    """params split into n_groups groups whose hyperparameters all differ."""
    bounds = [round(i * len(params) / n_groups) for i in range(n_groups + 1)]
    return [
        dict(params=params[a:b], lr=1e-3 * (1 + i), betas=(0.9 - 0.001 * i, 0.999 - 1e-5 * i),
             eps=1e-8 * (1 + i), weight_decay=0.01 * (i % 3))
        for i, (a, b) in enumerate(zip(bounds, bounds[1:]))
    ]


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_one_update_launch_for_100_param_groups(device, launches, name):
    """100 param groups of one dtype, each with its own lr, betas, eps and weight decay
    (some without decay): one step is two launches (steps + update), and every tensor
    gets its group's hyperparameters (lockstep with torch.optim, which takes 100 calls)."""
    params = _many_params(device, n=150)
    torch_cls = torch.optim.Adam if name == "Adam" else torch.optim.AdamW
    run = Lockstep(params, lambda ps: getattr(adam_triton, name)(_groups(ps, 100)),
                   lambda ps: torch_cls(_groups(ps, 100), foreach=False))
    run.step()  # (the first compiled step may autotune)
    for _ in range(3):
        del launches[:]
        run.step()  # compared with torch inside
        names = [n for n, _ in launches]
        if name == "Adam":  # L2 decay in some groups, none in others: two kernel variants
            assert names == ["_increment_steps_kernel", "_adam_kernel"] * 2, names
        else:
            assert names == ["_increment_steps_kernel", "_adam_kernel"], names
        for n, args in launches:
            if n == "_adam_kernel":  # every group's row is in the table the launch reads
                assert args["hyper_ptr"].shape[0] == 100


def test_groups_with_float_and_tensor_lrs_share_a_launch(device, launches):
    """Per-group lr as a float, an fp32 tensor and an fp64 tensor on the params' device, each
    changed every step (floats by a scheduler, tensors in place): one update launch, and
    each group follows its own lr as torch does."""
    params = _many_params(device, n=12)
    lr32 = torch.tensor(2e-3, device=device)
    lr64 = torch.tensor(3e-3, device=device, dtype=torch.float64)

    def groups(ps, tensors):
        return [dict(params=ps[:4], lr=1e-3), dict(params=ps[4:8], lr=lr32 if tensors else 2e-3),
                dict(params=ps[8:], lr=lr64 if tensors else 3e-3)]

    run = Lockstep(params, lambda ps: adam_triton.AdamW(groups(ps, True)),
                   lambda ps: torch.optim.AdamW(groups(ps, False), foreach=False))
    for k in range(4):
        del launches[:]
        run.step()
        assert [n for n, _ in launches].count("_adam_kernel") == 1
        scale = 0.5 ** (k + 1)
        for opt in (run.ours, run.torch):
            opt.param_groups[0]["lr"] = 1e-3 * scale
        lr32.fill_(2e-3 * scale)
        lr64.fill_(3e-3 * scale)
        run.torch.param_groups[1]["lr"] = float(lr32)
        run.torch.param_groups[2]["lr"] = float(lr64)
