"""adam_triton.RMSprop against torch.optim.RMSprop (foreach=False) and the float64
reference: lockstep parity for every option, state keys, state_dict interop and checkpoint
resume, torch's errors, odd sizes, many tensors, and bf16/fp16 params."""

import copy
import re

import pytest
import torch
from _util import (
    FP32_TOL,
    SmallModel,
    assert_state_matches,
    clone_params,
    continue_lockstep,
    make_model,
    random_grads,
    set_grads,
)

import adam_triton

N_STEPS = 8


def torch_rmsprop(params, **kw):
    """torch.optim.RMSprop's single-tensor implementation (the reference we match)."""
    return torch.optim.RMSprop(params, foreach=False, **kw)


def fp64_copies(params):
    """Leaf float64 copies of params (the high-precision reference's parameters)."""
    return [torch.nn.Parameter(p.detach().to(torch.float64).clone()) for p in params]


def max_err(x, ref):
    """max |x - ref| computed in float64 (0 for empty tensors)."""
    if x.numel() == 0:
        return 0.0
    return float((x.detach().to(torch.float64) - ref.detach().to(ref.device)).abs().max())


class ThreeWay:
    """adam_triton, torch.optim (same dtype) and torch.optim on float64 copies, stepped on
    identical gradients (the float64 run gets the same-dtype grads upcast exactly)."""

    def __init__(self, params, ours_cls=adam_triton.RMSprop, torch_cls=torch_rmsprop, **kw):
        self.p_ours = clone_params(params)
        self.p_torch = clone_params(params)
        self.p_ref = fp64_copies(params)
        self.ours = ours_cls(self.p_ours, **kw)
        self.torch = torch_cls(self.p_torch, **kw)
        self.ref = torch_cls(self.p_ref, **kw)
        self.steps = 0

    def step(self, scale=1.0):
        grads = random_grads(self.p_ours, self.steps, scale=scale)
        set_grads(self.p_ours, grads)
        set_grads(self.p_torch, grads)
        set_grads(self.p_ref, [g.to(torch.float64) for g in grads])
        self.ours.step()
        self.torch.step()
        self.ref.step()
        self.steps += 1

    def check_no_worse_than_torch(self, factor=2.0, atol=1e-6):
        """For params and every state tensor: max|ours - ref64| <= factor * max|torch - ref64| + atol,
        with identical state keys and steps."""
        for i, (a, b, r) in enumerate(zip(self.p_ours, self.p_torch, self.p_ref)):
            pairs = [("param", a, b, r)]
            sa, sb, sr = self.ours.state[a], self.torch.state[b], self.ref.state[r]
            assert set(sa) == set(sb) == set(sr), f"param {i}: keys {sorted(sa)} vs {sorted(sb)}"
            assert sa["step"].dtype == torch.float32 and sa["step"].dim() == 0
            assert float(sa["step"]) == float(sb["step"]) == self.steps
            pairs += [(k, sa[k], sb[k], sr[k]) for k in sb if k != "step"]
            for name, x, y, ref in pairs:
                assert x.dtype == y.dtype, f"param {i} {name}: dtype {x.dtype} != {y.dtype}"
                ours_err, torch_err = max_err(x, ref), max_err(y, ref)
                assert ours_err <= factor * torch_err + atol, (
                    f"step {self.steps} param {i} {name}: |ours - ref64| = {ours_err:.3g} > "
                    f"{factor} * |torch - ref64| ({torch_err:.3g}) + {atol}"
                )


    def check_aggregate_no_worse_than_torch(self, factor=2.0, atol=0.0):
        """As check_no_worse_than_torch, but each error is the max over the whole model (per
        param / state kind): low-precision rounding of a single small tensor is too noisy for
        a per-tensor ratio."""
        kinds = ["param"] + [k for k in self.torch.state[self.p_torch[0]] if k != "step"]
        for kind in kinds:
            def tensors(opt, params):
                return [p.detach() if kind == "param" else opt.state[p][kind] for p in params]

            triples = zip(tensors(self.ours, self.p_ours), tensors(self.torch, self.p_torch),
                          tensors(self.ref, self.p_ref))
            errs = [(max_err(x, r), max_err(y, r)) for x, y, r in triples]
            ours_err, torch_err = max(e[0] for e in errs), max(e[1] for e in errs)
            assert ours_err <= factor * torch_err + atol, (
                f"step {self.steps} {kind}: |ours - ref64| = {ours_err:.3g} > "
                f"{factor} * |torch - ref64| ({torch_err:.3g}) + {atol}"
            )
        for a, b in zip(self.p_ours, self.p_torch):
            assert float(self.ours.state[a]["step"]) == float(self.torch.state[b]["step"]) == self.steps


