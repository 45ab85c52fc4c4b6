"""torch's own optimizer database (torch/testing/_internal/common_optimizers.py, shipped
with torch) run against our classes:

* every optim input torch lists for Adam, AdamW and RMSprop on this device, with each of
  the implementation flags torch tries (foreach, fused, differentiable: False and True),
  steps ours and torch.optim's single-tensor implementation (the ground truth torch's own
  tests compare against) in lockstep, params and every state tensor compared after each
  step, for fp32, fp64 and fp16 params (the dtypes torch's generic tests use);
* every error input raises (or warns) what torch raises: the type, torch's regex, and the
  very message torch.optim gives for the same input.

Skipped, with the reason: differentiable=True (refused by adam_triton, as the README says)."""

import copy
import warnings

import pytest
import torch
from torch import nn
from _util import FP32_TOL, assert_state_matches, clone_params, random_grads, set_grads

import adam_triton
from conftest import DEVICE

# torch.testing._internal imports expecttest: the test extra installs it
from torch.testing._internal.common_optimizers import (
    OptimizerErrorEnum,
    _get_optim_inputs_including_global_cliquey_kwargs,
    optim_db,
)

OURS = {"Adam": adam_triton.Adam, "AdamW": adam_triton.AdamW, "RMSprop": adam_triton.RMSprop}
INFOS = {info.name: info for info in optim_db if info.name in OURS}
FLAGS = ("foreach", "fused", "differentiable")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16}
TOLERANCES = {torch.float32: FP32_TOL, torch.float64: dict(rtol=1e-12, atol=1e-14)}
# fp16: ours computes in fp32 and rounds once, torch's single-tensor step rounds every
# intermediate in fp16, so the two are compared with a float64 run of torch's step:
# ours may be off by at most twice torch's own fp16 error, plus FP16_ATOL (about one fp16
# ulp of the values here)
FP16_ATOL = 2e-3
STEPS = 4


def _optim_inputs():
    cases = []
    for name, info in INFOS.items():
        for dtype_name, dtype in DTYPES.items():
            inputs = _get_optim_inputs_including_global_cliquey_kwargs(DEVICE, dtype, info)
            # the dtype-specific kwargs (torch raises eps for fp16 Adam) come from the dtype's inputs
            by_desc = {i.desc: i for i in info.optim_inputs_func(DEVICE, dtype)}
            for i, inp in enumerate(inputs):
                base = by_desc.get(inp.desc.split(" & ")[0])
                kwargs = dict(inp.kwargs)
                if base is not None:
                    kwargs.update({k: v for k, v in base.kwargs.items() if k not in kwargs or k == "eps"})
                flags = "-".join(f"{f}={kwargs[f]}" for f in FLAGS if f in kwargs)
                cases.append(pytest.param(name, dtype, kwargs, id=f"{name}-{dtype_name}-{inp.desc}-{flags}-{i}"))
    return cases


