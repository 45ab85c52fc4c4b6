"""8-bit block-wise Adam states: the plain-PyTorch reference (maps, quantize/dequantize, the
Adam step on quantized states) against float64 and hand-worked numbers; the kernels' map
tables; the comparison with bitsandbytes (when installed); and training quality (an MLP and a
tiny transformer LM, adam_triton.AdamW8bit's kernel path vs torch.optim.AdamW). The
optimizers themselves: tests/test_adam8bit_optim.py."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl
from _util import FP32_TOL
from test_launches import launches  # noqa: F401  (the fixture)
from torch import nn

import adam_triton
from adam_triton import reference as ref
from adam_triton.kernels import quant8

HERE = Path(__file__).parent
SIGNED, UNSIGNED = ref.dynamic_map(True), ref.dynamic_map(False)
ZERO_CODE = {True: 127, False: 0}  # the code of 0 on the signed / unsigned map
ODD_SIZES = [1, 6, 255, 256, 257, 1000, 4097]


def qmap_of(signed):
    return SIGNED if signed else UNSIGNED


def sample(n, signed, gen, spread=True):
    """n values with a spread of magnitudes (signed: any sign; unsigned: >= 0)."""
    x = torch.randn(n, generator=gen)
    if spread:
        x = x * torch.exp(3 * torch.randn(n, generator=gen))
    return x if signed else x * x


# ------------------------------------------------------------------ the dynamic maps

@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_shape_and_landmarks(signed):
    q = qmap_of(signed)
    assert q.dtype == torch.float32 and q.shape == (256,)
    assert bool((q[1:] > q[:-1]).all())  # sorted, every value distinct
    assert q[255].item() == 1.0
    assert int((q == 0).nonzero()) == ZERO_CODE[signed]
    if signed:
        # 127 values each side of 0, mirrored; the most negative is -(1 + 0.9859375) / 2, not -1
        assert int((q < 0).sum()) == 127 and int((q > 0).sum()) == 128
        assert torch.equal(-q[:127].flip(0), q[128:255])
        assert q[0].item() == pytest.approx(-0.99296875, abs=1e-7)
        assert q[128].item() == pytest.approx(5.5e-7, rel=1e-6)  # smallest magnitude: 10^-6 * 0.55
    else:
        assert q[0].item() == 0.0 and q[1].item() == pytest.approx(3.25e-7, rel=1e-6)


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_decades_match_the_published_construction_in_float64(signed):
    # decade k (10^(k-6)) holds 2^k (signed, per sign) or 2^(k+1) values: the midpoints of an
    # even grid over [0.1, 1], scaled; each fp32 value within 1 ulp of the exact number
    q = qmap_of(signed).double()
    pos = q[q > 0][:-1]  # without the 1
    expected = []
    for k in range(7):
        n = 2**k if signed else 2 ** (k + 1)
        grid = [0.1 + 0.9 * j / n for j in range(n + 1)]
        expected += [10.0 ** (k - 6) * (grid[j] + grid[j + 1]) / 2 for j in range(n)]
    expected = torch.tensor(sorted(expected), dtype=torch.float64)
    assert pos.shape == expected.shape
    assert torch.allclose(pos, expected, rtol=3e-7, atol=0)


@pytest.mark.parametrize("signed", [True, False])
def test_thresholds_give_the_nearest_code(signed):
    q = qmap_of(signed)
    t = ref.code_thresholds(q)
    assert t.shape == (255,) and bool((t > q[:-1]).all() and (t < q[1:]).all())
    # brute force in float64: every normalized value's code is a nearest map value
    gen = torch.Generator().manual_seed(1)
    y = torch.cat([torch.rand(20000, generator=gen) * (2 if signed else 1) - (1 if signed else 0),
                   q, t, torch.nextafter(t, torch.full_like(t, -2.0))])
    codes = ref.quantize_with_absmax(y, torch.ones(math.ceil(y.numel() / 256)), q)
    dist = (y.double()[:, None] - q.double()[None, :]).abs()
    best = dist.min(dim=1).values
    got = dist.gather(1, codes.long()[:, None])[:, 0]
    # equal to the best distance, or a tie decided by the fp32 decision point (within 1 ulp)
    assert bool((got <= best + 6e-8).all())
    # the map's own values are fixed points; a decision point goes up, 1 ulp below it goes down
    assert torch.equal(codes[20000:20256].long(), torch.arange(256))
    assert torch.equal(codes[20256:20511].long(), torch.arange(1, 256))
    assert torch.equal(codes[20511:].long(), torch.arange(0, 255))


# ------------------------------------------------------------------ quantize / dequantize

@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("n", ODD_SIZES)
@pytest.mark.parametrize("block_size", [64, 256, 2048])
def test_round_trip_error_bound_and_absmax(signed, n, block_size):
    q = qmap_of(signed)
    gen = torch.Generator().manual_seed(n + block_size)
    x = sample(n, signed, gen)
    codes, absmax = ref.quantize_blockwise(x, q, block_size)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    assert absmax.dtype == torch.float32 and absmax.shape == (math.ceil(n / block_size),)
    # absmax: each block's max |x|, the last block over its own (fewer) elements only
    x64 = x.double()
    for b in range(absmax.numel()):
        assert absmax[b].item() == x[b * block_size:(b + 1) * block_size].abs().max().item()
    # the normalized value lies in its code's interval [t[c-1], t[c]] (float64, 1 ulp slack)
    t = ref.code_thresholds(q).double()
    lo = torch.cat([t.new_full((1,), -math.inf), t])
    hi = torch.cat([t, t.new_full((1,), math.inf)])
    c = codes.long()
    y = x64 / absmax.double().repeat_interleave(block_size)[:n]
    assert bool(((y >= lo[c] - 1.2e-7) & (y <= hi[c] + 1.2e-7)).all())
    # error of the round trip: at most half the largest gap, times absmax
    back = ref.dequantize_blockwise(codes, absmax, q, block_size)
    assert back.dtype == torch.float32 and back.shape == x.shape
    half_gap = ((q[1:] - q[:-1]).max() / 2).item()  # signed 0.00703, unsigned 0.00352
    scale = absmax.double().repeat_interleave(block_size)[:n]
    # (+ one fp32 rounding of the product; -absmax comes back as -0.99297 absmax: 0.00703 off)
    assert bool(((back.double() - x64).abs() <= (half_gap + 2.0**-23) * scale).all())
    assert half_gap == pytest.approx(0.0070312 if signed else 0.0035156, rel=1e-4)


@pytest.mark.parametrize("signed", [True, False])
def test_codes_of_hand_picked_values(signed):
    q = qmap_of(signed)
    a = 2.0  # the block's absmax
    vals = [0.0, a, 0.5 * a, 1e-9, q[200].item() * a]
    want = [ZERO_CODE[signed], 255, int((q - 0.5).abs().argmin()), ZERO_CODE[signed], 200]
    if signed:
        vals += [-a, -0.5 * a, -1e-9, q[3].item() * a]
        want += [0, int((q + 0.5).abs().argmin()), 127, 3]
    codes, absmax = ref.quantize_blockwise(torch.tensor(vals), q)
    assert absmax.tolist() == [a]
    assert codes.tolist() == want
    # -absmax comes back as -0.99297 absmax: the signed map has no -1 (bitsandbytes' map)
    if signed:
        assert ref.dequantize_blockwise(codes, absmax, q)[5].item() == pytest.approx(-0.99296875 * a, rel=1e-7)


def test_zero_blocks_negative_zero_and_shapes():
    x = torch.zeros(3, 200)
    x[2, 150:] = torch.linspace(-1, 1, 50)  # only the third 256-block is non-zero
    x[0, 7] = -0.0
    for signed in (True, False):
        xs = x if signed else x.abs()
        codes, absmax = ref.quantize_blockwise(xs, qmap_of(signed))
        assert codes.shape == (3, 200) and absmax.tolist() == [0.0, 0.0, 1.0]
        assert bool((codes.reshape(-1)[:512] == ZERO_CODE[signed]).all())
        back = ref.dequantize_blockwise(codes, absmax, qmap_of(signed))
        assert bool((back.reshape(-1)[:512] == 0).all())
        # -0.0 gets the code of 0 and comes back as +0.0
        assert back[0, 7].item() == 0.0 and math.copysign(1, back[0, 7].item()) == 1.0
    # a fresh 8-bit state (zero codes of 0 and absmax 0) is quantize(zeros)
    codes, absmax = ref.quantize_blockwise(torch.zeros(1000), SIGNED)
    assert bool((codes == 127).all()) and absmax.tolist() == [0.0] * 4


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_nonfinite_value_poisons_exactly_its_block(bad):
    x = torch.randn(1000, generator=torch.Generator().manual_seed(3))
    x[300] = bad  # block 1
    codes, absmax = ref.quantize_blockwise(x, SIGNED)
    assert math.isnan(absmax[1].item()) and bool(torch.isfinite(absmax[[0, 2, 3]]).all())
    assert bool((codes[256:512] == 127).all())  # the block's codes: the code of 0
    back = ref.dequantize_blockwise(codes, absmax, SIGNED)
    assert bool(back[256:512].isnan().all()) and bool(back[:256].isfinite().all() and back[512:].isfinite().all())
    # the other blocks are quantized exactly as without the bad value
    x[300] = 0.0
    codes2, absmax2 = ref.quantize_blockwise(x, SIGNED)
    assert torch.equal(codes[:256], codes2[:256]) and torch.equal(codes[512:], codes2[512:])


def test_tiny_and_huge_blocks():
    # subnormal and near-FLT_MAX absmax: the reciprocal is taken of absmax scaled by a power of
    # two where it would overflow or be subnormal, so the codes are those of a normal absmax
    unit = torch.linspace(-1, 1, 256)
    unit_codes, _ = ref.quantize_blockwise(unit, SIGNED)
    for scale in (1e-40, 1e-30, 3e38):
        x = unit * scale
        codes, absmax = ref.quantize_blockwise(x, SIGNED)
        assert absmax.item() == x.abs().max().item() > 0
        assert codes[0].item() == 0 and codes[255].item() == 255
        back = ref.dequantize_blockwise(codes, absmax, SIGNED)
        assert bool(back.isfinite().all())
        assert bool(((back.double() - x.double()).abs() <= 0.00704 * absmax.item() + 2.0**-149).all())
        if scale > 1e-37:  # a normal absmax: the same codes as at scale 1
            assert torch.equal(codes, unit_codes)


# ------------------------------------------------------------------ the 8-bit Adam step

def quantized_state(n, signed, gen, scale):
    x = sample(n, signed, gen, spread=False) * scale
    return [t.clone() for t in ref.quantize_blockwise(x, qmap_of(signed))]


def assert_nearest(codes, absmax, x64, q, block_size=256, slack=1.2e-7):
    """codes are nearest codes of the float64 values x64 with absmax (up to fp32 slack)."""
    t = ref.code_thresholds(q).double()
    lo = torch.cat([t.new_full((1,), -math.inf), t])
    hi = torch.cat([t, t.new_full((1,), math.inf)])
    c = codes.reshape(-1).long()
    a = absmax.double().repeat_interleave(block_size)[:c.numel()]
    y = torch.where(a > 0, x64.reshape(-1) / a, 0.0)
    assert bool(((y >= lo[c] - slack) & (y <= hi[c] + slack)).all())


CASES = [
    dict(),
    dict(weight_decay=0.1, decoupled_weight_decay=True),
    dict(weight_decay=0.1),
    dict(amsgrad=True),
    dict(maximize=True, grad_scale=64.0),
    dict(beta1=0.3, amsgrad=True, weight_decay=0.05, decoupled_weight_decay=True),  # lerp weight >= 0.5
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(c) or "plain")
@pytest.mark.parametrize("n", [1000, 4097])
def test_adam8bit_step_against_float64(case, n):
    """From quantized states: params as float64 Adam on the dequantized states (fp32
    tolerance), new absmax = max |fp64 state| per block, codes nearest to the fp64 states."""
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8)
    hyper.update(case)
    amsgrad = hyper.get("amsgrad", False)
    gen = torch.Generator().manual_seed(n)
    for step0 in (0.0, 7.0):
        p = torch.randn(n, generator=gen)
        g = torch.randn(n, generator=gen) * 1e-2
        m = quantized_state(n, True, gen, 1e-2)
        v = quantized_state(n, False, gen, 1e-2)
        vmax = quantized_state(n, False, gen, 1e-2) if amsgrad else None
        # float64 torch-math on the dequantized states
        p64, g64 = p.double(), g.double()
        m64 = ref.dequantize_blockwise(*m, SIGNED).double()
        v64 = ref.dequantize_blockwise(*v, UNSIGNED).double()
        vmax64 = ref.dequantize_blockwise(*vmax, UNSIGNED).double() if amsgrad else None
        ref.adam_step([p64], [g64], [m64], [v64], [vmax64], [torch.tensor(step0)], **hyper)
        # the 8-bit step
        ref.adam8bit_step([p], [g], [m], [v], [vmax], [torch.tensor(step0)], **hyper)
        torch.testing.assert_close(p.double(), p64, **FP32_TOL)
        for (codes, absmax), x64, q in [(m, m64, SIGNED), (v, v64, UNSIGNED)] + (
                [(vmax, vmax64, UNSIGNED)] if amsgrad else []):
            torch.testing.assert_close(absmax.double(), ref.block_absmax(x64.float()).double(), rtol=1e-6, atol=0)
            assert_nearest(codes, absmax, x64, q)


def test_adam8bit_all_zero_grads_from_zero_state():
    n = 700
    p0 = torch.randn(n)
    for wd, decoupled in [(0.0, False), (0.1, True)]:
        p = p0.clone()
        m = [torch.full((n,), 127, dtype=torch.uint8), torch.zeros(3)]
        v = [torch.zeros(n, dtype=torch.uint8), torch.zeros(3)]
        ref.adam8bit_step([p], [torch.zeros(n)], [m], [v], None, [torch.tensor(0.0)], lr=1e-2,
                          beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=wd, decoupled_weight_decay=decoupled)
        assert m[1].tolist() == [0.0] * 3 and v[1].tolist() == [0.0] * 3
        assert bool((m[0] == 127).all()) and bool((v[0] == 0).all())
        assert torch.equal(p, p0 * ref._f32(1 - 1e-2 * wd))  # only the decoupled decay moves p


def test_adam8bit_nan_grad_spreads_to_its_block_only():
    n = 1000
    p = torch.randn(n)
    g = torch.randn(n)
    g[300] = math.nan
    m = [torch.full((n,), 127, dtype=torch.uint8), torch.zeros(4)]
    v = [torch.zeros(n, dtype=torch.uint8), torch.zeros(4)]
    step = torch.tensor(0.0)
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8)
    ref.adam8bit_step([p], [g], [m], [v], None, [step], **hyper)
    # step 1: only that param is NaN (as torch), but block 1 of both states is now NaN
    assert p.isnan().nonzero().flatten().tolist() == [300]
    assert math.isnan(m[1][1].item()) and math.isnan(v[1][1].item())
    ref.adam8bit_step([p], [torch.randn(n)], [m], [v], None, [step], **hyper)
    # step 2: the whole block (256..511) is NaN; the other blocks are finite
    assert p.isnan().nonzero().flatten().tolist() == list(range(256, 512))


# ------------------------------------------------------------------ the kernels' map tables

def _hard_values(q):
    """fp32 values where a nearest-code search can go wrong: every map value and decision
    point and their neighbours 1-2 ulps away, every bucket's first and last value and their
    neighbours, zeros of both signs, +-1 and beyond, and random values of every magnitude."""
    t = ref.code_thresholds(q)
    gen = torch.Generator().manual_seed(2)
    rand = torch.randn(20000, generator=gen) * torch.exp(4 * torch.randn(20000, generator=gen))
    bounds = quant8.bucket_bounds(signed=True).flatten()
    bounds = bounds[bounds.isfinite()]
    y = torch.cat([q, t, bounds, rand.clamp(-1.5, 1.5), torch.tensor([0.0, -0.0, 1.0, -1.0, 2.0, -2.0, 3e38, -3e38])])
    near = [y]
    for d in (1, 2):
        for direction in (math.inf, -math.inf):
            x = y
            for _ in range(d):
                x = torch.nextafter(x, torch.full_like(x, direction))
            near.append(x)
    return torch.cat(near)


@pytest.mark.parametrize("signed", [True, False])
def test_map_tables_hold_the_values_the_decision_points_and_a_bucket_search(signed):
    """kernels/quant8.py's tables: the map's values, its decision points (+inf padded), and
    bucket bytes with which the kernels' search (quant8.search is its torch form) gives the
    reference's code (torch.bucketize) on the values where it could go wrong."""
    q = qmap_of(signed)
    table = quant8.map_tables(SIGNED, UNSIGNED)
    assert table.shape == (quant8.MAP_WORDS,) and table.dtype == torch.int32 and table.is_contiguous()
    values, points, buckets = quant8.map_parts(table, signed)
    k = quant8.K_SIGNED if signed else quant8.K_UNSIGNED
    t = ref.code_thresholds(q)
    assert torch.equal(values, q) and torch.equal(points[:255], t) and points[255] == math.inf
    y = _hard_values(q)
    assert torch.equal(quant8.search(y, points, buckets, signed), torch.bucketize(y, t, right=True))
    # fewer compares than the map needs: the builder refuses
    with pytest.raises(ValueError, match="decision points"):
        quant8.bucket_bytes(t, k - 1, signed)


