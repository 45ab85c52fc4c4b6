"""8-bit block-wise quantization of optimizer states: the pieces an update kernel calls.

A state of n elements is stored as n uint8 codes and one fp32 absmax per block of QBLOCK
consecutive elements: s[i] = qmap[codes[i]] * absmax[i // QBLOCK] (adam_triton.reference
states the math; the kernels are tested against it code for code).

A kernel works on tiles of shape [ROWS, QBLOCK]: one row is one quantization block, so a
block lives in one program and its new absmax is a row maximum (tl.max over axis 1) —
dequantize, update in fp32, find the new absmax, requantize, all in registers.

The two maps come from global memory once per program as [256] fp32 tensors (map_tables'
rows) and are looked up with tl.gather, which the compiler serves from shared memory: no
global load depends on a code. Row 0 / 2: the 256 sorted values of the signed / unsigned
map (dequantize). Row 1 / 3: the 255 decision points between neighbouring values in
Eytzinger (breadth-first) order plus one unused pad: quantize walks that implicit binary
tree, and the nodes of one level are adjacent in memory, so the lanes of a warp reading
one level hit distinct shared-memory banks for the first five levels.
"""

import torch
import triton
import triton.language as tl

INF = tl.constexpr(float("inf"))
NAN_BITS = tl.constexpr(0x7FC00000)  # a NaN global would never compare equal to itself (Triton rejects it)
FLT_MAX = tl.constexpr(3.4028234663852886e38)
TWO_64 = tl.constexpr(2.0**64)
TWO_M64 = tl.constexpr(2.0**-64)
# rows of map_tables
SIGNED_VALUES, SIGNED_TREE, UNSIGNED_VALUES, UNSIGNED_TREE = 0, 1, 2, 3
MAP_ROWS = 4


def eytzinger(thresholds):
    """The 255 sorted decision points in breadth-first order of their perfect binary search
    tree (node k's children are 2k+1 and 2k+2), then a 0 pad: 256 values."""
    assert thresholds.numel() == 255
    order = [(2 * (k - (1 << d) + 1) + 1) * (1 << (7 - d)) - 1 for d in range(8) for k in range((1 << d) - 1, (1 << (d + 1)) - 1)]
    return torch.cat([thresholds[order], thresholds.new_zeros(1)])


def map_tables(signed_map, unsigned_map):
    """fp32 [4, 256]: the signed map's values, its decision points (qmap[i] + qmap[i+1]) / 2
    (fp32) in Eytzinger order; the same for the unsigned map."""
    rows = []
    for q in (signed_map, unsigned_map):
        q = q.to(torch.float32)
        rows += [q, eytzinger((q[:-1] + q[1:]) / 2)]
    return torch.stack(rows).contiguous()


@triton.jit
def load_map(maps_ptr, ROW: tl.constexpr):
    """Row ROW of the map tables as a [256] fp32 tensor (kept in registers by the caller)."""
    return tl.load(maps_ptr + ROW * 256 + tl.arange(0, 256))


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
def quantize(x, absmax, tree, root, N: tl.constexpr):
    """uint8 codes [ROWS, QBLOCK] of fp32 x [ROWS, QBLOCK] (N elements) with their blocks'
    absmax [ROWS]: y = x * (1 / absmax) (the reciprocal an IEEE division per block, the
    product rounded on its own; y = 0 where absmax is 0 or NaN; x and absmax both scaled by
    2^64 for an absmax below 2^-64, by 2^-64 above 2^64), code = #{i : t[i] <= y} over
    the map's 255 sorted decision points t: the nearest map value, a tie going up. Eight
    steps down the Eytzinger tree (node j -> 2j+1 + (y >= t_j)); the first compares with the
    scalar root (tree[0]), the other seven gather from `tree`."""
    ok = absmax > 0
    # both scaled by a power of two where the reciprocal would overflow or be subnormal
    scale = tl.where(absmax < TWO_M64, TWO_64, tl.where(absmax > TWO_64, TWO_M64, 1.0))
    inv = tl.div_rn(tl.full(absmax.shape, 1.0, tl.float32), tl.where(ok, absmax * scale, 1.0))
    y = tl.where(ok[:, None], (x * scale[:, None]) * inv[:, None], 0.0)
    y = tl.reshape(y, [N])  # (tl.gather takes operands of one rank)
    j = tl.where(y >= root, 2, 1)
    for _ in tl.static_range(7):
        j = 2 * j + tl.where(y >= tl.gather(tree, j, 0), 2, 1)
    return tl.reshape((j - 255).to(tl.uint8), x.shape)
