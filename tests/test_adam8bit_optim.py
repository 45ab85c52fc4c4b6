"""Adam8bit / AdamW8bit: the kernel path (through the interpreter on CPU) against the same
optimizer's plain-PyTorch path, which runs reference.adam8bit_step — code for code, absmax
and params bit for bit; mixed precision, GradScaler, clipping, launches per step, the state
layout and its bytes, checkpoints (resume, torch.optim state dicts, DCP), errors, and the
refusal of DTensor params."""

import copy
import io
import math
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from _util import FP32_TOL, clone_params, random_grads, set_grads, step_both
from test_launches import launches  # noqa: F401  (the fixture)

import adam_triton
from adam_triton import reference as ref

SIGNED, UNSIGNED = ref.dynamic_map(True), ref.dynamic_map(False)
# 8-bit with min_8bit_size=1000: a full aligned chunk, one element more, a 2-D tensor, a
# tensor past two chunks; fp32 states: two small tensors
SIZES = [(4096,), (4097,), (33, 129), (8192 + 13,), (300,), (5,)]
MIN_8BIT = 1000


def make_params(sizes, device, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(device=device, dtype=dtype)) for s in sizes]


def spread_grads(params, step, seed=7):
    """Grads with a spread of magnitudes within and across blocks; at step 2 a zero block."""
    gen = torch.Generator().manual_seed(seed * 1000 + step)
    out = []
    for p in params:
        n = p.numel()
        g = torch.randn(n, generator=gen) * torch.exp(2 * torch.randn(n, generator=gen))
        if step == 2:
            g[: min(n, 256)] = 0.0
        out.append(g.reshape(p.shape).to(device=p.device, dtype=p.dtype))
    return out


def code_agreement(a, b):
    """(equal, one code apart, further apart) counts of two code tensors."""
    d = (a.int() - b.int()).abs()
    return int((d == 0).sum()), int((d == 1).sum()), int((d > 1).sum())


def compare_to_reference(ours, theirs, params_ours, params_theirs, device, exact=None):
    """Every param and state tensor of the kernel path against the PyTorch path: codes
    counted (equal / one apart / further), absmax and params bit-equal on the CPU (where the
    interpreter computes in IEEE fp32 like the reference; exact=False: within fp32
    tolerance), the fp32 states of small params within fp32 tolerance (Adam's kernel).
    Returns (codes compared, codes one apart)."""
    n_codes = one_apart = 0
    exact = device.type == "cpu" if exact is None else exact
    for i, (pa, pb) in enumerate(zip(params_ours, params_theirs)):
        sa, sb = ours.state[pa], theirs.state[pb]
        assert set(sa) == set(sb), (i, sorted(sa), sorted(sb))
        eight_bit = "exp_avg_codes" in sa
        if eight_bit and exact:
            _equal(pa.detach(), pb.detach(), f"param {i}")
        else:
            torch.testing.assert_close(pa.detach(), pb.detach(), **FP32_TOL)
        for key in sb:
            a, b = sa[key], sb[key]
            assert a.dtype == b.dtype and a.shape == b.shape, (i, key)
            if key.endswith("_codes"):
                eq, one, far = code_agreement(a, b)
                assert far == 0, (i, key, far)
                n_codes += a.numel()
                one_apart += one
            elif key.endswith("_absmax") and exact:
                _equal(a, b, f"param {i} {key}")
            elif key.endswith("_absmax"):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
            elif key == "step":
                assert float(a) == float(b)
            else:
                torch.testing.assert_close(a, b, **FP32_TOL)
    return n_codes, one_apart


def _equal(a, b, what):
    """Bit-equal values (NaN equal to NaN)."""
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}: {m}")


def run_against_reference(device, cls, kwargs, sizes=SIZES, steps=6, dtype=torch.float32, grads=spread_grads,
                          exact=None):
    """cls(**kwargs) on the kernel path and with fused=False (the PyTorch path: the
    reference) from the same params and grads; compares after every step. Returns (the
    kernel-path optimizer, codes compared, codes one apart)."""
    params = make_params(sizes, device, dtype)
    pk, pr = clone_params(params), clone_params(params)
    ok = cls(pk, **kwargs)
    orf = cls(pr, **kwargs, fused=False)
    n_codes = one_apart = 0
    for s in range(steps):
        g = grads(pk, s)
        step_both(ok, orf, pk, pr, g)
        n, one = compare_to_reference(ok, orf, pk, pr, device, exact)
        n_codes += n
        one_apart += one
    return ok, n_codes, one_apart


