"""Tensor sizes, layouts and dtypes: many odd-sized tensors in one launch, non-contiguous and
empty params, complex and float64 params (against torch.optim), and bf16/fp16 storage
(against a float64 reference, no worse than twice torch's own error; bf16 rounded to nearest
even like torch)."""

import pytest
import torch
from torch import nn
from _util import FP32_TOL, Lockstep, assert_state_matches, clone_params, random_grads, set_grads, torch_adam

import adam_triton
from adam_triton import reference

ODD_SIZES = [0, 1, 3, 17, 1023, 1025, 4097]


def _odd_params(device):
    """105 tensors cycling through ODD_SIZES (some 2-d), plus one 65537 and one 131071."""
    gen = torch.Generator().manual_seed(0)
    shapes = []
    for rep in range(15):
        for n in ODD_SIZES:
            if n == 1023 and rep % 3 == 0:
                shapes.append((31, 33))
            elif n == 17 and rep % 2 == 0:
                shapes.append((17, 1))
            elif n == 0 and rep % 2 == 0:
                shapes.append((4, 0))
            else:
                shapes.append((n,))
    shapes += [(4096,), (8192,)]  # whole chunks only: the unmasked path
    shapes.insert(50, (65537,))
    shapes.append((131071,))
    # interleave sizes so tensors of one size are not neighbours in the table
    order = torch.randperm(len(shapes), generator=gen).tolist()
    return [torch.randn(shapes[i], generator=gen).to(device).requires_grad_() for i in order]


def test_many_odd_sizes_one_group(device):
    params = _odd_params(device)
    assert len(params) >= 100
    assert sum(p.numel() for p in params) < 400_000
    kw = dict(lr=1e-2, amsgrad=True, weight_decay=0.1)
    run = Lockstep(params, lambda ps: adam_triton.Adam(ps, **kw), lambda ps: torch_adam(ps, **kw))
    run.run(3)
    for p in run.params_ours:
        # every tensor, empty ones included, got its state and 3 steps
        assert float(run.ours.state[p]["step"]) == 3
    # the last element of the largest tensor (in the tail of its last chunk) was updated
    idx = max(range(len(params)), key=lambda i: params[i].numel())
    assert params[idx].numel() == 131071
    assert run.params_ours[idx][-1] != params[idx][-1]


def _noncontiguous_params(device):
    gen = torch.Generator().manual_seed(3)
    transposed = nn.Parameter(torch.randn(8, 6, generator=gen).to(device).t())  # dense, strided
    base = torch.randn(10, 12, generator=gen).to(device)
    sliced = nn.Parameter(base[:, ::3])  # not dense: a strided slice made a leaf
    expanded_rows = nn.Parameter(torch.randn(4, 5, 3, generator=gen).to(device).permute(2, 0, 1))
    empty = nn.Parameter(torch.randn(0, 7, generator=gen).to(device))
    empty_t = nn.Parameter(torch.randn(3, 0, generator=gen).to(device).t())
    plain = nn.Parameter(torch.randn(33, generator=gen).to(device))
    # contiguous, but 4 bytes past a 16-byte boundary, with a full chunk: the host must
    # notice the misalignment (the unmasked 128-bit path would fault on a GPU)
    misaligned = nn.Parameter(torch.randn(4100, generator=gen).to(device)[1:])
    cplx_t = nn.Parameter(torch.randn(6, 4, dtype=torch.complex64, generator=gen).to(device).t())
    params = [transposed, sliced, expanded_rows, empty, empty_t, plain, misaligned, cplx_t]
    assert misaligned.is_contiguous() and misaligned.data_ptr() % 16 == 4
    assert not transposed.is_contiguous() and not sliced.is_contiguous()
    assert not expanded_rows.is_contiguous()
    return params


@pytest.mark.parametrize("amsgrad", [False, True])
def test_noncontiguous_and_empty_params(device, amsgrad):
    params = _noncontiguous_params(device)
    kw = dict(lr=1e-2, amsgrad=amsgrad, weight_decay=0.1, decoupled_weight_decay=True)
    run = Lockstep(params, lambda ps: adam_triton.Adam(ps, **kw), lambda ps: torch_adam(ps, **kw))
    for s in range(4):
        grads = random_grads(run.params_ours, s)
        if s % 2:
            # non-contiguous grads: for the transposed param, and for a contiguous param
            grads[0] = grads[0].t().contiguous().t()
            grads[5] = torch.stack([grads[5], grads[5] * 0 + 99.0], dim=1)[:, 0]
            assert not grads[0].is_contiguous() and not grads[5].is_contiguous()
        run.step(grads)
    # strides of params are kept (the optimizer writes through to the user's views)
    for p, q in zip(run.params_ours, params):
        assert p.stride() == q.stride()
    assert not torch.equal(run.params_ours[0], params[0])
    assert not torch.equal(run.params_ours[1], params[1])


