"""8-bit block-wise quantization of optimizer states: the pieces an update kernel calls.

A state of n elements is stored as n uint8 codes and one fp32 absmax per block of QBLOCK
consecutive elements: s[i] = qmap[codes[i]] * absmax[i // QBLOCK] (adam_triton.reference
states the math; the kernels are tested against it code for code).

A kernel works on tiles of shape [ROWS, QBLOCK]: one row is one quantization block, so a
block lives in one program and its new absmax is a row maximum (tl.max over axis 1) —
dequantize, update in fp32, find the new absmax, requantize, all in registers.

The tables (map_tables, int32 words) come from global memory once per program and are looked
up with tl.gather, which the compiler serves from shared memory: no global load depends on
a code. Per map: its 256 sorted values (dequantize), its 255 sorted decision points t plus
an +inf pad; and one table of bucket bytes for the nearest-code search of both maps.

Nearest code (quantize): code(y) = #{i : t[i] <= y}. The bits of |y| above the low SHIFT
bits (its exponent and top BUCKET_BITS mantissa bits), clamped to the binades from 2^MIN_EXP
to 2, pick one of HALF buckets per sign (signed map: 2 * HALF buckets in value order;
unsigned map: y clamped at 0, HALF buckets), each an interval of fp32 values. The bucket's
byte is c, the number of decision points below the bucket (at most 256 - K), and at most K
decision points lie in it, so code = c + #{j < K : t[c + j] <= y}: one gather of c and K
independent gathers and compares, exact by construction (the table builder checks K for the
map; a test checks the search against torch.bucketize, and benchmarks/check_bucket_search.py
checks it on every fp32 value with |y| <= 2.5 of both signs).
"""

import torch
import triton
import triton.language as tl

INF = tl.constexpr(float("inf"))
NAN_BITS = tl.constexpr(0x7FC00000)  # a NaN global would never compare equal to itself (Triton rejects it)
FLT_MAX = tl.constexpr(3.4028234663852886e38)
TWO_64 = tl.constexpr(2.0**64)
TWO_M64 = tl.constexpr(2.0**-64)

# The bucket search. 5 mantissa bits leave at most 2 decision points of the signed dynamic
# map and 3 of the unsigned one in a bucket (4 bits: 3 and 5; 6 bits: 1 and 2, with twice the
# table); below 2^-20 (9.5e-7) the maps have 1 (signed) and 2 (unsigned) points per sign.
BUCKET_BITS = 5
MIN_EXP = -20
SHIFT = 23 - BUCKET_BITS
BASE = (127 + MIN_EXP) << BUCKET_BITS  # bits of 2^MIN_EXP >> SHIFT
# buckets per sign: [0, 2^MIN_EXP), the 2^BUCKET_BITS buckets of each binade up to 2, [2, inf]
HALF = (128 << BUCKET_BITS) - BASE + 2
# One table of bucket bytes, 4 a word: the signed map's 2 * HALF buckets, then the unsigned
# map's HALF buckets of y >= 0 (quantize clamps y at 0 for it: every point of that map is > 0,
# so a y below 0 has the code of 0). 1348 + 674 bytes in 512 words.
UNSIGNED_AT = 2 * HALF
BUCKET_WORDS = 512
K_SIGNED, K_UNSIGNED = 2, 3  # decision points a bucket may hold (map_tables checks them)
# the same numbers for the kernels (a jit function reads only constexpr globals)
_SHIFT, _BASE, _HALF, _UNSIGNED_AT = tl.constexpr(SHIFT), tl.constexpr(BASE), tl.constexpr(HALF), tl.constexpr(UNSIGNED_AT)
_K_SIGNED, _K_UNSIGNED = tl.constexpr(K_SIGNED), tl.constexpr(K_UNSIGNED)
# word offsets of the tables in map_tables
SIGNED_VALUES, SIGNED_POINTS, UNSIGNED_VALUES, UNSIGNED_POINTS, BUCKETS = 0, 256, 512, 768, 1024
MAP_WORDS = 1024 + BUCKET_WORDS


