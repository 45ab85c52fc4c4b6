"""8-bit block-wise quantization of optimizer states: the pieces an update kernel calls.

A state of n elements is stored as n uint8 codes and one fp32 absmax per block of QBLOCK
consecutive elements: s[i] = qmap[codes[i]] * absmax[i // QBLOCK] (adam_triton.reference
states the math and is what these helpers are tested against, code for code).

A kernel works on tiles of shape [ROWS, QBLOCK]: one row is one quantization block, so a
block lives in one program and its new absmax is a row maximum (tl.max over axis 1) —
dequantize, update in fp32, find the new absmax, requantize, all in registers.

Each map lives in global memory as an fp32 table of 2 x 256 entries (quant_table): row 0 the
256 sorted map values (dequantize gathers from it), row 1 the 255 decision points between
neighbouring values, padded with +inf (quantize binary-searches it).
"""

import torch
import triton
import triton.language as tl

INF = tl.constexpr(float("inf"))
NAN_BITS = tl.constexpr(0x7FC00000)  # a NaN global would never compare equal to itself (Triton rejects it)
FLT_MAX = tl.constexpr(3.4028234663852886e38)
THRESHOLDS = tl.constexpr(256)  # offset of a table's decision points from its values


def quant_table(qmap):
    """[2, 256] fp32 table of a sorted 256-entry map: the values, then the decision points
    (qmap[i] + qmap[i+1]) / 2 (fp32) followed by +inf."""
    qmap = qmap.to(torch.float32)
    thresholds = torch.cat([(qmap[:-1] + qmap[1:]) / 2, qmap.new_full((1,), float("inf"))])
    return torch.stack([qmap, thresholds]).contiguous()


@triton.jit
def dequantize(codes, absmax, table_ptr):
    """fp32 [ROWS, QBLOCK] values of uint8 codes [ROWS, QBLOCK] with their blocks' absmax
    [ROWS]: table[codes] * absmax, one fp32 product per element (NaN absmax gives NaN)."""
    return tl.load(table_ptr + codes.to(tl.int32)) * absmax[:, None]


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
def quantize(x, absmax, table_ptr):
    """uint8 codes [ROWS, QBLOCK] of fp32 x [ROWS, QBLOCK] with their blocks' absmax [ROWS]:
    y = x / absmax (IEEE division; 0 where absmax is 0 or NaN), code = #{i : t[i] <= y} over
    the table's 255 decision points t: the nearest map value, a tie going up. Eight steps
    of a branch-free binary search (one gather from the table each)."""
    ok = absmax > 0
    y = tl.where(ok[:, None], tl.div_rn(x, tl.where(ok, absmax, 1.0)[:, None]), 0.0)
    code = tl.zeros(y.shape, tl.int32)
    for k in tl.static_range(8):
        half = 128 >> k  # code + half - 1 <= 254: never reads the +inf pad
        t = tl.load(table_ptr + THRESHOLDS + (code + (half - 1)))
        code = tl.where(y >= t, code + half, code)
    return code.to(tl.uint8)