def test_noncontiguous_param_writes_through_to_base(device):
    """A param that is a view of a bigger buffer is updated in place in that buffer."""
    base = torch.zeros(6, 8, device=device)
    view = base.t()  # a leaf sharing base's storage
    p = nn.Parameter(view)
    opt = adam_triton.Adam([p], lr=1e-2)
    p.grad = torch.ones(8, 6, device=device)
    opt.step()
    torch.testing.assert_close(base, torch.full((6, 8), -1e-2, device=device), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_complex64_matches_torch(device, amsgrad):
    gen = torch.Generator().manual_seed(5)
    params = [
        torch.randn(37, dtype=torch.complex64, generator=gen).to(device).requires_grad_(),
        torch.randn(5, 9, dtype=torch.complex64, generator=gen).to(device).requires_grad_(),
        torch.randn(20, generator=gen).to(device).requires_grad_(),  # a real param beside them
    ]
    kw = dict(lr=1e-2, amsgrad=amsgrad, weight_decay=0.1)
    run = Lockstep(params, lambda ps: adam_triton.Adam(ps, **kw), lambda ps: torch_adam(ps, **kw))
    run.run(5)
    p = run.params_ours[0]
    assert p.dtype == torch.complex64 and run.ours.state[p]["exp_avg"].dtype == torch.complex64
    # real and imaginary parts are updated independently (not as one complex magnitude)
    assert not torch.equal(p.imag, params[0].imag)


@pytest.mark.parametrize("decoupled", [False, True])
def test_float64_matches_torch(device, decoupled):
    gen = torch.Generator().manual_seed(6)
    params = [torch.randn(n, dtype=torch.float64, generator=gen).to(device).requires_grad_() for n in (1, 17, 1025)]
    params.append(torch.randn(33, generator=gen).to(device).requires_grad_())  # fp32 in the same group
    kw = dict(lr=1e-2, amsgrad=True, weight_decay=0.1, decoupled_weight_decay=decoupled)
    run = Lockstep(params, lambda ps: adam_triton.Adam(ps, **kw), lambda ps: torch_adam(ps, **kw))
    for _ in range(5):
        run.step(check=False)
        # float64 takes the plain-PyTorch path: double precision, like torch
        assert_state_matches(run.ours, run.torch, run.params_ours[:3], run.params_torch[:3],
                             tol=dict(rtol=1e-12, atol=1e-14))
        assert_state_matches(run.ours, run.torch, run.params_ours[3:], run.params_torch[3:])
    assert run.ours.state[run.params_ours[0]]["exp_avg"].dtype == torch.float64


# -- bf16 / fp16 ----------------------------------------------------------------------------

def _low_precision_params(device, dtype):
    gen = torch.Generator().manual_seed(8)
    shapes = [(3,), (17,), (31, 33), (1025,), (4097,), ()]
    return [torch.randn(s, generator=gen).to(device=device, dtype=dtype).requires_grad_() for s in shapes]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_low_precision_no_worse_than_twice_torch(device, dtype, amsgrad):
    params = _low_precision_params(device, dtype)
    kw = dict(lr=1e-2, betas=(0.9, 0.99), amsgrad=amsgrad, weight_decay=0.05, decoupled_weight_decay=True)
    ours = clone_params(params)
    theirs = clone_params(params)
    ref = [p.detach().to(torch.float64) for p in params]
    ref_m = [torch.zeros_like(p) for p in ref]
    ref_v = [torch.zeros_like(p) for p in ref]
    ref_vmax = [torch.zeros_like(p) for p in ref]
    ref_steps = [torch.zeros((), dtype=torch.float64) for _ in ref]
    oa = adam_triton.Adam(ours, **kw)
    ob = torch_adam(theirs, **kw)
    for s in range(6):
        grads = random_grads(params, s)  # already rounded to the low-precision dtype
        set_grads(ours, grads)
        set_grads(theirs, grads)
        oa.step()
        ob.step()
        reference.adam_step(
            ref, [g.to(torch.float64) for g in grads], ref_m, ref_v, ref_vmax, ref_steps,
            lr=kw["lr"], beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.05, amsgrad=amsgrad,
            decoupled_weight_decay=True,
        )
    keys = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if amsgrad else [])
    refs = {"param": ref, "exp_avg": ref_m, "exp_avg_sq": ref_v, "max_exp_avg_sq": ref_vmax}
    for what in ["param"] + keys:
        if what == "param":
            xs, ys = [a.detach() for a in ours], [b.detach() for b in theirs]
        else:
            xs, ys = [oa.state[a][what] for a in ours], [ob.state[b][what] for b in theirs]
        assert all(x.dtype == dtype for x in xs + ys)
        # flash-attention's criterion over all elements of the bucket at once
        r = torch.cat([t.reshape(-1) for t in refs[what]])
        x = torch.cat([t.reshape(-1).double().cpu() for t in xs])
        y = torch.cat([t.reshape(-1).double().cpu() for t in ys])
        err_ours = (x - r).abs().max().item()
        err_torch = (y - r).abs().max().item()
        atol = 1e-4 * r.abs().max().item()
        assert err_ours <= 2 * err_torch + atol, (
            f"{dtype} {what}: ours {err_ours:.3g} > 2 x torch {err_torch:.3g} + {atol:.2g}"
        )
        assert err_ours > 0  # low-precision storage really was used
    # every param changed in low precision (lr is above half an ulp)
    assert all(not torch.equal(a, p) for a, p in zip(ours, params))