def lockstep(device, kw, n_steps=N_STEPS, params=None, tol=FP32_TOL):
    """Step adam_triton.RMSprop and torch.optim.RMSprop on identical grads, comparing every
    param and state tensor after each step. Returns (ours, theirs, params_ours, params_torch)."""
    params = params if params is not None else list(make_model(device).parameters())
    pa, pb = clone_params(params), clone_params(params)
    ours, theirs = adam_triton.RMSprop(pa, **kw), torch_rmsprop(pb, **kw)
    for s in range(n_steps):
        grads = random_grads(pa, s)
        set_grads(pa, grads)
        set_grads(pb, grads)
        ours.step()
        theirs.step()
        assert_state_matches(ours, theirs, pa, pb, tol)
        # every param really took the step (an empty state on both sides would also "match")
        assert all(float(ours.state[p]["step"]) == s + 1 for p in pa)
    return ours, theirs, pa, pb


EXACT_VARIANTS = {
    "default": {},
    "lr1e-3": dict(lr=1e-3),
    "wd0.1": dict(weight_decay=0.1),
    "centered": dict(centered=True),
    "momentum-maximize": dict(momentum=0.9, maximize=True),
    "alpha0.9-eps1e-3": dict(alpha=0.9, eps=1e-3),
}


@pytest.mark.parametrize("kw", EXACT_VARIANTS.values(), ids=EXACT_VARIANTS.keys())
def test_lockstep_parity(device, kw):
    params = list(make_model(device).parameters())
    ours, _, pa, _ = lockstep(device, kw, params=params)
    # the comparison is between two real updates, not two no-ops
    assert (pa[0] - params[0]).abs().max() > 1e-3


ILL_CONDITIONED = {
    "centered-momentum": dict(centered=True, momentum=0.9),
    "all-options": dict(lr=3e-3, alpha=0.9, eps=1e-6, weight_decay=0.05, momentum=0.8,
                        centered=True, maximize=True),
}


@pytest.mark.parametrize("kw", ILL_CONDITIONED.values(), ids=ILL_CONDITIONED.keys())
def test_lockstep_no_worse_than_torch(device, kw):
    """The momentum buffer of centered RMSprop suffers cancellation and torch's CPU kernels
    use FMA: judge against float64, allowing twice torch's own fp32 error."""
    params = list(make_model(device).parameters())
    run = ThreeWay(params, **kw)
    for _ in range(N_STEPS):
        run.step()
        run.check_no_worse_than_torch()
    assert (run.p_ours[0] - params[0]).abs().max() > 1e-3


