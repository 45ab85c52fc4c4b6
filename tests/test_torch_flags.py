"""torch's implementation flags and param validation, as a user of torch.optim expects them
(issue 13, items 2, 3, 4 and 8):

* fused=False is honoured: that optimizer, or that param group, takes the plain-PyTorch
  path (no Triton launch) and steps exactly as torch.optim's single-tensor implementation;
* differentiable=True is refused the same way wherever it is given: the constructor, a
  param-group dict, add_param_group;
* integer params are refused as torch refuses them (same exception type and message),
  before anything changes;
* with fused=True, params torch's fused path refuses (meta, integer) get torch's error,
  before any state is created; a model built on meta, materialised with to_empty and
  initialised then trains exactly like torch.optim."""

import pytest
import torch
from torch import nn
from _util import (
    FP32_TOL,
    Lockstep,
    assert_state_matches,
    clone_params,
    continue_lockstep,
    first_error,
    make_model,
    random_grads,
    run_in_child,
    set_grads,
    step_both,
)

import adam_triton
from adam_triton import tuning

FUSED_PREFIX = "`fused=True` requires all the params to be floating point Tensors of supported devices"


@pytest.fixture
def launches(monkeypatch):
    """A list that receives the name of every Triton kernel launched."""
    import triton.runtime.interpreter as interp
    import triton.runtime.jit as jit

    cls = interp.InterpretedFunction if tuning.interpreter_on() else jit.JITFunction
    original = cls.run
    names = []

    def run(self, *args, **kwargs):
        if not kwargs.get("warmup", False):
            names.append(self.fn.__name__)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, "run", run)
    return names


def _groups(params, fused_first=None, fused_second=None):
    """Two param groups with different hyperparameters; `fused` set only where given."""
    first = {"params": params[:3], "lr": 2e-2}
    second = {"params": params[3:], "betas": (0.8, 0.95), "weight_decay": 0.1}
    for group, fused in ((first, fused_first), (second, fused_second)):
        if fused is not None:
            group["fused"] = fused
    return [first, second]


# -- fused=False ------------------------------------------------------------------------------