def _distance_to_bf16_midpoint(x32):
    """For fp32 values: how many fp32 ulps x is from the nearest bf16 rounding midpoint."""
    low = x32.contiguous().view(torch.int32) & 0xFFFF
    return (low - 0x8000).abs()


def _truncate_to_bf16(x32):
    return (x32.contiguous().view(torch.int32) & ~0xFFFF).view(torch.float32).to(torch.bfloat16)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_bf16_one_step_rounds_to_nearest_even(device, amsgrad):
    """One step on bf16 tensors equals torch's fp32 step on the same values, rounded to bf16
    (round to nearest even, not truncation), for the param and every state."""
    gen = torch.Generator().manual_seed(11)
    p16 = torch.randn(4099, generator=gen).to(device=device, dtype=torch.bfloat16)
    g16 = torch.randn(4099, generator=gen).to(device=device, dtype=torch.bfloat16)
    kw = dict(lr=1e-2, amsgrad=amsgrad, weight_decay=0.1)
    (ours,) = clone_params([p16])
    p32 = nn.Parameter(p16.float())
    oa = adam_triton.Adam([ours], **kw)
    ob = torch_adam([p32], **kw)
    ours.grad = g16.clone()
    p32.grad = g16.float()
    oa.step()
    ob.step()
    pairs = [("param", ours.detach(), p32.detach())]
    pairs += [(k, oa.state[ours][k], ob.state[p32][k]) for k in ob.state[p32] if k != "step"]
    for what, x, y32 in pairs:
        expected = y32.to(torch.bfloat16)
        mismatch = x != expected
        # fp32 math may differ from torch's by an ulp or two: only values sitting on a bf16
        # rounding midpoint may then round the other way
        near_mid = _distance_to_bf16_midpoint(y32) <= 8
        assert not (mismatch & ~near_mid).any(), (
            f"{what}: {int((mismatch & ~near_mid).sum())} elements differ from fp32-then-RNE"
        )
        assert int(mismatch.sum()) <= 4
        # the check can tell RNE from truncation: many elements would differ if truncated
        assert (_truncate_to_bf16(y32) != expected).float().mean() > 0.2, what


def test_bf16_ties_round_to_even(device):
    """Exact ties: betas 0, eps ~0 and lr = 2^-8 make every update p -/+ half a bf16 ulp
    (for |p| in [1, 2)); the stored value must be the even neighbour, as torch gives."""
    k = torch.arange(128, dtype=torch.float32)
    mags = 1 + k / 128  # every bf16 value in [1, 2)
    p = torch.cat([mags, -mags, mags]).to(torch.bfloat16)
    g = torch.cat([torch.ones(128), torch.ones(128), -torch.ones(128)]).to(torch.bfloat16)
    kw = dict(lr=2.0**-8, betas=(0.0, 0.0), eps=1e-30)
    (ours,) = clone_params([p.to(device)])
    (theirs,) = clone_params([p.to(device)])
    oa = adam_triton.Adam([ours], **kw)
    ob = torch_adam([theirs], **kw)
    ours.grad = g.to(device)
    theirs.grad = g.to(device)
    oa.step()
    ob.step()
    exact = p.float() - kw["lr"] * g.float()  # exactly halfway between two bf16 values
    expected = exact.to(torch.bfloat16)  # torch's fp32 -> bf16: nearest even
    assert torch.equal(ours.cpu(), expected)
    assert torch.equal(theirs.cpu(), expected)
    # half of the ties round away from the truncated value
    assert int((_truncate_to_bf16(exact) != expected).sum()) >= 128