def test_float64_reference_matches_torch(device):
    """adam_triton.reference.rmsprop_step (the spec the kernels follow) equals torch in float64."""
    kw = dict(lr=3e-3, alpha=0.9, eps=1e-6, weight_decay=0.05, momentum=0.8, centered=True, maximize=True)
    params = fp64_copies(make_model(device).parameters())
    theirs = torch_rmsprop(params, **kw)
    ref = [p.detach().clone() for p in params]
    sq = [torch.zeros_like(p) for p in ref]
    buf = [torch.zeros_like(p) for p in ref]
    ga = [torch.zeros_like(p) for p in ref]
    steps = [torch.zeros((), dtype=torch.float32, device=device) for _ in ref]
    for s in range(N_STEPS):
        grads = random_grads(params, s)
        set_grads(params, grads)
        theirs.step()
        adam_triton.reference.rmsprop_step(ref, grads, sq, buf, ga, steps, **kw)
        for p, r, a, b, g, st in zip(params, ref, sq, buf, ga, steps):
            state = theirs.state[p]
            torch.testing.assert_close(r, p.detach(), rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(a, state["square_avg"], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(b, state["momentum_buffer"], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(g, state["grad_avg"], rtol=1e-12, atol=1e-12)
            assert float(st) == float(state["step"]) == s + 1


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("centered", [False, True])
def test_state_keys_and_step(device, momentum, centered):
    kw = dict(momentum=momentum, centered=centered)
    ours, theirs, pa, pb = lockstep(device, kw, n_steps=3)
    expected = {"step", "square_avg"} | ({"momentum_buffer"} if momentum > 0 else set())
    expected |= {"grad_avg"} if centered else set()
    for a, b in zip(pa, pb):
        assert set(ours.state[a]) == set(theirs.state[b]) == expected
        step = ours.state[a]["step"]
        assert torch.is_tensor(step) and step.dim() == 0 and step.dtype == torch.float32
        assert step.device == a.device
        assert float(step) == float(theirs.state[b]["step"]) == 3.0
        for key in expected - {"step"}:
            assert ours.state[a][key].shape == a.shape and ours.state[a][key].dtype == a.dtype


INTEROP_KW = dict(lr=5e-3, momentum=0.9, centered=True, weight_decay=0.01)


def _continue_lockstep(ours, theirs, pa, pb, first_step, n_steps):
    # three-way criterion is not needed here: only 7 steps, modest cancellation
    continue_lockstep(ours, theirs, pa, pb, range(first_step, first_step + n_steps), grads_from=pa,
                      tol=dict(rtol=1e-4, atol=1e-5))


@pytest.mark.parametrize("direction", ["torch_to_ours", "ours_to_torch"])
def test_state_dict_interop(device, direction):
    """A state_dict saved by one implementation loads into the other; both then continue
    in lockstep with an uninterrupted twin of the saving side."""
    params = list(make_model(device).parameters())
    src_cls, dst_cls = ((torch_rmsprop, adam_triton.RMSprop) if direction == "torch_to_ours"
                        else (adam_triton.RMSprop, torch_rmsprop))
    p_src = clone_params(params)
    src = src_cls(p_src, **INTEROP_KW)
    for s in range(3):
        set_grads(p_src, random_grads(p_src, s))
        src.step()
    p_dst = clone_params(p_src)
    dst = dst_cls(p_dst, **INTEROP_KW)
    # deep copy, as a checkpoint would be: torch's loader aliases same-device tensors
    dst.load_state_dict(copy.deepcopy(src.state_dict()))
    for a, b in zip(p_dst, p_src):
        assert float(dst.state[a]["step"]) == float(src.state[b]["step"]) == 3.0
        for key in ("square_avg", "momentum_buffer", "grad_avg"):
            assert torch.equal(dst.state[a][key], src.state[b][key])
    if direction == "torch_to_ours":
        _continue_lockstep(dst, src, p_dst, p_src, 3, 4)
    else:
        _continue_lockstep(src, dst, p_src, p_dst, 3, 4)


def test_checkpoint_resume_bit_identical(device, tmp_path):
    kw = dict(lr=5e-3, alpha=0.95, momentum=0.9, centered=True, weight_decay=0.01)
    params = list(make_model(device).parameters())
    # uninterrupted run
    p_full = clone_params(params)
    full = adam_triton.RMSprop(p_full, **kw)
    # interrupted run: 3 steps, save, fresh objects, load, 5 more steps
    p_a = clone_params(params)
    a = adam_triton.RMSprop(p_a, **kw)
    for s in range(3):
        grads = random_grads(params, s)
        set_grads(p_full, grads)
        set_grads(p_a, grads)
        full.step()
        a.step()
    path = tmp_path / "ckpt.pt"
    torch.save({"params": [p.detach() for p in p_a], "opt": a.state_dict()}, path)
    ckpt = torch.load(path, weights_only=True)
    p_b = [torch.nn.Parameter(t.clone().to(device)) for t in ckpt["params"]]
    b = adam_triton.RMSprop(p_b, **kw)
    b.load_state_dict(ckpt["opt"])
    continue_lockstep(b, full, p_b, p_full, range(3, 8), grads_from=params, exact=True)
    assert float(b.state[p_b[0]]["step"]) == 8.0


BAD_VALUES = [("lr", -1.0), ("alpha", -0.5), ("eps", -1e-8), ("momentum", -0.1), ("weight_decay", -1.0)]


@pytest.mark.parametrize("name,value", BAD_VALUES, ids=[n for n, _ in BAD_VALUES])
def test_invalid_hyperparameters_match_torch(device, name, value):
    p = [torch.nn.Parameter(torch.zeros(3, device=device))]
    with pytest.raises(ValueError) as theirs:
        torch.optim.RMSprop(p, **{name: value})
    message = str(theirs.value)
    assert str(value) in message
    with pytest.raises(ValueError, match=re.escape(message)):
        adam_triton.RMSprop(p, **{name: value})


@pytest.mark.parametrize("after_a_step", [False, True])
def test_sparse_grad_raises_and_changes_nothing(device, after_a_step):
    dense = torch.nn.Parameter(torch.randn(4, 3, device=device))
    emb = torch.nn.Parameter(torch.randn(6, 2, device=device))
    opt = adam_triton.RMSprop([dense, emb], momentum=0.9, centered=True)
    if after_a_step:
        dense.grad = torch.randn(4, 3, device=device)
        emb.grad = torch.randn(6, 2, device=device)
        opt.step()
    before = [dense.detach().clone(), emb.detach().clone()]
    state_before = {k: v.clone() for k, v in opt.state[dense].items()}
    dense.grad = torch.randn(4, 3, device=device)
    emb.grad = torch.sparse_coo_tensor(
        torch.tensor([[1, 4]], device=device), torch.ones(2, 2, device=device), (6, 2),
        check_invariants=True,
    )
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert torch.equal(dense.detach(), before[0]) and torch.equal(emb.detach(), before[1])
    assert set(opt.state[dense]) == set(state_before)
    for k, v in state_before.items():
        assert torch.equal(opt.state[dense][k], v), k
    assert float(opt.state[dense].get("step", torch.tensor(0.0))) == float(after_a_step)


ODD_SIZES = [0, 1, 3, 17, 1023, 1025, 4097, 65537]
ODD_KW = {"momentum-wd": dict(momentum=0.9, weight_decay=0.1), "centered": dict(centered=True, lr=1e-3)}


@pytest.mark.parametrize("kw", ODD_KW.values(), ids=ODD_KW.keys())
@pytest.mark.parametrize("n", ODD_SIZES)
def test_odd_sizes(device, n, kw):
    torch.manual_seed(n)
    params = [torch.nn.Parameter(torch.randn(n).to(device))]
    ours, _, pa, _ = lockstep(device, kw, n_steps=2, params=params)
    assert float(ours.state[pa[0]]["step"]) == 2.0


def test_all_odd_sizes_in_one_bucket(device):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n).to(device)) for n in ODD_SIZES]
    params.append(torch.nn.Parameter(torch.randn(33, 31).to(device)))
    lockstep(device, dict(momentum=0.5, centered=True, weight_decay=0.01), n_steps=2, params=params)