def assert_ties(device, n_codes, one_apart, what, exact=None):
    print(f"{what}: {one_apart} of {n_codes} codes one apart")
    if (device.type == "cpu") if exact is None else exact:
        assert one_apart == 0
    else:  # fp32 rounding may decide a value at a decision point differently: rare
        assert one_apart <= 1e-3 * n_codes


# ------------------------------------------------------------------ the kernel path vs the reference

CASES = {
    "adamw": (adam_triton.AdamW8bit, dict(lr=1e-2)),
    "adam-l2": (adam_triton.Adam8bit, dict(lr=1e-2, weight_decay=0.1)),
    "amsgrad-maximize": (adam_triton.Adam8bit, dict(lr=1e-2, amsgrad=True, maximize=True, weight_decay=0.05,
                                                     decoupled_weight_decay=True)),
    "beta1=0.3": (adam_triton.AdamW8bit, dict(lr=1e-2, betas=(0.3, 0.99))),  # lerp weight >= 0.5
    "lr-tensor": (adam_triton.AdamW8bit, dict(lr=torch.tensor(3e-3))),
    "block-64": (adam_triton.AdamW8bit, dict(lr=1e-2, block_size=64)),
    "block-2048": (adam_triton.AdamW8bit, dict(lr=1e-2, block_size=2048)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_path_matches_reference_code_for_code(device, case):
    cls, kwargs = CASES[case]
    opt, n_codes, one_apart = run_against_reference(device, cls, dict(kwargs, min_8bit_size=MIN_8BIT))
    assert_ties(device, n_codes, one_apart, case)
    eight = [p for p, st in opt.state.items() if "exp_avg_codes" in st]
    assert len(eight) == 4 and len(opt.state) == 6  # both layouts in one optimizer


@pytest.mark.parametrize("block_size,sizes", [
    (256, [(65536 + 3 * 1024 + 100,)]),  # 64 tiles, then 3 and a partial one: two chunks
    (64, [(16384 + 1024 + 7,)]),  # 16 tiles of 16 blocks a chunk (its 256 blocks)
    (2048, [(2 * 2048 + 5,)]),  # a block a tile, at 4 warps: 2 tiles and a partial one
])
def test_gpu_launch_shape_matches_reference_code_for_code(device, monkeypatch, block_size, sizes):
    """The kernel with the launch shape a GPU gets (tuning.DEFAULT_CONFIG: tiles of 1024 or
    2048 elements, a chunk of many tiles whose absmax is read once and written at the end),
    which the interpreter's own config (one tile a chunk) never takes."""
    from adam_triton import tuning
    from adam_triton.kernels import adam8bit

    monkeypatch.setattr(tuning, "config_for", lambda key, bench: dict(tuning.DEFAULT_CONFIG))
    chunk, tile, _ = adam8bit.launch_shape(block_size, tuning.DEFAULT_CONFIG)
    assert chunk // tile > 1 and sizes[0][0] > 2 * tile and sizes[0][0] % tile  # several tiles, a partial one
    _, n_codes, one_apart = run_against_reference(device, adam_triton.AdamW8bit,
                                                  dict(lr=1e-2, block_size=block_size, min_8bit_size=MIN_8BIT),
                                                  sizes=sizes, steps=3)
    assert_ties(device, n_codes, one_apart, f"block {block_size}")


def test_launch_shape():
    """Tiles of 16 elements a thread at 2 warps (more for larger blocks); chunks of twice as
    many tiles as the config's chunk has iterations, at most 256 blocks; the interpreter's
    config takes its chunk as one tile."""
    from adam_triton import tuning
    from adam_triton.kernels import adam8bit

    d = tuning.DEFAULT_CONFIG  # 32 iterations of 512 elements
    assert adam8bit.launch_shape(256, d) == (65536, 1024, 2)
    assert adam8bit.launch_shape(32, d) == (8192, 1024, 2)
    assert adam8bit.launch_shape(64, d) == (16384, 1024, 2)
    assert adam8bit.launch_shape(2048, d) == (131072, 2048, 4)
    assert adam8bit.launch_shape(4096, d) == (262144, 4096, 8)
    assert adam8bit.launch_shape(256, tuning.INTERPRETER_CONFIG, whole_chunk=True) == (4096, 4096, 1)
    with pytest.raises(ValueError, match="blocks of the 8-bit block size"):
        adam8bit.launch_shape(4096, dict(CHUNK=2048, BLOCK=1024, num_warps=1), whole_chunk=True)
    assert adam8bit.max_registers(256, False) == (200 if adam8bit._FITS_200 else 255)
    assert adam8bit.max_registers(256, True) == adam8bit.max_registers(64, False) == 255


def test_clipping(device):
    """max_grad_norm: the two paths reduce the norm in different orders, so their clip
    coefficients (and from there grads, states, params) may differ by an ulp; codes then
    differ by one where a value sits at a decision point (counted)."""
    kwargs = dict(lr=1e-2, max_grad_norm=0.5, min_8bit_size=MIN_8BIT)
    opt, n_codes, one_apart = run_against_reference(device, adam_triton.AdamW8bit, kwargs, exact=False)
    assert_ties(device, n_codes, one_apart, "clip", exact=False)
    assert float(opt.last_grad_norm) > 0.5  # the clip was active


def test_groups_of_both_layouts_and_options_share_launches(device):
    """Two groups (lr, weight decay, min_8bit_size of their own) against the reference."""
    params = make_params([(5000,), (40,), (3000,), (700,)], device)
    pk, pr = clone_params(params), clone_params(params)

    def groups(ps):
        return [dict(params=ps[:2]), dict(params=ps[2:], lr=3e-3, weight_decay=0.0, min_8bit_size=500)]

    ok = adam_triton.AdamW8bit(groups(pk), lr=1e-2)
    orf = adam_triton.AdamW8bit(groups(pr), lr=1e-2, fused=False)
    for s in range(3):
        g = spread_grads(pk, s)
        step_both(ok, orf, pk, pr, g)
        n, one = compare_to_reference(ok, orf, pk, pr, device)
        assert_ties(device, n, one, "two groups")
    assert ["exp_avg_codes" in ok.state[p] for p in pk] == [True, False, True, True]


def test_nonfinite_and_zero_blocks(device):
    """A NaN or inf grad poisons its block's absmax (the whole block is NaN from the next step
    on), exactly as the reference; an all-zero block from a zero state stays at absmax 0."""
    def grads(ps, step):
        g = torch.randn(1100, generator=torch.Generator().manual_seed(step))
        if step == 0:
            g[256:512] = 0.0
            g[700] = math.inf
            g[1050] = math.nan
        else:
            g[256:512] = 0.0
        return [g.to(device)]

    with _quiet():
        opt, n, one = run_against_reference(device, adam_triton.AdamW8bit, dict(lr=1e-2, min_8bit_size=1),
                                            sizes=[(1100,)], steps=2, grads=grads)
    st = next(iter(opt.state.values()))
    a = st["exp_avg_absmax"].cpu()
    assert a[1].item() == 0.0 and math.isnan(a[2].item()) and math.isnan(a[4].item()) and a[0].item() > 0
    p = next(iter(opt.state))
    assert bool(p.detach()[512:768].isnan().all()) and bool(p.detach()[:512].isfinite().all())


class _quiet:
    """Silence the interpreter's 'invalid value' warning when it divides NaN."""

    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        self._w.__exit__(*exc)


def test_complex_and_float64_params(device):
    """Complex params: one code per real number (codes shaped like view_as_real). float64
    params take the PyTorch path (the kernels compute in fp32): the reference's step."""
    gen = torch.Generator().manual_seed(3)
    z = torch.nn.Parameter(torch.randn(700, dtype=torch.complex64, generator=gen).to(device))
    zr = torch.nn.Parameter(z.detach().clone())
    ok = adam_triton.AdamW8bit([z], lr=1e-2, min_8bit_size=256)
    orf = adam_triton.AdamW8bit([zr], lr=1e-2, min_8bit_size=256, fused=False)
    for s in range(3):
        g = torch.randn(700, dtype=torch.complex64, generator=gen).to(device)
        z.grad, zr.grad = g.clone(), g.clone()
        ok.step()
        orf.step()
        compare_to_reference(ok, orf, [z], [zr], device)
    assert ok.state[z]["exp_avg_codes"].shape == (700, 2) and ok.state[z]["exp_avg_absmax"].shape == (6,)
    # float64: the reference on an fp32 copy, written back
    p64 = torch.nn.Parameter(torch.randn(3000, dtype=torch.float64, generator=gen).to(device))
    start = p64.detach().clone()
    opt = adam_triton.Adam8bit([p64], lr=1e-2, block_size=128, min_8bit_size=1000)
    g = torch.randn(3000, dtype=torch.float64, generator=gen).to(device)
    p64.grad = g
    opt.step()
    rp = start.float().cpu()
    m = [torch.full((3000,), 127, dtype=torch.uint8), torch.zeros(24)]
    v = [torch.zeros(3000, dtype=torch.uint8), torch.zeros(24)]
    ref.adam8bit_step([rp], [g.cpu()], [m], [v], None, [torch.tensor(0.0)], lr=1e-2, beta1=0.9, beta2=0.999,
                      eps=1e-8, block_size=128)
    assert torch.equal(p64.detach().cpu(), rp.double())
    assert torch.equal(opt.state[p64]["exp_avg_codes"].cpu(), m[0])


# ------------------------------------------------------------------ mixed precision, AMP

def test_bf16_params_master_weights_and_stochastic_rounding(device):
    """bf16 params and grads: with master weights the kernel path equals the reference bit for
    bit (master, param, codes, absmax); stochastic rounding draws other random bits than the
    PyTorch path, so params agree to one bf16 ulp and the states (AdamW: from grads only)
    exactly."""
    run_against_reference(device, adam_triton.AdamW8bit, dict(lr=1e-2, master_weights=True, min_8bit_size=MIN_8BIT),
                          sizes=SIZES[:4], steps=3, dtype=torch.bfloat16)
    params = make_params(SIZES[:2], device, torch.bfloat16)
    pk, pr = clone_params(params), clone_params(params)
    ok = adam_triton.AdamW8bit(pk, lr=1e-2, stochastic_rounding=True, seed=5)
    orf = adam_triton.AdamW8bit(pr, lr=1e-2, stochastic_rounding=True, seed=5, fused=False)
    g = spread_grads(pk, 0)
    step_both(ok, orf, pk, pr, g)
    for a, b in zip(pk, pr):
        ulp = torch.finfo(torch.bfloat16).eps * b.detach().float().abs().clamp_min(1e-30)
        assert bool(((a.detach().float() - b.detach().float()).abs() <= 2 * ulp).all())
        for key in ("exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax"):
            if device.type == "cpu":
                assert torch.equal(ok.state[a][key], orf.state[b][key]), key


@pytest.mark.parametrize("scale", [1e-21, 1e15])
def test_tiny_and_huge_states_quantize_as_the_reference(device, scale):
    """Grads of 1e-21 give exp_avg_sq blocks with a subnormal absmax, whose reciprocal would
    overflow: the kernel scales x and absmax by 2^64 as the reference does, code for code
    (without it this case fails). Grads of 1e15 take the other branch (absmax above 2^64,
    scaled by 2^-64; exact unless the reciprocal would be subnormal, above 2^126)."""
    def grads(params, step):
        return [g * scale for g in spread_grads(params, step)]

    ok, n_codes, one_apart = run_against_reference(
        device, adam_triton.AdamW8bit, dict(lr=1e-2, min_8bit_size=MIN_8BIT), sizes=SIZES[:2], steps=2, grads=grads
    )
    absmax = ok.state[ok.param_groups[0]["params"][0]]["exp_avg_sq_absmax"]
    if scale < 1:
        assert bool((absmax < 2.0**-126).any()) and bool((absmax > 0).all())
    else:
        assert bool((absmax > 2.0**64).all()) and bool(absmax.isfinite().all())
    assert_ties(device, n_codes, one_apart, f"states at scale {scale:g}")


def test_stochastic_rounding_draws_the_bits_of_adams_kernel(device):
    """With zero grads the update is the decoupled decay alone, p * (1 - lr * wd), one fp32
    product in both kernels; stochastic rounding of it with the same seed, step and tensor
    then gives the same bf16 bits from the 8-bit kernel (2-D tiles) as from Adam's (rows),
    element for element: each element draws its own random bits."""
    gen = torch.Generator().manual_seed(11)
    start = (torch.randn(5000, generator=gen) * 3).to(torch.bfloat16)  # 8-bit states; a masked tail
    results = []
    for cls, extra in ((adam_triton.AdamW, {}), (adam_triton.AdamW8bit, dict(min_8bit_size=1000))):
        p = torch.nn.Parameter(start.clone().to(device))
        opt = cls([p], lr=0.1, weight_decay=0.1, stochastic_rounding=True, seed=5, **extra)
        for _ in range(2):
            p.grad = torch.zeros_like(p)
            opt.step()
        results.append(p.detach().cpu())
    assert "exp_avg_codes" in opt.state[p]
    assert torch.equal(results[0].view(torch.int16), results[1].view(torch.int16))
    nearest = start.float()
    for _ in range(2):
        nearest = (nearest * (1 - 0.1 * 0.1)).to(torch.bfloat16).float()
    assert (results[1].float() != nearest).sum() > 100  # rounded stochastically, not to nearest


def test_grad_scale_divides_and_found_inf_skips(device):
    """GradScaler's protocol (grad_scale / found_inf set on the optimizer): scaled grads give
    the reference's step on the unscaled ones; found_inf leaves params, states and steps."""
    params = make_params(SIZES[:3], device)
    pk, pr = clone_params(params), clone_params(params)
    ok = adam_triton.AdamW8bit(pk, lr=1e-2)
    orf = adam_triton.AdamW8bit(pr, lr=1e-2, fused=False)
    for s in range(2):
        g = spread_grads(pk, s)
        set_grads(pk, [x * 1024 for x in g])
        set_grads(pr, [x * 1024 for x in g])
        for opt in (ok, orf):
            opt.grad_scale = torch.tensor(1024.0, device=device)
            opt.found_inf = torch.tensor(0.0, device=device)
            opt.step()
            del opt.grad_scale, opt.found_inf
        compare_to_reference(ok, orf, pk, pr, device)
    before = copy.deepcopy({i: dict(ok.state[p]) for i, p in enumerate(pk)}), [p.detach().clone() for p in pk]
    set_grads(pk, [torch.full_like(p, math.inf) for p in pk])
    ok.grad_scale = torch.tensor(1024.0, device=device)
    ok.found_inf = torch.tensor(1.0, device=device)
    ok.step()
    del ok.grad_scale, ok.found_inf
    for i, p in enumerate(pk):
        assert torch.equal(p.detach(), before[1][i])
        for key, value in before[0][i].items():
            assert torch.equal(ok.state[p][key], value), key


def test_torch_grad_scaler_end_to_end(device):
    """torch.amp.GradScaler drives the step: an inf in the grads skips it, then training goes on."""
    model = torch.nn.Linear(64, 80).to(device)
    opt = adam_triton.AdamW8bit(model.parameters(), lr=1e-2, min_8bit_size=1024)
    scaler = torch.amp.GradScaler(device.type, init_scale=256.0)
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(0)).to(device)
    w0 = model.weight.detach().clone()
    loss = model(x).pow(2).mean()
    scaler.scale(loss * math.inf).backward()
    scaler.step(opt)
    scaler.update()
    assert torch.equal(model.weight.detach(), w0) and float(opt.state[model.weight]["step"]) == 0
    opt.zero_grad()
    scaler.scale(model(x).pow(2).mean()).backward()
    scaler.step(opt)
    scaler.update()
    assert not torch.equal(model.weight.detach(), w0) and float(opt.state[model.weight]["step"]) == 1
    assert "exp_avg_codes" in opt.state[model.weight] and "exp_avg" in opt.state[model.bias]


# ------------------------------------------------------------------ launches

def test_one_step_is_two_launches_per_bucket(device, launches):  # noqa: F811
    gen = torch.Generator().manual_seed(2)
    params = [torch.nn.Parameter(torch.randn(600 + 37 * i, generator=gen).to(device)) for i in range(30)]
    params += [torch.nn.Parameter(torch.randn(3 + i, generator=gen).to(device)) for i in range(10)]
    opt = adam_triton.AdamW8bit(params, lr=1e-2, min_8bit_size=512)
    for s in range(2):
        set_grads(params, random_grads(params, s))
        if s == 1:
            del launches[:]
        opt.step()
    names = [name for name, _ in launches]
    # per bucket: the step increment and the update; 8-bit tensors and small ones are two buckets
    assert sorted(names) == ["_adam8bit_kernel", "_adam_kernel", "_increment_steps_kernel", "_increment_steps_kernel"]
    (update,) = [args for name, args in launches if name == "_adam8bit_kernel"]
    assert update["n_rows"] == 30 and update["table_ptr"].shape[1] == 30
    (small,) = [args for name, args in launches if name == "_adam_kernel"]
    assert small["n_rows"] == 10


# ------------------------------------------------------------------ state and checkpoints

def test_state_layout_and_bytes_per_param():
    """Keys, dtypes and shapes of both layouts; about 2 bytes per param at block 256 (the
    PyTorch path creates the same state, fast)."""
    big = torch.nn.Parameter(torch.randn(1 << 20))
    opt = adam_triton.AdamW8bit([big], lr=1e-3, fused=False)
    big.grad = torch.randn_like(big)
    opt.step()
    st = opt.state[big]
    assert sorted(st) == ["exp_avg_absmax", "exp_avg_codes", "exp_avg_sq_absmax", "exp_avg_sq_codes", "step"]
    assert st["exp_avg_codes"].dtype == torch.uint8 and st["exp_avg_codes"].shape == big.shape
    assert st["exp_avg_absmax"].dtype == torch.float32 and st["exp_avg_absmax"].shape == ((1 << 20) // 256,)
    assert all(type(t) is torch.Tensor for t in st.values())  # plain tensors, no subclasses
    bpp = opt.state_bytes_per_param()
    print(f"state bytes per param, 1M fp32 param, block 256: {bpp:.6f}")
    assert bpp <= 2.05 and bpp == pytest.approx(2 + 8 / 256 + 4 / (1 << 20))
    # amsgrad adds a third pair; a small bf16 param keeps fp32 states under torch's keys
    small = torch.nn.Parameter(torch.randn(100, dtype=torch.bfloat16))
    w = torch.nn.Parameter(torch.randn(70, 100))
    opt = adam_triton.Adam8bit([small, w], amsgrad=True, fused=False, block_size=64)
    small.grad, w.grad = torch.randn_like(small), torch.randn_like(w)
    opt.step()
    assert sorted(opt.state[small]) == ["exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"]
    assert opt.state[small]["exp_avg"].dtype == torch.float32
    assert opt.state[w]["max_exp_avg_sq_codes"].shape == (70, 100)
    assert opt.state[w]["max_exp_avg_sq_absmax"].shape == (110,)  # ceil(7000 / 64)


def _steps(opt, params, steps, seed=11):
    for s in steps:
        set_grads(params, spread_grads(params, s, seed))
        opt.step()


def _assert_same_state(a, b, pa, pb):
    for x, y in zip(pa, pb):
        assert torch.equal(x.detach(), y.detach())
        assert set(a.state[x]) == set(b.state[y])
        for key in a.state[x]:
            assert a.state[x][key].dtype == b.state[y][key].dtype, key
            assert torch.equal(a.state[x][key], b.state[y][key]), key


def test_state_dict_resumes_bit_identically(device):
    """Save after 3 steps (through torch.save / torch.load(weights_only=True)), load into a
    fresh optimizer over copies of the params, then 3 more steps of both: identical. bf16
    params: torch's loader casts floating state to bf16; absmax comes back in fp32."""
    fp32 = make_params([(5000,), (300,)], device)
    bf16 = make_params([(4000,), (33, 65)], device, torch.bfloat16, seed=1)

    def build(ps):
        return adam_triton.AdamW8bit([dict(params=ps[:2]), dict(params=ps[2:], lr=3e-3, block_size=64)],
                                     lr=1e-2, amsgrad=True, min_8bit_size=1000)

    params = fp32 + bf16
    opt = build(params)
    _steps(opt, params, range(3))
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    params2 = clone_params(params)
    opt2 = build(params2)
    opt2.load_state_dict(saved)
    _assert_same_state(opt, opt2, params, params2)
    assert opt2.state[params2[2]]["exp_avg_absmax"].dtype == torch.float32
    assert opt2.param_groups[1]["block_size"] == 64
    _steps(opt, params, range(3, 6))
    _steps(opt2, params2, range(3, 6))
    _assert_same_state(opt, opt2, params, params2)


@pytest.mark.parametrize("torch_cls,ours_cls,kw", [
    (torch.optim.AdamW, adam_triton.AdamW8bit, dict()),
    (torch.optim.Adam, adam_triton.Adam8bit, dict(amsgrad=True)),
])
def test_torch_optim_state_dict_loads_quantized(device, torch_cls, ours_cls, kw):
    """A torch.optim.Adam / AdamW checkpoint: large params' moments are quantized on load with
    the group's block size (the reference's quantize_blockwise of torch's values), small
    params keep torch's fp32 values; steps and hyperparameters come along; training goes on."""
    params = make_params([(5000,), (300,)], device) + make_params([(3000,)], device, torch.bfloat16, seed=2)
    theirs = torch_cls(params, lr=2e-3, foreach=False, **kw)
    _steps(theirs, params, range(2))
    sd = theirs.state_dict()
    ours_params = clone_params(params)
    ours = ours_cls(ours_params, lr=1e-2, min_8bit_size=1000, block_size=128)
    ours.load_state_dict(sd)
    assert ours.param_groups[0]["lr"] == 2e-3 and ours.param_groups[0]["block_size"] == 128
    for p, q in zip(params, ours_params):
        st, tst = ours.state[q], theirs.state[p]
        assert float(st["step"]) == float(tst["step"]) == 2
        names = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if kw.get("amsgrad") else [])
        for name in names:
            if p.numel() >= 1000:
                qmap = SIGNED if name == "exp_avg" else UNSIGNED
                codes, absmax = ref.quantize_blockwise(tst[name].float(), qmap.to(device), 128)
                assert torch.equal(st[name + "_codes"], codes) and torch.equal(st[name + "_absmax"], absmax)
                assert st[name + "_absmax"].dtype == torch.float32 and name not in st
            else:
                assert torch.equal(st[name], tst[name])
    _steps(ours, ours_params, range(2, 4))
    assert all(float(ours.state[q]["step"]) == 4 for q in ours_params)


def test_the_checkpoints_options_apply():
    """torch's rule: a loaded state dict brings its groups' options, block_size and
    min_8bit_size included, so the layout of the saved state is kept."""
    p = torch.nn.Parameter(torch.randn(5000))
    opt = adam_triton.AdamW8bit([p], fused=False, block_size=512)
    _steps(opt, [p], range(2))
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = adam_triton.AdamW8bit([q], fused=False, min_8bit_size=10_000)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.param_groups[0]["min_8bit_size"] == 4096 and opt2.param_groups[0]["block_size"] == 512
    _assert_same_state(opt, opt2, [p], [q])


def test_dcp_save_and_load(tmp_path):
    """torch.distributed.checkpoint (one process, no process group) takes the plain-tensor state."""
    import torch.distributed.checkpoint as dcp

    params = make_params([(5000,), (10,)], torch.device("cpu"))
    opt = adam_triton.AdamW8bit(params, lr=1e-2, fused=False)
    _steps(opt, params, range(2))
    dcp.save({"optim": opt.state_dict()}, checkpoint_id=str(tmp_path))
    params2 = clone_params(params)
    opt2 = adam_triton.AdamW8bit(params2, lr=1e-2, fused=False)
    set_grads(params2, [torch.zeros_like(p) for p in params2])
    opt2.step()  # state to load into
    sd = {"optim": opt2.state_dict()}
    dcp.load(sd, checkpoint_id=str(tmp_path))
    opt2.load_state_dict(sd["optim"])
    for p, q in zip(params, params2):
        for key, value in opt.state[p].items():
            assert torch.equal(opt2.state[q][key], value), key


def test_pickle_and_deepcopy_keep_the_options():
    p = torch.nn.Parameter(torch.randn(2000))
    opt = adam_triton.AdamW8bit([p], block_size=512, min_8bit_size=100, fused=False)
    _steps(opt, [p], range(1))
    for other in (copy.deepcopy(opt), torch.load(_pickled(opt), weights_only=False)):
        assert other.param_groups[0]["block_size"] == 512 and other.param_groups[0]["min_8bit_size"] == 100
        assert other.param_groups[0]["decoupled_weight_decay"] is True


def _pickled(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


# ------------------------------------------------------------------ errors

@pytest.mark.parametrize("kwargs,message", [
    (dict(lr=-1.0), "Invalid learning rate: -1.0"),
    (dict(eps=-1e-8), "Invalid epsilon value: -1e-08"),
    (dict(betas=(1.0, 0.999)), "Invalid beta parameter at index 0: 1.0"),
    (dict(betas=(0.9, -0.1)), "Invalid beta parameter at index 1: -0.1"),
    (dict(weight_decay=-0.1), "Invalid weight_decay value: -0.1"),
    (dict(block_size=0), "Invalid block_size value: 0"),
    (dict(block_size=100), "Invalid block_size value: 100"),
    (dict(block_size=8192), "Invalid block_size value: 8192"),
    (dict(block_size=16), "Invalid block_size value: 16"),
    (dict(block_size=256.0), "Invalid block_size value: 256.0"),
    (dict(min_8bit_size=-1), "Invalid min_8bit_size value: -1"),
    (dict(max_grad_norm=-1.0), "Invalid max_grad_norm value: -1.0"),
])
def test_bad_values_raise_torch_style_value_errors(kwargs, message):
    for cls in (adam_triton.Adam8bit, adam_triton.AdamW8bit):
        with pytest.raises(ValueError, match="^" + re.escape(message)):
            cls([torch.nn.Parameter(torch.randn(3))], **kwargs)


def test_bad_group_changes_nothing():
    p, q = torch.nn.Parameter(torch.randn(5000)), torch.nn.Parameter(torch.randn(5000))
    opt = adam_triton.AdamW8bit([p], fused=False)
    with pytest.raises(ValueError, match="Invalid block_size value: 3"):
        opt.add_param_group(dict(params=[q], block_size=3))
    assert len(opt.param_groups) == 1
    _steps(opt, [p], range(1))
    # a block size changed under existing state: the step refuses before changing anything
    opt.param_groups[0]["block_size"] = 512
    before = p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}
    with pytest.raises(RuntimeError, match="exp_avg_absmax"):
        _steps(opt, [p], range(1, 2))
    assert torch.equal(p.detach(), before[0])
    assert all(torch.equal(opt.state[p][k], v) for k, v in before[1].items())


DTENSOR_SCRIPT = textwrap.dedent(r"""
    import os, sys
    import torch, torch.distributed as dist
    dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
    from torch.distributed.fsdp import fully_shard
    import adam_triton
    model = torch.nn.Linear(64, 96)
    fully_shard(model)
    try:
        adam_triton.AdamW8bit(model.parameters())
        print("ACCEPTED")
    except TypeError as e:
        print("REFUSED", e)
    adam_triton.AdamW(model.parameters())  # the fp32-state optimizer takes them
    sys.stdout.flush()
    os._exit(0)
""")


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed")
def test_dtensor_params_are_refused(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", DTENSOR_SCRIPT, str(tmp_path / "rdv")], env=env,
                          capture_output=True, text=True, timeout=240)
    out = proc.stdout.strip().splitlines()
    assert out and out[-1].startswith("REFUSED"), proc.stdout + proc.stderr[-3000:]
    assert "DTensor" in out[-1] and "FSDP2" in out[-1]