ADAMS = {
    "Adam": (adam_triton.Adam, torch.optim.Adam, dict(lr=1e-2, amsgrad=True, weight_decay=0.05)),
    "AdamW": (adam_triton.AdamW, torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
}


@pytest.mark.parametrize("name", list(ADAMS))
def test_fused_false_takes_the_pytorch_path(device, name, launches):
    """Optimizer-wide fused=False: no Triton launch at all, and every param and state
    bit-identical to torch.optim's single-tensor step (the plain-PyTorch path is that
    math, op for op), for four steps; the flag stays in the param groups as in torch."""
    ours_cls, torch_cls, kw = ADAMS[name]
    params = list(make_model(device).parameters())
    run = Lockstep(params, lambda ps: ours_cls(ps, fused=False, **kw),
                   lambda ps: torch_cls(ps, foreach=False, **kw))
    for _ in range(4):
        run.step(check=False)
        assert_state_matches(run.ours, run.torch, run.params_ours, run.params_torch, exact=True)
    assert launches == []
    assert all(g["fused"] is False for g in run.ours.param_groups)
    assert run.ours.state_dict()["param_groups"][0]["fused"] is False


@pytest.mark.parametrize("name", list(ADAMS))
def test_fused_false_in_one_param_group(device, name, launches):
    """fused=False in one group's dict: that group steps exactly as torch's single-tensor
    path; the other group still takes the kernels and matches torch within fp32 tolerance."""
    ours_cls, torch_cls, kw = ADAMS[name]
    params = list(make_model(device).parameters())
    run = Lockstep(params, lambda ps: ours_cls(_groups(ps, fused_first=False), **kw),
                   lambda ps: torch_cls(_groups(ps), foreach=False, **kw))
    for _ in range(3):
        run.step()  # everything within FP32_TOL
        n = len(run.ours.param_groups[0]["params"])
        assert_state_matches(run.ours, run.torch, run.params_ours[:n], run.params_torch[:n], exact=True)
    assert launches, "the fused group took no kernel"
    assert run.ours.param_groups[0]["fused"] is False


@pytest.mark.parametrize("name", list(ADAMS))
def test_fused_false_through_add_param_group(device, name, launches):
    """A group added later with fused=False is honoured as well."""
    ours_cls, torch_cls, kw = ADAMS[name]
    params = list(make_model(device).parameters())
    pa, pb = clone_params(params), clone_params(params)
    oa = ours_cls(pa[:3], **kw)
    ob = torch_cls(pb[:3], foreach=False, **kw)
    oa.add_param_group({"params": pa[3:], "fused": False, "lr": 3e-2})
    ob.add_param_group({"params": pb[3:], "lr": 3e-2})
    for s in range(3):
        step_both(oa, ob, pa, pb, random_grads(pa, s))
        assert_state_matches(oa, ob, pa, pb)
        assert_state_matches(oa, ob, pa[3:], pb[3:], exact=True)
    assert oa.param_groups[1]["fused"] is False


# -- differentiable=True ----------------------------------------------------------------------

CLASSES = {"Adam": adam_triton.Adam, "AdamW": adam_triton.AdamW, "RMSprop": adam_triton.RMSprop}


def _constructor_refusal(cls, device):
    with pytest.raises(Exception) as exc:
        cls([nn.Parameter(torch.zeros(3, device=device))], differentiable=True)
    assert "differentiable" in str(exc.value)
    return type(exc.value)


@pytest.mark.parametrize("name", list(CLASSES))
def test_differentiable_in_a_param_group_refused(device, name):
    """differentiable=True in a param-group dict is refused as the constructor argument is
    (same exception type), not silently accepted."""
    cls = CLASSES[name]
    refusal = _constructor_refusal(cls, device)
    params = list(make_model(device).parameters())
    groups = [{"params": params[:3]}, {"params": params[3:], "differentiable": True}]
    with pytest.raises(refusal, match="differentiable"):
        cls(groups)


@pytest.mark.parametrize("name", list(CLASSES))
def test_differentiable_through_add_param_group_refused(device, name):
    """add_param_group({..., differentiable=True}) is refused and adds nothing: the
    optimizer goes on as if it had not been called (its params untouched by later steps)."""
    cls = CLASSES[name]
    refusal = _constructor_refusal(cls, device)
    params = list(make_model(device).parameters())
    opt = cls(params[:3], lr=1e-2)
    extra = nn.Parameter(torch.ones(4, device=device))
    with pytest.raises(refusal, match="differentiable"):
        opt.add_param_group({"params": [extra], "differentiable": True})
    assert len(opt.param_groups) == 1
    assert all(p is not extra for g in opt.param_groups for p in g["params"])
    extra.grad = torch.ones_like(extra)
    set_grads(params[:3], random_grads(params[:3], 0))
    opt.step()
    assert torch.equal(extra.detach(), torch.ones_like(extra)) and extra not in opt.state


# -- integer params ---------------------------------------------------------------------------

INT_CASES = {
    # (ours, torch.optim's, kwargs): Adam's lerp, AdamW's decay and RMSprop's addcmul refuse ints
    "Adam": (adam_triton.Adam, torch.optim.Adam, {}),
    "AdamW": (adam_triton.AdamW, torch.optim.AdamW, {}),
    "RMSprop": (adam_triton.RMSprop, torch.optim.RMSprop, {}),
}


def _int_setup(device, dtype):
    """A float param in a first group, an int param (with an int grad) in a second."""
    f = nn.Parameter(torch.randn(5, generator=torch.Generator().manual_seed(1)).to(device))
    i = torch.arange(6, device=device, dtype=dtype)
    f.grad = torch.ones_like(f)
    i.grad = torch.ones_like(i)
    return f, i


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("name", list(INT_CASES))
def test_integer_params_refused_like_torch(device, name, dtype):
    """torch's default (single-tensor) step raises on an integer param (NotImplementedError
    for Adam's lerp, RuntimeError 'result type Float can't be cast ...' for AdamW/RMSprop).
    Ours raises the same exception with the same message, and nothing changes: the int
    param, the float param of the other group, no state created."""
    ours_cls, torch_cls, kw = INT_CASES[name]
    tf, ti = _int_setup(device, dtype)
    texc = first_error(lambda: torch_cls([{"params": [tf]}, {"params": [ti]}], foreach=False, **kw).step())
    assert texc is not None, "premise: torch refuses integer params"
    f, i = _int_setup(device, dtype)
    f0, i0 = f.detach().clone(), i.clone()
    opt = None

    def make():
        nonlocal opt
        opt = ours_cls([{"params": [f]}, {"params": [i]}], **kw)

    exc = first_error(make, lambda: opt.step())
    assert exc is not None, f"torch raises {type(texc).__name__}: {texc}; ours updated the int param to {i.tolist()}"
    assert type(exc) is type(texc) and str(exc) == str(texc), (repr(exc), repr(texc))
    assert torch.equal(i, i0) and torch.equal(f.detach(), f0)
    if opt is not None:
        assert all(len(opt.state.get(p, {})) == 0 for p in (f, i))


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_integer_params_with_fused_true_get_torchs_fused_error(device, name):
    ours_cls, torch_cls, _ = INT_CASES[name]
    ti = torch.arange(6, device=device)
    ti.grad = torch.ones_like(ti)
    texc = first_error(lambda: torch_cls([ti], fused=True).step())
    assert isinstance(texc, RuntimeError) and str(texc).startswith(FUSED_PREFIX)
    i = torch.arange(6, device=device)
    i.grad = torch.ones_like(i)
    opt = None

    def make():
        nonlocal opt
        opt = ours_cls([i], fused=True)

    exc = first_error(make, lambda: opt.step())
    assert isinstance(exc, RuntimeError), repr(exc)
    assert str(exc).startswith(FUSED_PREFIX) and str(exc).endswith(f"but torch.int64 and {device.type}"), str(exc)
    assert torch.equal(i, torch.arange(6, device=device))
    assert opt is None or len(opt.state.get(i, {})) == 0


# -- meta params ------------------------------------------------------------------------------


def _meta_model():
    with torch.device("meta"):
        return make_model("meta")


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_meta_params_with_fused_true_refused_before_any_state(name):
    """Params (and grads) on meta, fused=True: torch's fused error at step(), and no state
    at all: not a step, not a moment."""
    ours_cls, torch_cls, _ = INT_CASES[name]
    theirs = _meta_model()
    for p in theirs.parameters():
        p.grad = torch.zeros_like(p)
    texc = first_error(torch_cls(theirs.parameters(), fused=True).step)
    assert isinstance(texc, RuntimeError) and str(texc).startswith(FUSED_PREFIX)
    model = _meta_model()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt = ours_cls(model.parameters(), fused=True)
    exc = first_error(opt.step)
    assert isinstance(exc, RuntimeError), repr(exc)
    assert str(exc).startswith(FUSED_PREFIX) and str(exc).endswith("but torch.float32 and meta"), str(exc)
    assert all(len(opt.state.get(p, {})) == 0 for p in model.parameters())


def materialised_meta_model_trains(name, step_on_meta):
    """(Run in a child: stale meta state crashes today's kernels.) A model built on meta;
    its optimizer made there (fused=True), optionally a step attempted on meta (refused);
    then to_empty(device) keeping the Parameter objects, the weights initialised, and four
    steps in lockstep with torch.optim on a twin model built directly on the device."""
    from conftest import DEVICE

    device = torch.device(DEVICE)
    ours_cls, torch_cls, _ = INT_CASES[name]
    kw = dict(lr=1e-2, weight_decay=0.05)
    model = _meta_model()
    opt = ours_cls(model.parameters(), fused=True, **kw)
    if step_on_meta == "True":
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        assert first_error(opt.step) is not None
        model.zero_grad(set_to_none=True)
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        before = list(model.parameters())
        model.to_empty(device=device)
        assert all(p is q for p, q in zip(model.parameters(), before))
        with torch.no_grad():
            for p, q in zip(model.parameters(), make_model(device).parameters()):
                p.copy_(q)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    twin = make_model(device)
    ref = torch_cls(twin.parameters(), foreach=False, **kw)
    ours_params, twin_params = list(model.parameters()), list(twin.parameters())
    assert all(p.device.type == device.type for p in ours_params)
    continue_lockstep(opt, ref, ours_params, twin_params, range(4), twin_params, FP32_TOL)


@pytest.mark.parametrize("step_on_meta", [True, False], ids=["stepped-on-meta", "not-stepped"])
@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_meta_model_materialised_trains_like_torch(name, step_on_meta):
    run_in_child("test_torch_flags", "materialised_meta_model_trains", name, step_on_meta)