def _f32(bits):
    return torch.tensor(bits, dtype=torch.int32).view(torch.float32)


def bucket_bounds(signed=True):
    """fp32 [n, 2]: the smallest and largest value of each bucket in index order, which is value
    order. Signed: 2 * HALF buckets, HALF - 1 down to 0 hold the negative values by magnitude
    (-0.0 ends bucket HALF - 1), HALF up the rest. Unsigned: the HALF buckets of values >= 0."""
    k = torch.arange(HALF, dtype=torch.int64)
    lo = torch.where(k == 0, 0, (BASE + k - 1) << SHIFT)
    hi = torch.where(k == HALF - 1, 0x7F800000, ((BASE + k) << SHIFT) - 1)
    lo, hi = _f32(lo.int().tolist()), _f32(hi.int().tolist())
    pos = torch.stack([lo, hi], 1)
    return torch.cat([torch.stack([-hi, -lo], 1).flip(0), pos]) if signed else pos


def bucket_bytes(points, k, signed):
    """int64 per bucket of bucket_bounds(signed): min(#{points < the bucket's smallest value},
    256 - k). Raises ValueError where a bucket holds more than k of the sorted points."""
    bounds = bucket_bounds(signed)
    below = torch.searchsorted(points, bounds[:, 0].contiguous(), right=False)  # points < lo
    upto = torch.searchsorted(points, bounds[:, 1].contiguous(), right=True)  # points <= hi
    if (upto - below).max() > k:
        raise ValueError(f"a bucket holds {int((upto - below).max())} decision points (at most {k})")
    return below.clamp(max=256 - k)


def map_tables(signed_map, unsigned_map):
    """int32 [MAP_WORDS]: per map (signed, unsigned) the bits of its 256 fp32 values, of its
    255 decision points (qmap[i] + qmap[i+1]) / 2 (fp32) and an +inf pad; then the bucket
    bytes of both maps (bucket_bytes), 4 a word, little end first."""
    rows, buckets = [], []
    for q, k, signed in ((signed_map, K_SIGNED, True), (unsigned_map, K_UNSIGNED, False)):
        q = q.to(torch.float32)
        points = (q[:-1] + q[1:]) / 2
        rows += [q, torch.cat([points, torch.full((1,), float("inf"))])]
        buckets.append(bucket_bytes(points, k, signed))
    c = torch.zeros(4 * BUCKET_WORDS, dtype=torch.int64)
    c[: 3 * HALF] = torch.cat(buckets)
    words = (c.view(-1, 4) << torch.tensor([0, 8, 16, 24])).sum(1)
    words = ((words + 2**31) % 2**32 - 2**31).to(torch.int32)
    return torch.cat([r.view(torch.int32) for r in rows] + [words]).contiguous()


def map_parts(table, signed):
    """(values, decision points, bucket words) of one map in a map_tables table: fp32 [256],
    fp32 [256] (+inf padded), int32 [BUCKET_WORDS] (the words of both maps)."""
    values, points = (SIGNED_VALUES, SIGNED_POINTS) if signed else (UNSIGNED_VALUES, UNSIGNED_POINTS)
    return (table[values:values + 256].view(torch.float32), table[points:points + 256].view(torch.float32),
            table[BUCKETS:BUCKETS + BUCKET_WORDS])


def search(y, points, buckets, signed):
    """The codes the kernels' search gives fp32 y with a map's decision points and the bucket
    words (map_parts), in torch: for tests."""
    if not signed:
        y = y.clamp(min=0.0)
    b = y.contiguous().view(torch.int32).to(torch.int64)
    kk = (((b & 0x7FFFFFFF) >> SHIFT) - (BASE - 1)).clamp(0, HALF - 1)
    idx = torch.where(b < 0, HALF - 1 - kk, HALF + kk) if signed else UNSIGNED_AT + kk
    c = (buckets.to(torch.int64)[idx >> 2] >> ((idx & 3) * 8)) & 0xFF
    return c + sum((points[c + j] <= y).long() for j in range(K_SIGNED if signed else K_UNSIGNED))