def test_many_tensors(device):
    gen = torch.Generator().manual_seed(7)
    sizes = torch.randint(1, 300, (130,), generator=gen).tolist()
    params = [torch.nn.Parameter(torch.randn(n, generator=gen).to(device)) for n in sizes]
    params += [torch.nn.Parameter(torch.randn((), generator=gen).to(device)) for _ in range(5)]
    lockstep(device, dict(lr=1e-3, momentum=0.9, weight_decay=0.01), n_steps=2, params=params)


LOW_PRECISION = {torch.bfloat16: 1e-3, torch.float16: 1e-4}
LP_KW = {"plain": {}, "momentum-wd": dict(momentum=0.9, weight_decay=0.01),
         "centered-momentum": dict(centered=True, momentum=0.9)}


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=["bf16", "fp16"])
@pytest.mark.parametrize("kw", LP_KW.values(), ids=LP_KW.keys())
def test_low_precision_no_worse_than_torch(device, dtype, kw):
    """bf16/fp16 params (and states, as torch): the largest error against a float64 run,
    over the whole model, at most twice torch's same-dtype error (+ atol) at every step."""
    torch.manual_seed(0)
    params = list(SmallModel(32, 64, 16).to(device=device, dtype=dtype).parameters())
    run = ThreeWay(params, lr=1e-3, **kw)
    for _ in range(N_STEPS):
        run.step()
        run.check_aggregate_no_worse_than_torch(atol=LOW_PRECISION[dtype])
    assert run.ours.state[run.p_ours[0]]["square_avg"].dtype == dtype
    assert (run.p_ours[1].float() - params[1].float()).abs().max() > 1e-2