def _params(device, dtype):
    """torch's generic shapes: a (10, 5) weight, a (10,) bias, a non-contiguous matrix, a
    0-d param and a zero-element param (torch's fused tests put one last)."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(10, 5, generator=gen)
    strided = torch.randn(6, 4, 2, generator=gen)[..., 0]
    ps = [weight, torch.randn(10, generator=gen), strided, torch.randn((), generator=gen), torch.empty(0)]
    out = []
    for t in ps:
        q = torch.empty_strided(t.shape, t.stride(), dtype=dtype, device=device)
        q.copy_(t)
        out.append(nn.Parameter(q))
    return out


@pytest.mark.parametrize("name, dtype, kwargs", _optim_inputs())
def test_optim_input_matches_torch(device, name, dtype, kwargs):
    if kwargs.get("differentiable"):
        pytest.skip("differentiable=True is refused by adam_triton (README: unsupported)")
    torch_kwargs = {k: v for k, v in kwargs.items() if k not in FLAGS}
    torch_kwargs["foreach"] = False  # the for-loop: torch's ground truth
    params = _params(device, dtype)
    pa, pb = clone_params(params), clone_params(params)
    ours = OURS[name](pa, **copy.deepcopy(kwargs))
    theirs = getattr(torch.optim, name)(pb, **copy.deepcopy(torch_kwargs))
    if dtype == torch.float16:
        pc = [nn.Parameter(p.detach().double()) for p in params]
        exact = getattr(torch.optim, name)(pc, **copy.deepcopy(torch_kwargs))
    for s in range(STEPS):
        # step 2: the bias has no grad (a no-op for it, as in torch's _compare_between)
        grads = random_grads(pa, s, skip=(1,) if s == 2 else ())
        set_grads(pa, grads)
        set_grads(pb, grads)
        ours.step()
        theirs.step()
        if dtype != torch.float16:
            assert_state_matches(ours, theirs, pa, pb, TOLERANCES[dtype])
            continue
        set_grads(pc, [None if g is None else g.double() for g in grads])
        exact.step()
        _assert_no_worse_than_torch(ours, theirs, exact, pa, pb, pc, s)
    moved = (pa[0].detach() - params[0].detach()).abs().max()
    assert moved > 0, "the weight did not move"


def _assert_no_worse_than_torch(ours, theirs, exact, pa, pb, pc, step):
    """Each param and state tensor: max |ours - fp64| <= 2 max |torch - fp64| + FP16_ATOL."""
    for i, (a, b, c) in enumerate(zip(pa, pb, pc)):
        sa, sb, sc = ours.state.get(a, {}), theirs.state.get(b, {}), exact.state.get(c, {})
        assert set(sa) == set(sb), (i, sorted(sa), sorted(sb))
        pairs = [("param", a.detach(), b.detach(), c.detach())]
        pairs += [(k, sa[k], sb[k], sc[k]) for k in sb if k != "step"]
        if "step" in sb:
            assert float(sa["step"]) == float(sb["step"])
        for what, x, y, ref in pairs:
            assert x.dtype == y.dtype == torch.float16, (i, what, x.dtype)
            if ref.numel() == 0:
                continue
            ours_err = (x.double() - ref).abs().max().item()
            torch_err = (y.double() - ref).abs().max().item()
            assert ours_err <= 2 * torch_err + FP16_ATOL, (
                f"step {step} param {i} {what}: ours off by {ours_err}, torch's fp16 by {torch_err}")


def _error_inputs():
    cases = []
    for name, info in INFOS.items():
        for i, err in enumerate(info.optim_error_inputs_func(device=DEVICE, dtype=torch.float32)):
            desc = err.optimizer_error_input.desc
            cases.append(pytest.param(name, i, id=f"{name}-{i}-{desc}"))
    return cases


def _run_error_input(cls, err):
    """What torch's test_errors does: construct (and step, for STEP_ERROR inputs)."""
    inp = err.optimizer_error_input
    if err.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR:
        cls(inp.params, **inp.kwargs)
    else:
        cls(inp.params, **inp.kwargs).step()


def _torch_outcome(cls, err):
    """(exception or None, [warning messages of the expected category]) from torch's class."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            _run_error_input(cls, err)
        except Exception as exc:  # noqa: BLE001 - the exception is the result under test
            return exc, []
    return None, [str(w.message) for w in caught if issubclass(w.category, err.error_type)]


@pytest.mark.parametrize("name, index", _error_inputs())
def test_error_input_like_torch(device, name, index):
    err = INFOS[name].optim_error_inputs_func(device=DEVICE, dtype=torch.float32)[index]
    torch_exc, torch_warnings = _torch_outcome(getattr(torch.optim, name), err)
    if issubclass(err.error_type, Warning):
        assert torch_warnings, "premise: torch warns"
        with pytest.warns(err.error_type, match=err.error_regex) as record:
            _run_error_input(OURS[name], err)
        ours = [str(w.message) for w in record if issubclass(w.category, err.error_type)]
        assert set(torch_warnings) <= set(ours), (ours, torch_warnings)
        return
    assert isinstance(torch_exc, err.error_type), f"premise: torch raises {err.error_type}, got {torch_exc!r}"
    with pytest.raises(err.error_type, match=err.error_regex) as exc:
        _run_error_input(OURS[name], err)
    assert str(exc.value) == str(torch_exc)