@triton.jit
def load_words(maps_ptr, OFFSET: tl.constexpr, N: tl.constexpr):
    """Words [OFFSET, OFFSET + N) of the map tables (int32, kept in registers by the caller)."""
    return tl.load(maps_ptr + OFFSET + tl.arange(0, N))


@triton.jit
def load_map(maps_ptr, OFFSET: tl.constexpr):
    """A map's values or decision points as a [256] fp32 tensor."""
    return load_words(maps_ptr, OFFSET, 256).to(tl.float32, bitcast=True)


@triton.jit
def dequantize(codes, absmax, values, N: tl.constexpr):
    """fp32 [ROWS, QBLOCK] values of uint8 codes [ROWS, QBLOCK] (N elements) with their
    blocks' absmax [ROWS]: values[codes] * absmax, one fp32 product (NaN absmax gives NaN).
    (tl.gather takes operands of one rank: the tile is flattened and back.)"""
    flat = tl.reshape(codes.to(tl.int32), [N])
    return tl.reshape(tl.gather(values, flat, 0), codes.shape) * absmax[:, None]


@triton.jit
def block_absmax(x, mask):
    """Each row's max |x| ([ROWS] fp32) over the lanes where mask holds (mask may be None).
    A row with a NaN or an inf gets NaN; an all-zero row gets 0. NaN is mapped to +inf
    before tl.max, so the result does not depend on how max treats NaN."""
    a = tl.abs(x)
    a = tl.where(a == a, a, INF)
    if mask is not None:
        a = tl.where(mask, a, 0.0)
    m = tl.max(a, axis=1)
    return tl.where(m <= FLT_MAX, m, tl.full(m.shape, NAN_BITS, tl.int32).to(tl.float32, bitcast=True))


@triton.jit
def quantize(x, absmax, points, buckets, SIGNED: tl.constexpr, N: tl.constexpr):
    """uint8 codes [ROWS, QBLOCK] of fp32 x [ROWS, QBLOCK] (N elements) with their blocks'
    absmax [ROWS]: y = x * (1 / absmax) (the reciprocal an IEEE division per block, the
    product rounded on its own; y = 0 where absmax is 0 or NaN; x and absmax both scaled by
    2^64 for an absmax below 2^-64, by 2^-64 above 2^64), code = #{i : t[i] <= y} over the
    map's 255 sorted decision points t (`points`, +inf padded): the nearest map value, a tie
    going up. The bucket search of the module docstring: y's bucket from its bits (SIGNED:
    the signed map's buckets; else the unsigned map's, with y clamped at 0), c from the bucket
    bytes, then K compares with t[c], ..., t[c + K - 1] (K_SIGNED or K_UNSIGNED)."""
    ok = absmax > 0
    # both scaled by a power of two where the reciprocal would overflow or be subnormal
    scale = tl.where(absmax < TWO_M64, TWO_64, tl.where(absmax > TWO_64, TWO_M64, 1.0))
    inv = tl.div_rn(tl.full(absmax.shape, 1.0, tl.float32), tl.where(ok, absmax * scale, 1.0))
    y = tl.where(ok[:, None], (x * scale[:, None]) * inv[:, None], 0.0)
    y = tl.reshape(y, [N])  # (tl.gather takes operands of one rank)
    if not SIGNED:
        y = tl.maximum(y, 0.0)
    bits = y.to(tl.int32, bitcast=True)
    k = tl.minimum(tl.maximum(((bits & 0x7FFFFFFF) >> _SHIFT) - (_BASE - 1), 0), _HALF - 1)
    if SIGNED:
        idx = tl.where(bits < 0, _HALF - 1 - k, _HALF + k)
        K: tl.constexpr = _K_SIGNED
    else:
        idx = _UNSIGNED_AT + k
        K: tl.constexpr = _K_UNSIGNED
    c = (tl.gather(buckets, idx >> 2, 0) >> ((idx & 3) * 8)) & 0xFF
    code = c
    for j in tl.static_range(K):
        code += tl.where(tl.gather(points, c + j, 0) <= y, 1, 0)
    return tl.reshape(code.to(tl.uint8), x.shape)