@triton.jit
def _quantize_kernel(x_ptr, codes_ptr, maps_ptr, POINTS: tl.constexpr, SIGNED: tl.constexpr, ROWS: tl.constexpr,
                     QBLOCK: tl.constexpr):
    offs = tl.arange(0, ROWS)[:, None] * QBLOCK + tl.arange(0, QBLOCK)[None, :]
    x = tl.load(x_ptr + offs)
    points = quant8.load_map(maps_ptr, POINTS)
    buckets = quant8.load_words(maps_ptr, quant8.BUCKETS, quant8.BUCKET_WORDS)
    codes = quant8.quantize(x, quant8.block_absmax(x, None), points, buckets, SIGNED, ROWS * QBLOCK)
    tl.store(codes_ptr + offs, codes)


@pytest.mark.parametrize("signed", [True, False])
def test_kernel_quantize_gives_the_nearest_code_of_every_hard_value(signed):
    """The kernels' quantize (kernels/quant8.py, run by the interpreter here) on blocks whose
    absmax is 1, so y is x itself: every hard value gets torch.bucketize's code."""
    q = qmap_of(signed)
    y = _hard_values(q).clamp(-1.0, 1.0)
    y = y if signed else torch.cat([y.abs(), -y.abs()])  # (the unsigned map: y < 0 has the code of 0)
    qblock = 256
    n_blocks = -(-y.numel() // (qblock - 1))
    x = torch.zeros(n_blocks, qblock)
    x[:, 0] = 1.0  # each block's absmax
    flat = x[:, 1:].reshape(-1)
    flat[: y.numel()] = y
    x[:, 1:] = flat.view(n_blocks, qblock - 1)
    rows = 8
    n_blocks_padded = -(-n_blocks // rows) * rows
    x = torch.cat([x, torch.ones(n_blocks_padded - n_blocks, qblock)])
    codes = torch.empty(x.shape, dtype=torch.uint8)
    maps = quant8.map_tables(SIGNED, UNSIGNED)
    points_at = quant8.SIGNED_POINTS if signed else quant8.UNSIGNED_POINTS
    for r in range(0, n_blocks_padded, rows):
        _quantize_kernel[(1,)](x[r:r + rows], codes[r:r + rows], maps, points_at, signed, rows, qblock)
    want = torch.bucketize(x, ref.code_thresholds(q), right=True)
    assert torch.equal(codes.long(), want)
    assert torch.equal(codes, ref.quantize_with_absmax(x, torch.ones(n_blocks_padded), q, qblock).view(x.shape))


# ------------------------------------------------------------------ against bitsandbytes

def test_against_bitsandbytes_adamw8bit():
    """benchmarks/compare_bnb_8bit.py's numbers (bitsandbytes 0.50.2, CPU): in lockstep every
    differing code is one where bitsandbytes' CPU quantizer is not nearest; absmax within a few ulps."""
    pytest.importorskip("bitsandbytes")
    # loaded from its file: benchmarks/ on sys.path would shadow tests/conftest.py for processes
    # spawned later (tests/test_distributed.py's workers import it)
    spec = importlib.util.spec_from_file_location("compare_bnb_8bit", HERE.parent / "benchmarks" / "compare_bnb_8bit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    compare = module.compare

    out = compare(numel=16384, steps=10)
    lock = out["lockstep"]
    differ = lock["codes"] - lock["exp_avg_equal"] - lock["exp_avg_sq_equal"]
    assert lock["other"] == 0 and lock["tie"] == 0 and differ == lock["quantizer"]
    # the fp32 states differ by a few ulps (b1·m + (1-b1)·g against lerp): so do some absmax
    assert lock["absmax1_max_ulps"] <= 4 and lock["absmax2_max_ulps"] <= 4
    assert lock["replica_absmax_equal"] == 2 * lock["absmax_blocks"]
    assert lock["quantizer"] <= 0.01 * lock["codes"]
    assert lock["param_max_abs_diff"] <= 1e-7
    free = out["free"]
    assert free["exp_avg_codes_equal"] >= 0.99 * out["numel"] and free["exp_avg_sq_codes_equal"] >= 0.97 * out["numel"]
    assert free["param_mean_abs_diff"] <= 1e-3 * free["param_max_abs_change"]


def test_maps_equal_bitsandbytes_and_torchao_maps():
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    assert torch.equal(bnb_f.create_dynamic_map(signed=True), SIGNED)
    assert torch.equal(bnb_f.create_dynamic_map(signed=False), UNSIGNED)
    qu = pytest.importorskip("torchao.optim.quant_utils")
    assert torch.equal(torch.tensor(qu.create_dynamic_map(True)), SIGNED)
    assert torch.equal(torch.tensor(qu.create_dynamic_map(False)), UNSIGNED)


# ------------------------------------------------------------------ training quality

def mlp_task():
    """A 3-layer MLP classifying 16-d inputs labelled by a random teacher, 10% of the labels
    replaced by random ones (so the loss has a floor); fresh seeded batches every step."""
    teacher = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))

    def sample_batch(b, seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(b, 16, generator=g)
        y = (x @ teacher).argmax(1)
        noise = torch.rand(b, generator=g) < 0.1
        return x, torch.where(noise, torch.randint(0, 8, (b,), generator=g), y)

    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 8))
    return model, lambda step: sample_batch(128, 1000 + step), sample_batch(2048, 7), nn.functional.cross_entropy


