"""Tables that no longer match their tensors must never reach a kernel (issue 13, item 7).

Each case changes something between two steps that makes a param's tensors disagree with
what a kernel would assume (a missing state slot, a buffer of another size or dtype, a
param of another size, a checkpoint of other shapes) and then steps ours and torch.optim
(single-tensor) alike. Where torch raises, ours must raise the same exception type with a
message naming the param and the state key, before anything changes (params and states
as they were). Where torch steps, ours either steps with torch's numbers or raises such a
clear error. Never a crash, never a silent write.

The cases run in a child process, all in one; if that child dies (a segfault or abort),
each case runs in a child of its own, so a crash fails that case only."""

import copy

import pytest
import torch
from torch import nn
from _util import FP32_TOL, first_error, random_grads, run_in_child, set_grads

import adam_triton

ADAM_KEYS = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
RMSPROP_KEYS = ("step", "square_avg", "momentum_buffer", "grad_avg")
SHAPES = [(4, 3), (5,)]


def _classes(name):
    """(ours, torch.optim's, state keys) for the optimizer `name`."""
    ours = getattr(adam_triton, name)
    theirs = getattr(torch.optim, name)
    keys = RMSPROP_KEYS if name == "RMSprop" else ADAM_KEYS
    return ours, theirs, keys


def _params(device, shapes=SHAPES, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=gen).to(device=device, dtype=dtype)) for s in shapes]


def _twins(device, name, shapes=SHAPES, **kw):
    """Twin param lists and optimizers (ours, torch foreach=False) after one step each."""
    ours_cls, torch_cls, keys = _classes(name)
    pa, pb = _params(device, shapes), _params(device, shapes)
    oa, ob = ours_cls(pa, **kw), torch_cls(pb, foreach=False, **kw)
    for ps, o in ((pa, oa), (pb, ob)):
        set_grads(ps, random_grads(ps, 0))
        o.step()
    return (pa, oa), (pb, ob), keys


def _snapshot(opt, params):
    return [(p.detach().clone(), {k: v.clone() for k, v in opt.state.get(p, {}).items()
                                  if torch.is_tensor(v)}) for p in params]


def _assert_unchanged(opt, params, before):
    for i, (p, (p0, s0)) in enumerate(zip(params, before)):
        assert p.shape == p0.shape and torch.equal(p.detach(), p0), f"param {i} changed"
        for k, v in s0.items():
            now = opt.state[p][k]
            assert now.dtype == v.dtype and now.shape == v.shape, f"param {i} state {k} replaced"
            assert torch.equal(now, v), f"param {i} state {k} changed"


def _assert_clear(exc, keys, torch_exc=None):
    """exc names a param and one of `keys`; and is of torch's exception type if given."""
    assert exc is not None
    if torch_exc is not None:
        assert isinstance(exc, type(torch_exc)), (
            f"torch raises {type(torch_exc).__name__}: {torch_exc}; ours {type(exc).__name__}: {exc}")
    message = str(exc)
    assert "param" in message.lower(), f"the error does not say which param: {type(exc).__name__}: {message}"
    assert any(k in message for k in keys), f"the error names none of {keys}: {type(exc).__name__}: {message}"


def _step_like_torch(ours, theirs, keys, mutate):
    """mutate(opt, params) both twins, give both the same grads, step both. Where torch
    raises, ours raises a clear error of torch's type and changes nothing; where torch
    steps, ours steps with torch's numbers (state dtypes included) or raises a clear error
    and changes nothing."""
    (pa, oa), (pb, ob) = ours, theirs
    mutate(oa, pa)
    mutate(ob, pb)
    grads = random_grads(pb, 1)
    set_grads(pa, grads)
    set_grads(pb, grads)
    before = _snapshot(oa, pa)
    torch_exc = first_error(ob.step)
    exc = first_error(oa.step)
    if torch_exc is not None:
        assert exc is not None, f"torch raises {type(torch_exc).__name__}: {torch_exc}; ours stepped"
        _assert_clear(exc, keys, torch_exc)
        _assert_unchanged(oa, pa, before)
        return
    if exc is not None:
        _assert_clear(exc, keys)
        _assert_unchanged(oa, pa, before)
        return
    for i, (p, q) in enumerate(zip(pa, pb)):
        torch.testing.assert_close(p.detach(), q.detach(), **FP32_TOL, msg=lambda m: f"param {i}: {m}")
        for k, v in ob.state[q].items():
            mine = oa.state[p][k]
            if k == "step":
                assert float(mine) == float(v), (i, float(mine), float(v))
                continue
            assert mine.dtype == v.dtype, f"param {i} state {k}: {mine.dtype} (torch keeps {v.dtype})"
            torch.testing.assert_close(mine, v, **FP32_TOL, msg=lambda m: f"param {i} state {k}: {m}")


