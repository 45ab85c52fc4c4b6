"""Checkpoints: state dicts move between torch.optim.Adam and adam_triton.Adam in both
directions and training continues in lockstep; a torch.save / torch.load(weights_only=True)
round trip resumes bit-identically."""

import copy
import io

import pytest
import torch
from _util import (
    Lockstep,
    assert_state_matches,
    clone_params,
    continue_lockstep,
    make_model,
    random_grads,
    set_grads,
    torch_adam,
)

import adam_triton


def _groups(params, **kw):
    return [{"params": params[:3]}, {"params": params[3:], "lr": 2e-2, "betas": (0.8, 0.99)}]


def _kw(amsgrad):
    return dict(lr=1e-2, amsgrad=amsgrad, weight_decay=0.05)


def _train(opt, params, first_step, n_steps):
    for s in range(first_step, first_step + n_steps):
        set_grads(params, random_grads(params, s))
        opt.step()


def _copied(state_dict):
    """A deep copy, as a checkpoint would be: torch's loader keeps the tensors it is given
    (state_dict() returns the live state), so two optimizers would otherwise share state."""
    return copy.deepcopy(state_dict)


def _expected_keys(amsgrad):
    return {"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if amsgrad else set())


@pytest.mark.parametrize("amsgrad", [False, True])
def test_state_dict_keys_match_torch(device, amsgrad):
    params = list(make_model(device).parameters())
    run = Lockstep(params, lambda ps: adam_triton.Adam(_groups(ps), **_kw(amsgrad)),
                   lambda ps: torch_adam(_groups(ps), **_kw(amsgrad)))
    run.run(2)
    sa, sb = run.ours.state_dict(), run.torch.state_dict()
    assert set(sa) == set(sb) == {"state", "param_groups"}
    assert sorted(sa["state"]) == sorted(sb["state"]) == list(range(len(params)))
    for i, st in sa["state"].items():
        assert set(st) == set(sb["state"][i]) == _expected_keys(amsgrad)
        assert torch.is_tensor(st["step"]) and st["step"].dtype == torch.float32 and st["step"].dim() == 0
        assert float(st["step"]) == 2.0
        for k in _expected_keys(amsgrad) - {"step"}:
            assert st[k].shape == params[i].shape and st[k].dtype == params[i].dtype
    for ga, gb in zip(sa["param_groups"], sb["param_groups"]):
        assert ga["params"] == gb["params"]
        # every torch hyperparameter is there with torch's value
        for k, v in gb.items():
            assert k in ga, f"param group lacks torch's key {k!r}"
            if k not in ("foreach", "fused"):
                assert ga[k] == v, f"{k}: {ga[k]} != {v}"


@pytest.mark.parametrize("amsgrad", [False, True])
def test_torch_state_dict_loads_into_ours(device, amsgrad):
    params = list(make_model(device).parameters())
    theirs = clone_params(params)
    tb = torch_adam(_groups(theirs), **_kw(amsgrad))
    _train(tb, theirs, 0, 3)
    # ours starts from torch's params and state
    ours = clone_params(theirs)
    oa = adam_triton.Adam(_groups(ours), **_kw(amsgrad))
    oa.load_state_dict(_copied(tb.state_dict()))
    for p in ours:
        step = oa.state[p]["step"]
        assert step.dtype == torch.float32 and step.dim() == 0 and step.device == p.device
        assert set(oa.state[p]) == _expected_keys(amsgrad)
    assert_state_matches(oa, tb, ours, theirs, exact=True)
    continue_lockstep(oa, tb, ours, theirs, range(3, 8), grads_from=params)
    assert float(oa.state[ours[0]]["step"]) == 8


@pytest.mark.parametrize("amsgrad", [False, True])
def test_our_state_dict_loads_into_torch(device, amsgrad):
    params = list(make_model(device).parameters())
    ours = clone_params(params)
    oa = adam_triton.Adam(_groups(ours), **_kw(amsgrad))
    _train(oa, ours, 0, 3)
    theirs = clone_params(ours)
    tb = torch_adam(_groups(theirs), **_kw(amsgrad))
    tb.load_state_dict(_copied(oa.state_dict()))
    assert_state_matches(oa, tb, ours, theirs, exact=True)
    continue_lockstep(oa, tb, ours, theirs, range(3, 8), grads_from=params)
    assert float(tb.state[theirs[0]]["step"]) == 8


def test_load_into_optimizer_that_already_stepped(device):
    """Loading replaces the state tensors: the kernel must use the new ones (no stale
    pointer tables from the steps before the load)."""
    params = list(make_model(device).parameters())
    theirs = clone_params(params)
    tb = torch_adam(_groups(theirs), **_kw(True))
    _train(tb, theirs, 100, 4)  # different grads, a different step count
    ours = clone_params(params)
    oa = adam_triton.Adam(_groups(ours), **_kw(True))
    _train(oa, ours, 0, 2)
    with torch.no_grad():
        for p, q in zip(ours, theirs):
            p.copy_(q)
    oa.load_state_dict(_copied(tb.state_dict()))
    for s in range(200, 204):
        grads = random_grads(params, s)
        set_grads(ours, grads)
        set_grads(theirs, grads)
        oa.step()
        tb.step()
        assert_state_matches(oa, tb, ours, theirs)
    assert float(oa.state[ours[0]]["step"]) == 8


def _fresh(device, amsgrad):
    model = make_model(device)
    params = list(model.parameters())
    return model, params, adam_triton.Adam(_groups(params), **_kw(amsgrad))


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("medium", ["bytesio", "file"])
def test_checkpoint_resume_is_bit_identical(device, tmp_path, amsgrad, medium):
    # uninterrupted run
    _, params_a, opt_a = _fresh(device, amsgrad)
    _train(opt_a, params_a, 0, 6)
    # interrupted run: 3 steps, checkpoint, a fresh model and optimizer, 3 more steps
    model_b, params_b, opt_b = _fresh(device, amsgrad)
    _train(opt_b, params_b, 0, 3)
    ckpt = {"model": model_b.state_dict(), "optim": opt_b.state_dict()}
    if medium == "bytesio":
        buf = io.BytesIO()
        torch.save(ckpt, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=True)
    else:
        torch.save(ckpt, tmp_path / "ckpt.pt")
        loaded = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    del model_b, params_b, opt_b
    model_c, params_c, opt_c = _fresh(device, amsgrad)
    # the fresh model starts elsewhere: the load must bring everything back
    with torch.no_grad():
        for p in params_c:
            p.add_(1.0)
    model_c.load_state_dict(loaded["model"])
    opt_c.load_state_dict(loaded["optim"])
    _train(opt_c, params_c, 3, 3)
    assert_state_matches(opt_c, opt_a, params_c, params_a, exact=True)
    assert float(opt_c.state[params_c[0]]["step"]) == 6
    # and the run really trained (the comparison is not between untouched params)
    assert not torch.equal(params_a[0], make_model(device).fc1.weight)


def test_old_checkpoint_with_number_step_loads(device):
    """Checkpoints from torch < 1.12 hold `step` as a Python number; torch.optim.Adam's
    loader turns it into a float32 tensor and trains on. So must ours."""
    params = list(make_model(device).parameters())
    theirs = clone_params(params)
    tb = torch_adam(theirs, **_kw(True))
    _train(tb, theirs, 0, 2)
    old = _copied(tb.state_dict())
    for st in old["state"].values():
        st["step"] = int(st["step"])  # the old format
    tb.load_state_dict(_copied(old))
    assert torch.is_tensor(tb.state[theirs[0]]["step"])
    ours = clone_params(theirs)
    oa = adam_triton.Adam(ours, **_kw(True))
    oa.load_state_dict(_copied(old))
    for p in ours:
        step = oa.state[p]["step"]
        assert torch.is_tensor(step) and step.dtype == torch.float32 and step.device == p.device
        assert float(step) == 2
    for s in range(2, 5):
        grads = random_grads(params, s)
        set_grads(ours, grads)
        set_grads(theirs, grads)
        oa.step()
        tb.step()
        assert_state_matches(oa, tb, ours, theirs)


def test_params_and_states_moved_between_steps(device):
    """Params and states reallocated between steps (p.data = ..., state tensors replaced,
    as .to() or resharding do): the cached pointer tables must follow."""
    params = list(make_model(device).parameters())
    run = Lockstep(params, lambda ps: adam_triton.Adam(ps, **_kw(True)), lambda ps: torch_adam(ps, **_kw(True)))
    run.run(2)
    keep = []
    for s in range(3):
        for p in run.params_ours:
            old = p.data
            keep.append(old)  # keep the old buffers alive so their addresses are not reused
            p.data = old.clone()
            st = run.ours.state[p]
            for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                keep.append(st[k])
                st[k] = st[k].clone()
        snapshot = [t.clone() for t in keep]
        run.step()
        # nothing was written into the old buffers
        assert all(torch.equal(a, b) for a, b in zip(keep, snapshot))