class TinyLM(nn.Module):
    """A 2-layer causal transformer LM: d_model 32, 2 heads, vocabulary 16, context 16."""

    def __init__(self, vocab=16, d=32, ctx=16):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(ctx, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, 2, 64, dropout=0.0, batch_first=True)
        self.blocks = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(ctx))

    def forward(self, idx):
        h = self.tok(idx) + self.pos[: idx.shape[1]]
        return self.head(self.blocks(h, mask=self.mask[: idx.shape[1], : idx.shape[1]], is_causal=True))


def lm_task():
    """Sequences from a random sparse second-order Markov chain over 16 tokens (learnable
    only with attention to two tokens back; its entropy floors the loss)."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 16, 16, generator=gen) * 3
    probs = logits.softmax(-1)

    def sample(b, seed):
        g = torch.Generator().manual_seed(seed)
        seq = torch.randint(0, 16, (b, 17), generator=g)
        for t in range(2, 17):
            seq[:, t] = torch.multinomial(probs[seq[:, t - 2], seq[:, t - 1]], 1, generator=g)[:, 0]
        return seq[:, :-1], seq[:, 1:]

    x, y = sample(32 * 300, 1000)  # the training batches (300 steps), drawn at once
    torch.manual_seed(1)
    model = TinyLM()

    def loss_fn(out, y):
        return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))

    return model, lambda step: (x[32 * step:32 * (step + 1)], y[32 * step:32 * (step + 1)]), sample(256, 7), loss_fn


def train(task, make_opt, steps, device):
    """Train the task's model on device with make_opt(params); the held-out loss at the end
    and at the start, and the optimizer."""
    model, batches, (xv, yv), loss_fn = task()
    model.to(device)
    xv, yv = xv.to(device), yv.to(device)
    opt = make_opt(model.parameters())
    with torch.no_grad():
        start = loss_fn(model(xv), yv).item()
    for step in range(steps):
        x, y = (t.to(device) for t in batches(step))
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        return loss_fn(model(xv), yv).item(), start, opt


# (task, steps, lr, min_8bit_size): the MLP's three weight matrices (97% of its params) and
# the LM's attention and feed-forward matrices (8 tensors, 88% of its params) get 8-bit states
TRAIN_CASES = {"mlp": (mlp_task, 300, 3e-3, 256), "tiny-lm": (lm_task, 300, 3e-3, 1024)}


def adamw8bit(params, lr, min_8bit_size):
    """AdamW8bit as the test trains with it: the 8-bit tensors on the kernel path, the small
    ones (fp32 states either way) in a group with fused=False, the same fp32 AdamW math in
    PyTorch, which keeps the interpreter's time for the 8-bit kernel."""
    params = list(params)
    groups = [dict(params=[p for p in params if p.numel() >= min_8bit_size]),
              dict(params=[p for p in params if p.numel() < min_8bit_size], fused=False)]
    return adam_triton.AdamW8bit(groups, lr=lr, weight_decay=0.01, min_8bit_size=min_8bit_size)