def _set_group(key, value):
    def mutate(opt, params):
        opt.param_groups[0][key] = value
    return mutate


def _set_state(index, key, make):
    def mutate(opt, params):
        opt.state[params[index]][key] = make(opt.state[params[index]][key])
    return mutate


def _set_data(index, shape):
    def mutate(opt, params):
        params[index].data = torch.randn(shape, generator=torch.Generator().manual_seed(9)).to(params[index].device)
    return mutate


# -- the cases (each run in a child) ---------------------------------------------------------

def amsgrad_on_after_first_step(device):
    """The state has no max_exp_avg_sq: torch raises KeyError('max_exp_avg_sq')."""
    _step_like_torch(*_twins(device, "Adam"), _set_group("amsgrad", True))


def rmsprop_momentum_on_after_first_step(device):
    _step_like_torch(*_twins(device, "RMSprop"), _set_group("momentum", 0.9))


def rmsprop_centered_on_after_first_step(device):
    _step_like_torch(*_twins(device, "RMSprop"), _set_group("centered", True))


def _checkpoint_case(device, name, edit, load_shapes, **kw):
    """A state_dict from a trained optimizer, edited, loaded into a fresh optimizer over
    params of load_shapes, then one step (ours and torch alike). The error may come from
    load_state_dict or from step; either way nothing may change."""
    (pa, oa), (pb, ob), keys = _twins(device, name, **kw)
    sd = copy.deepcopy(ob.state_dict())
    edit(sd)
    ours_cls, torch_cls, _ = _classes(name)
    qa, qb = _params(device, load_shapes, seed=4), _params(device, load_shapes, seed=4)
    na, nb = ours_cls(qa, **kw), torch_cls(qb, foreach=False, **kw)
    grads = random_grads(qb, 1)
    set_grads(qa, grads)
    set_grads(qb, grads)
    torch_exc = first_error(lambda: nb.load_state_dict(copy.deepcopy(sd)), nb.step)
    assert torch_exc is not None, "premise: torch refuses this checkpoint"
    before = [p.detach().clone() for p in qa]
    exc = first_error(lambda: na.load_state_dict(copy.deepcopy(sd)), na.step)
    assert exc is not None, f"torch raises {type(torch_exc).__name__}: {torch_exc}; ours stepped"
    _assert_clear(exc, keys, torch_exc)
    for i, (p, p0) in enumerate(zip(qa, before)):
        assert torch.equal(p.detach(), p0), f"param {i} changed"


def checkpoint_missing_exp_avg_sq(device):
    def edit(sd):
        del sd["state"][1]["exp_avg_sq"]
    _checkpoint_case(device, "Adam", edit, SHAPES)


def checkpoint_missing_square_avg(device):
    def edit(sd):
        del sd["state"][0]["square_avg"]
    _checkpoint_case(device, "RMSprop", edit, SHAPES, momentum=0.9)


def checkpoint_of_smaller_params(device):
    """Saved from params of 12 and 5 elements, loaded for params of 30 and 8 (same count)."""
    _checkpoint_case(device, "Adam", lambda sd: None, [(5, 6), (8,)])


def checkpoint_of_larger_params(device):
    _checkpoint_case(device, "Adam", lambda sd: None, [(2, 3), (3,)])


def param_data_replaced_by_larger(device):
    _step_like_torch(*_twins(device, "Adam"), _set_data(1, (40,)))


def param_data_replaced_by_smaller(device):
    _step_like_torch(*_twins(device, "Adam"), _set_data(0, (2, 3)))


