"""copy.deepcopy and pickling (torch.save of the optimizer object) keep the options that
are ours, not torch's: max_grad_norm, state_dtype, master_weights, stochastic_rounding,
seed and last_grad_norm. A copied or unpickled optimizer then steps exactly as the
original would have.

torch's Optimizer.__getstate__ keeps only defaults, state and param_groups; an optimizer
that keeps options as plain attributes loses them on a round trip (issue 13, item 1)."""

import copy
import io

import pytest
import torch
from torch import nn
from _util import random_grads, set_grads

import adam_triton

F32, BF16 = torch.float32, torch.bfloat16

# two option sets: master weights and stochastic rounding are alternatives
OPTIONS = {
    "master": dict(max_grad_norm=0.5, state_dtype=F32, master_weights=True, seed=0),
    "stochastic": dict(max_grad_norm=0.3, state_dtype=F32, stochastic_rounding=True, seed=11),
}
CLASSES = {
    "Adam": lambda ps, **o: adam_triton.Adam(ps, lr=1e-2, amsgrad=True, **o),
    "AdamW": lambda ps, **o: adam_triton.AdamW(ps, lr=1e-2, weight_decay=0.1, **o),
    "RMSprop": lambda ps, **o: adam_triton.RMSprop(ps, lr=1e-2, momentum=0.9, centered=True, **o),
}
OUR_ATTRS = ("max_grad_norm", "state_dtype", "master_weights", "stochastic_rounding", "seed")


def _params(device):
    """bf16 params (the modes act on them), one fp32 param; the last bf16 param gets its
    first grad only after the copy (its state is created by the copy: state_dtype counts)."""
    gen = torch.Generator().manual_seed(3)
    shapes = [(9, 7), (7,), (5, 3)]
    ps = [nn.Parameter(torch.randn(s, generator=gen).to(device=device, dtype=BF16)) for s in shapes]
    ps.append(nn.Parameter(torch.randn(6, generator=gen).to(device)))
    return ps


LATE = 2  # index of the param whose first grad comes after the copy


def _grads(params, s):
    # scale 4: the global norm is far above max_grad_norm, so clipping is active
    return random_grads(params, s, scale=4.0, skip=(LATE,) if s < 2 else ())


def _public(opt):
    return {k for k in vars(opt) if not k.startswith("_")}


def _pickled(opt):
    buf = io.BytesIO()
    torch.save(opt, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


ROUND_TRIPS = {"deepcopy": copy.deepcopy, "pickle": _pickled}


def _params_of(opt):
    return [p for g in opt.param_groups for p in g["params"]]


@pytest.mark.parametrize("trip", list(ROUND_TRIPS))
@pytest.mark.parametrize("options", list(OPTIONS))
@pytest.mark.parametrize("name", list(CLASSES))
def test_round_trip_keeps_our_options(device, name, options, trip):
    """Every public attribute survives (torch's test_deepcopy_copies_all_public_attrs), with
    its value; last_grad_norm too (the pre-clip norm of the last step)."""
    params = _params(device)
    opt = CLASSES[name](params, **OPTIONS[options])
    for s in range(2):
        set_grads(params, _grads(params, s))
        opt.step()
    assert opt.last_grad_norm is not None and float(opt.last_grad_norm) > OPTIONS[options]["max_grad_norm"]
    twin = ROUND_TRIPS[trip](opt)
    assert _public(twin) == _public(opt)
    for attr in OUR_ATTRS:
        assert getattr(twin, attr) == getattr(opt, attr), attr
    assert torch.is_tensor(twin.last_grad_norm)
    assert torch.equal(twin.last_grad_norm.cpu(), opt.last_grad_norm.cpu())


@pytest.mark.parametrize("trip", list(ROUND_TRIPS))
@pytest.mark.parametrize("options", list(OPTIONS))
@pytest.mark.parametrize("name", list(CLASSES))
def test_round_trip_steps_identically(device, name, options, trip):
    """Two identical optimizers step twice; one is deep-copied (or pickled). The copy and
    the other original then take three more steps on the same grads and stay bit-identical:
    params, every state tensor, last_grad_norm. A copy that lost max_grad_norm would not
    clip, one that lost master_weights would drop the fp32 masters, one that lost the seed
    would round differently, one that lost state_dtype would give the late param bf16 states."""
    make = CLASSES[name]
    pa, pb = _params(device), _params(device)
    oa, ob = make(pa, **OPTIONS[options]), make(pb, **OPTIONS[options])
    for s in range(2):
        for ps, o in ((pa, oa), (pb, ob)):
            set_grads(ps, _grads(ps, s))
            o.step()
    oc = ROUND_TRIPS[trip](ob)
    pc = _params_of(oc)
    assert len(pc) == len(pa) and all(p is not q for p, q in zip(pc, pb))
    for s in range(2, 5):
        for ps, o in ((pa, oa), (pc, oc)):
            set_grads(ps, _grads(ps, s))
            o.step()
        assert torch.equal(oc.last_grad_norm.cpu(), oa.last_grad_norm.cpu()), f"step {s}: last_grad_norm"
        for i, (p, q) in enumerate(zip(pc, pa)):
            assert p.dtype == q.dtype
            assert torch.equal(p.detach(), q.detach()), f"step {s}: param {i}"
            sc, sa = oc.state[p], oa.state[q]
            assert set(sc) == set(sa), (i, sorted(sc), sorted(sa))
            for key in sa:
                assert sc[key].dtype == sa[key].dtype, (i, key)
                assert torch.equal(sc[key], sa[key]), f"step {s}: param {i} state {key}"
    late = oa.state[pa[LATE]]
    assert late["exp_avg" if name != "RMSprop" else "square_avg"].dtype == F32