def test_mixed_dtypes_in_one_group_equal_separate_optimizers(device):
    """One group holding fp32, bf16, fp16 and complex64 params (four buckets) gives
    bit-identical results to one optimizer per dtype."""
    gen = torch.Generator().manual_seed(12)
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.complex64, torch.bfloat16, torch.float32]
    params = [torch.randn(n, generator=gen, dtype=torch.complex64 if d.is_complex else torch.float32)
              .to(device=device, dtype=d).requires_grad_()
              for n, d in zip((33, 1025, 17, 9, 5, 4097), dtypes)]
    kw = dict(lr=1e-2, amsgrad=True, weight_decay=0.1)
    mixed = clone_params(params)
    opt_mixed = adam_triton.Adam(mixed, **kw)
    alone = clone_params(params)
    opts_alone = {d: adam_triton.Adam([p for p in alone if p.dtype == d], **kw) for d in set(dtypes)}
    for s in range(3):
        grads = random_grads(params, s)
        set_grads(mixed, grads)
        set_grads(alone, grads)
        opt_mixed.step()
        for opt in opts_alone.values():
            opt.step()
    for i, (a, b) in enumerate(zip(mixed, alone)):
        assert torch.equal(a, b), f"param {i} ({a.dtype})"
        opt_b = opts_alone[b.dtype]
        assert set(opt_mixed.state[a]) == set(opt_b.state[b])
        for k, v in opt_b.state[b].items():
            assert torch.equal(opt_mixed.state[a][k], v), f"param {i} state {k}"
    # the fp32 and complex params also match torch
    theirs = clone_params(params)
    tb = torch_adam([p for p in theirs if p.dtype in (torch.float32, torch.complex64)], **kw)
    for s in range(3):
        set_grads(theirs, random_grads(params, s))
        tb.step()
    idx = [i for i, d in enumerate(dtypes) if d in (torch.float32, torch.complex64)]
    assert_state_matches(opt_mixed, tb, [mixed[i] for i in idx], [theirs[i] for i in idx])


def test_only_empty_params(device):
    """A bucket whose tensors are all empty launches no update but still counts steps."""
    params = [torch.randn(0, device=device).requires_grad_(), torch.randn(3, 0, device=device).requires_grad_()]
    kw = dict(lr=1e-2, amsgrad=True)
    run = Lockstep(params, lambda ps: adam_triton.Adam(ps, **kw), lambda ps: torch_adam(ps, **kw))
    run.run(2)
    assert [float(run.ours.state[p]["step"]) for p in run.params_ours] == [2.0, 2.0]


@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.parametrize("amsgrad", [False, True])
def test_nan_and_inf_grads_propagate_like_torch(device, amsgrad):
    gen = torch.Generator().manual_seed(13)
    params = [torch.randn(40, generator=gen).to(device).requires_grad_(),
              torch.randn(7, generator=gen).to(device).requires_grad_()]
    kw = dict(lr=1e-2, amsgrad=amsgrad)
    run = Lockstep(params, lambda ps: adam_triton.Adam(ps, **kw), lambda ps: torch_adam(ps, **kw),
                   tol=dict(FP32_TOL, equal_nan=True))
    for s in range(3):
        grads = random_grads(params, s)
        if s == 1:
            grads[0][3], grads[0][7], grads[0][9] = float("nan"), float("inf"), -float("inf")
        run.step(grads)
    p = run.params_ours[0]
    assert torch.isnan(p[[3, 7, 9]]).all()  # inf / inf and nan poison these elements, as in torch
    assert torch.isfinite(p[[0, 1, 2, 4, 5, 6, 8]]).all() and torch.isfinite(run.params_ours[1]).all()


def test_step_increment_covers_more_tensors_than_its_block(device):
    """The step-increment kernel walks tables longer than its block (600 rows), and a
    non-zero found_inf leaves every step as it was."""
    from adam_triton._tables import TensorTable
    from adam_triton.kernels import increment_steps

    steps = [torch.full((), float(i % 5), device=device) for i in range(600)]
    table = TensorTable([list(f) for f in zip(*[(1, s.data_ptr(), 0, 0, 0, 0, 0, 0, 0) for s in steps])], device)
    increment_steps(table.table, 600)
    increment_steps(table.table, 600, torch.ones((), device=device))  # found_inf: skipped
    increment_steps(table.table, 600, torch.zeros((), device=device))
    assert [float(s) for s in steps] == [float(i % 5 + 2) for i in range(600)]