def rmsprop_param_data_replaced_by_larger(device):
    _step_like_torch(*_twins(device, "RMSprop", momentum=0.9, centered=True), _set_data(0, (9, 9)))


def state_replaced_by_smaller(device):
    _step_like_torch(*_twins(device, "Adam"), _set_state(0, "exp_avg_sq", lambda t: torch.zeros(2, device=t.device)))


def rmsprop_state_replaced_by_smaller(device):
    _step_like_torch(*_twins(device, "RMSprop", momentum=0.9),
                     _set_state(1, "momentum_buffer", lambda t: torch.zeros(1, device=t.device)))


def state_replaced_by_bf16(device):
    """A bf16 exp_avg for an fp32 param (torch: RuntimeError, lerp of mixed dtypes)."""
    _step_like_torch(*_twins(device, "Adam"), _set_state(0, "exp_avg", lambda t: t.to(torch.bfloat16)))


def state_replaced_by_fp64(device):
    """An fp64 exp_avg_sq for an fp32 param: torch steps (the state stays fp64)."""
    _step_like_torch(*_twins(device, "Adam", amsgrad=True), _set_state(0, "exp_avg_sq", lambda t: t.double()))


def step_replaced_by_int_tensor(device):
    """step as an int64 tensor: torch's single-tensor Adam steps (and keeps it int64)."""
    _step_like_torch(*_twins(device, "Adam"), _set_state(1, "step", lambda t: t.to(torch.int64)))


def master_replaced_by_smaller(device):
    """Our own slot: an fp32 master of the wrong size must be refused, naming master_param."""
    ps = _params(device, dtype=torch.bfloat16)
    opt = adam_triton.Adam(ps, lr=1e-2, state_dtype=torch.float32, master_weights=True)
    set_grads(ps, random_grads(ps, 0))
    opt.step()
    opt.state[ps[0]]["master_param"] = torch.zeros(3, device=device)
    set_grads(ps, random_grads(ps, 1))
    before = _snapshot(opt, ps)
    exc = first_error(opt.step)
    _assert_clear(exc, ("master_param",))
    _assert_unchanged(opt, ps, before)


CASES = [
    amsgrad_on_after_first_step,
    rmsprop_momentum_on_after_first_step,
    rmsprop_centered_on_after_first_step,
    checkpoint_missing_exp_avg_sq,
    checkpoint_missing_square_avg,
    checkpoint_of_smaller_params,
    checkpoint_of_larger_params,
    param_data_replaced_by_larger,
    param_data_replaced_by_smaller,
    rmsprop_param_data_replaced_by_larger,
    state_replaced_by_smaller,
    rmsprop_state_replaced_by_smaller,
    state_replaced_by_bf16,
    state_replaced_by_fp64,
    step_replaced_by_int_tensor,
    master_replaced_by_smaller,
]


NAMES = [c.__name__ for c in CASES]
OUTCOME = "case outcome: "


def run_case(name):
    """Entry point in the child process: one case."""
    from conftest import DEVICE

    {c.__name__: c for c in CASES}[name](torch.device(DEVICE))


def run_cases(*names):
    """Entry point in the child process: the cases in turn, each one's outcome printed as a
    line (its traceback, or null when it passed)."""
    import json
    import traceback

    for name in names:
        try:
            run_case(name)
            error = None
        except Exception:  # noqa: BLE001 - a failing case is reported, the others still run
            error = traceback.format_exc()
        print(OUTCOME + json.dumps([name, error]), flush=True)


@pytest.fixture(scope="module")
def outcomes():
    """{case: traceback or None} from one child process that runs every case (one start-up
    instead of one per case); None when that child dies (a crash): then each case runs in a
    child of its own, so a segfault or abort fails only its own case."""
    import json

    try:
        out = run_in_child("test_memory_safety", "run_cases", *NAMES)
    except AssertionError:
        return None
    found = dict(json.loads(line[len(OUTCOME):]) for line in out.splitlines() if line.startswith(OUTCOME))
    return found if set(found) == set(NAMES) else None


@pytest.mark.parametrize("name", NAMES)
def test_memory_safety(name, outcomes):
    if outcomes is None:
        run_in_child("test_memory_safety", "run_case", name)
    else:
        assert outcomes[name] is None, outcomes[name]