@pytest.fixture
def one_thread():
    # small tensors: one intra-op thread is several times faster on a busy 2-core machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("name", list(TRAIN_CASES))
def test_training_quality_8bit_adamw_within_2_percent_of_adamw(name, device, one_thread, launches):  # noqa: F811
    """A few hundred steps from the same start on the same batches: AdamW8bit's held-out loss
    within 2% of torch.optim.AdamW's; every step's 8-bit update is one kernel launch."""
    task, steps, lr, min_8bit = TRAIN_CASES[name]
    torch.manual_seed(0)
    loss32, start, _ = train(task, lambda ps: torch.optim.AdamW(ps, lr=lr, weight_decay=0.01), steps, device)
    torch.manual_seed(0)
    del launches[:]
    loss8, start8, opt = train(task, lambda ps: adamw8bit(ps, lr, min_8bit), steps, device)
    n_8bit = sum("exp_avg_codes" in st for st in opt.state.values())
    n_params = sum(p.numel() for p in opt.state)
    n_8bit_params = sum(p.numel() for p, st in opt.state.items() if "exp_avg_codes" in st)
    print(f"{name}: start {start:.4f}, AdamW {loss32:.4f}, AdamW8bit {loss8:.4f} ({(loss8 - loss32) / loss32:+.2%}; "
          f"{n_8bit} of {len(opt.state)} tensors, {n_8bit_params} of {n_params} params 8-bit)")
    assert start8 == start
    assert n_8bit >= 3 and n_8bit_params >= 0.85 * n_params  # the weight matrices took the 8-bit path
    assert [name for name, _ in launches].count("_adam8bit_kernel") == steps  # ... on the kernel
    assert loss32 < 0.7 * start  # it trained
    assert abs(loss8 - loss32) <= 0.02 * loss32
