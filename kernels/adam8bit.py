"""Adam / AdamW / AMSGrad on 8-bit block-wise states: one launch updates every tensor of a
bucket — dequantize, the fp32 Adam math, each block's new absmax, requantize, in one pass.

Math (adam_triton.reference.adam8bit_step, computed in fp32 with every operation rounded on
its own: IEEE sqrt and division, no fused multiply-add; step already incremented):
    m, v, vmax = codes dequantized: map[code] * absmax of the element's block
    g = -grad if maximize else grad;  g = g / grad_scale (AMP) * clip_coef
    L2:        g = g + wd * p              decoupled: p = p * (1 - lr * wd)
    m = lerp(m, g, 1 - beta1);  v = beta2 * v + (1 - beta2) * g * g;  vmax = max(vmax, v)
    p = p - lr / (1 - beta1^t) * (m / (sqrt(v or vmax) / sqrt(1 - beta2^t) + eps))
    absmax = max |m| (|v|, |vmax|) over each block; codes = nearest map value of state * (1 / absmax)
exp_avg on the signed dynamic map, exp_avg_sq and max_exp_avg_sq on the unsigned one.
State slots of the tensor table: STATE0 exp_avg codes (uint8), STATE1 its absmax (fp32, one
per block), STATE2 / STATE3 exp_avg_sq, STATE4 / STATE5 max_exp_avg_sq (AMSGrad).

A program's chunk is CHUNK elements from a multiple of CHUNK, and CHUNK is a multiple of the
block size, so a block never straddles programs. The program walks its chunk in tiles of
BLOCK elements, BLOCK // QBLOCK quantization blocks as the rows of a [ROWS, QBLOCK] tile: a
block's new absmax is a row maximum, found in registers.
"""

import triton
import triton.language as tl

from . import quant8
from ._common import (
    STATE0,
    STATE1,
    STATE2,
    STATE3,
    STATE4,
    STATE5,
    chunk_prologue,
    field_ptr,
    load_f32,
    load_param,
    param_ptrs,
    store_param,
)
from .adam import (  # Adam's hyperparameter rows and math (one optimizer uses both)
    N_HYPER,
    adam_math,
    adam_scalars,
)

# Elements per thread of a tile: 16, so the uint8 codes move in 128-bit accesses (and the
# fp32 streams in four). Quantization multiplies by each block's reciprocal absmax (one IEEE
# division per block, not per element), which keeps 16 elements within the register budget.
ELEMS_PER_THREAD = 16
# fp-contraction off: the reference rounds every product and sum on its own, and an FMA in
# the moments moves m or v by an ulp, which can move a code at a decision point. With it off
# the compiled kernel computes the reference's fp32 values (and Triton's default, which
# changes in 3.10, does not matter).
ENABLE_FP_FUSION = False
# Warps of a program: 2 (a tile of 1024 elements), more where one block is larger. A register
# cap of 200 fits 5 programs of 2 warps an SM, and ptxas compiles the variants with two
# moments and blocks of at least 128 elements within it without spills (the map tables are
# held in registers: 1536 words, 24 a thread). AMSGrad's third moment, and the more rows of a
# tile of smaller blocks, take the cap of 255 (4 programs an SM): at 200 ptxas spills there.
WARPS = 2
MAX_REGISTERS, MAX_REGISTERS_LARGE = 200, 255
# A chunk is CHUNK_SCALE times as many tiles as the config's (Adam's) chunk has iterations: 64
# at the default config, so the loop's loads in flight outweigh the dependent prologue (5
# round trips). But at most MAX_CHUNK_BLOCKS blocks: each moment's absmax for the chunk is a
# loop-carried register vector (4 words a thread for 256 blocks).
CHUNK_SCALE = 2
MAX_CHUNK_BLOCKS = 256
# Before Triton 3.9 the cap is 255: Triton 3.6 (with its CUDA 12.8 ptxas) spills at 200 in
# every aligned variant.
_FITS_200 = tuple(int(x) for x in triton.__version__.split(".")[:2]) >= (3, 9)


def max_registers(block_size, amsgrad):
    """The register cap of a launch (see MAX_REGISTERS)."""
    return MAX_REGISTERS if _FITS_200 and not amsgrad and block_size >= 128 else MAX_REGISTERS_LARGE


@triton.jit
def _load(ptr, offs, mask):
    """ptr[offs] as stored (masked lanes read 0)."""
    if mask is None:
        return tl.load(ptr + offs)
    else:
        return tl.load(ptr + offs, mask=mask, other=0)


@triton.jit
def _requantize(codes_ptr, chunk_absmax, x, offs, mask, b, points, buckets, SIGNED: tl.constexpr, N: tl.constexpr):
    """Requantize fp32 x [ROWS, QBLOCK] (tile b of the chunk) with each block's new absmax:
    store the codes; returns the chunk's absmax vector with the tile's blocks replaced."""
    absmax = quant8.block_absmax(x, mask)
    tl.store(codes_ptr + offs, quant8.quantize(x, absmax, points, buckets, SIGNED, N), mask=mask)
    ROWS: tl.constexpr = absmax.shape[0]
    ids = tl.arange(0, chunk_absmax.shape[0])
    return tl.where(ids // ROWS == b, tl.gather(absmax, ids % ROWS, 0), chunk_absmax)


@triton.jit
def _adam8bit_tiles(
    param_ptr, master_ptr, grad_ptr, m_codes_ptr, v_codes_ptr, x_codes_ptr,  # typed / uint8 pointers
    m_absmax, v_absmax, x_absmax,  # the chunk's absmax of each moment, fp32 [CHUNK // QBLOCK]
    signed_values, signed_points, unsigned_values, unsigned_points, buckets,  # the maps
    start, numel,  # first element of the chunk (a multiple of CHUNK), elements in the tensor
    first_tile, end_tile,  # tiles [first_tile, end_tile) of the chunk, BLOCK elements each
    grad_div, clip, step_size, bc2_sqrt, decay, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay,
    SCALED: tl.constexpr, CLIPPED: tl.constexpr,
    PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr,
    AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, WD_MODE: tl.constexpr,
    MASTER: tl.constexpr, STOCHASTIC: tl.constexpr, seed,
    MASKED: tl.constexpr, BLOCK: tl.constexpr, QBLOCK: tl.constexpr,
):
    """Tiles [first_tile, end_tile) of the chunk; returns the absmax vectors with their blocks
    replaced by the new absmax."""
    ROWS: tl.constexpr = BLOCK // QBLOCK
    rows = tl.arange(0, ROWS)
    cols = tl.arange(0, QBLOCK)
    b = first_tile
    while b < end_tile:  # (not range(): Triton 3.6's interpreter needs a constant bound)
        first = start + b * BLOCK
        offs = first + rows[:, None] * QBLOCK + cols[None, :]
        if MASKED:  # (compiled Triton cannot return None from a helper, so this stays inline)
            mask = offs < numel
        else:
            mask = None
        # load every operand before the first store (pointers from a table may alias)
        m_codes = _load(m_codes_ptr, offs, mask)
        v_codes = _load(v_codes_ptr, offs, mask)
        if AMSGRAD:
            x_codes = _load(x_codes_ptr, offs, mask)
        g = load_f32(grad_ptr, offs, mask, GRAD_DTYPE)
        p = load_param(param_ptr, master_ptr, offs, mask, PARAM_DTYPE, MASTER)
        # dequantize with the tile's blocks' absmax (from the chunk's vectors), then Adam's
        # update in fp32
        blk = b * ROWS + rows
        m = quant8.dequantize(m_codes, tl.gather(m_absmax, blk, 0), signed_values, BLOCK)
        v = quant8.dequantize(v_codes, tl.gather(v_absmax, blk, 0), unsigned_values, BLOCK)
        if AMSGRAD:
            vmax = quant8.dequantize(x_codes, tl.gather(x_absmax, blk, 0), unsigned_values, BLOCK)
        else:
            vmax = v  # (unused)
        p, m, v, vmax = adam_math(
            g, p, m, v, vmax, grad_div, clip, step_size, bc2_sqrt, decay, one_minus_beta1, beta2, one_minus_beta2,
            eps, weight_decay, SCALED, CLIPPED, AMSGRAD, MAXIMIZE, WD_MODE,
        )
        # write back: the param, then each state requantized with its blocks' new absmax
        store_param(param_ptr, master_ptr, offs, p, mask, first, seed, PARAM_DTYPE, MASTER, STOCHASTIC, BLOCK)
        m_absmax = _requantize(m_codes_ptr, m_absmax, m, offs, mask, b, signed_points, buckets,
                               True, BLOCK)
        v_absmax = _requantize(v_codes_ptr, v_absmax, v, offs, mask, b, unsigned_points, buckets,
                               False, BLOCK)
        if AMSGRAD:
            x_absmax = _requantize(x_codes_ptr, x_absmax, vmax, offs, mask, b, unsigned_points, buckets,
                                   False, BLOCK)
        b += 1
    return m_absmax, v_absmax, x_absmax


@triton.jit(do_not_specialize=["n_rows", "seed"])
def _adam8bit_kernel(
    table_ptr,  # int64 [n_fields, n_rows]: numel, step, group, param, grad, master, then the 8-bit slots (STATE0..5)
    n_rows,  # tensors in the table
    chunks_ptr,  # int64 [n_chunks, 2]: tensor index, first element
    hyper_ptr,  # int64 [n_groups, N_HYPER]: Adam's rows (kernels/adam.py)
    maps_ptr,  # int32 [quant8.MAP_WORDS]: quant8.map_tables
    grad_scale_ptr,  # GradScaler's scale (grads are divided by it), or None
    found_inf_ptr,  # GradScaler's found_inf: non-zero leaves everything untouched; or None
    clip_coef_ptr,  # fp32 0-d clip coefficient the grads are multiplied by, or None
    seed,  # int: stochastic-rounding seed (mixed with step and tensor index)
    PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr,
    AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, WD_MODE: tl.constexpr,
    MASTER: tl.constexpr,  # field MASTER_COPY holds an fp32 master copy of the (bf16/fp16) param
    STOCHASTIC: tl.constexpr,  # round bf16 param stores stochastically
    ALIGNED: tl.constexpr,  # every pointer is 16-byte aligned: unmasked full tiles
    CHUNK: tl.constexpr,  # elements per program, a multiple of BLOCK
    BLOCK: tl.constexpr,  # elements per loop iteration (a tile), a multiple of QBLOCK
    QBLOCK: tl.constexpr,  # quantization block size (elements per absmax)
):
    tl.static_assert(CHUNK % BLOCK == 0 and BLOCK % QBLOCK == 0, "a chunk is whole tiles, a tile whole blocks")
    # which tensor, which part of it, and the shared per-step scalars
    t, start, numel, step, hyper, lr64, grad_div, clip, run = chunk_prologue(
        table_ptr, n_rows, chunks_ptr, hyper_ptr, grad_scale_ptr, found_inf_ptr, clip_coef_ptr, N_HYPER, CHUNK
    )
    param_ptr, grad_ptr, master_ptr, seed = param_ptrs(
        table_ptr, n_rows, t, step, seed, PARAM_DTYPE, GRAD_DTYPE, MASTER, ALIGNED
    )
    m_codes_ptr = field_ptr(table_ptr, n_rows, t, STATE0, tl.uint8, ALIGNED)
    m_absmax_ptr = field_ptr(table_ptr, n_rows, t, STATE1, tl.float32, ALIGNED)
    v_codes_ptr = field_ptr(table_ptr, n_rows, t, STATE2, tl.uint8, ALIGNED)
    v_absmax_ptr = field_ptr(table_ptr, n_rows, t, STATE3, tl.float32, ALIGNED)
    x_codes_ptr = v_codes_ptr
    x_absmax_ptr = v_absmax_ptr
    if AMSGRAD:
        x_codes_ptr = field_ptr(table_ptr, n_rows, t, STATE4, tl.uint8, ALIGNED)
        x_absmax_ptr = field_ptr(table_ptr, n_rows, t, STATE5, tl.float32, ALIGNED)

    # the group's scalars this step: Adam's (one optimizer launches both kernels)
    one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, step_size, bc2_sqrt, decay = adam_scalars(
        hyper, step, lr64
    )

    if run:
        # the two maps, once per program: values (dequantize), decision points and bucket
        # tables (quantize)
        signed_values = quant8.load_map(maps_ptr, quant8.SIGNED_VALUES)
        signed_points = quant8.load_map(maps_ptr, quant8.SIGNED_POINTS)
        buckets = quant8.load_words(maps_ptr, quant8.BUCKETS, quant8.BUCKET_WORDS)
        unsigned_values = quant8.load_map(maps_ptr, quant8.UNSIGNED_VALUES)
        unsigned_points = quant8.load_map(maps_ptr, quant8.UNSIGNED_POINTS)
        # the chunk's blocks' absmax, read here once and written once at the end (a chunk is
        # whole blocks: CHUNK is a multiple of QBLOCK, and the tensor's last block may be short)
        NB: tl.constexpr = CHUNK // QBLOCK
        blk = start // QBLOCK + tl.arange(0, NB)
        bmask = blk < tl.cdiv(numel, QBLOCK)
        m_absmax = tl.load(m_absmax_ptr + blk, mask=bmask, other=0.0)
        v_absmax = tl.load(v_absmax_ptr + blk, mask=bmask, other=0.0)
        x_absmax = v_absmax
        if AMSGRAD:
            x_absmax = tl.load(x_absmax_ptr + blk, mask=bmask, other=0.0)
        # the chunk's full tiles take the unmasked (128-bit) path when every pointer is
        # aligned; the last partial tile of a tensor, or every tile of an unaligned one, the
        # masked path
        size = tl.minimum(numel - start, CHUNK).to(tl.int32)
        n_full = 0
        if ALIGNED:
            n_full = size // BLOCK
            m_absmax, v_absmax, x_absmax = _adam8bit_tiles(
                param_ptr, master_ptr, grad_ptr, m_codes_ptr, v_codes_ptr, x_codes_ptr, m_absmax, v_absmax, x_absmax,
                signed_values, signed_points, unsigned_values, unsigned_points, buckets,
                start, numel, 0, n_full, grad_div, clip, step_size, bc2_sqrt, decay,
                one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay,
                grad_scale_ptr is not None, clip_coef_ptr is not None,
                PARAM_DTYPE, GRAD_DTYPE, AMSGRAD, MAXIMIZE, WD_MODE, MASTER, STOCHASTIC, seed,
                False, BLOCK, QBLOCK,
            )
        m_absmax, v_absmax, x_absmax = _adam8bit_tiles(
            param_ptr, master_ptr, grad_ptr, m_codes_ptr, v_codes_ptr, x_codes_ptr, m_absmax, v_absmax, x_absmax,
            signed_values, signed_points, unsigned_values, unsigned_points, buckets,
            start, numel, n_full, tl.cdiv(size, BLOCK), grad_div, clip, step_size, bc2_sqrt, decay,
            one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay,
            grad_scale_ptr is not None, clip_coef_ptr is not None,
            PARAM_DTYPE, GRAD_DTYPE, AMSGRAD, MAXIMIZE, WD_MODE, MASTER, STOCHASTIC, seed,
            True, BLOCK, QBLOCK,
        )
        tl.store(m_absmax_ptr + blk, m_absmax, mask=bmask)
        tl.store(v_absmax_ptr + blk, v_absmax, mask=bmask)
        if AMSGRAD:
            tl.store(x_absmax_ptr + blk, x_absmax, mask=bmask)


def launch_shape(block_size, config, whole_chunk=False):
    """(CHUNK, BLOCK, num_warps) of an 8-bit launch with the (Adam-style) config: a tile of
    ELEMS_PER_THREAD elements for each thread of WARPS warps (more warps for a block larger
    than that: a tile holds whole blocks), and a chunk of CHUNK_SCALE times as many tiles as
    the config's chunk has iterations, at most MAX_CHUNK_BLOCKS blocks. With whole_chunk (the
    interpreter's choice: there every operation costs the same whatever its size) one tile is
    the whole config chunk. The host builds its chunk table with the same CHUNK
    (Adam8bit._chunk_elements). Raises ValueError unless the chunk is 1 to MAX_CHUNK_BLOCKS
    blocks of block_size (both are powers of two)."""
    chunk, warps = config["CHUNK"], config["num_warps"]
    if whole_chunk:
        tile = chunk
    else:
        warps = max(WARPS, block_size // (ELEMS_PER_THREAD * 32))
        tile = ELEMS_PER_THREAD * 32 * warps
        chunk = max(min(CHUNK_SCALE * (chunk // config["BLOCK"]) * tile, MAX_CHUNK_BLOCKS * block_size), tile)
    if chunk % block_size or chunk // block_size > MAX_CHUNK_BLOCKS:
        raise ValueError(f"chunk {chunk} is not 1 to {MAX_CHUNK_BLOCKS} blocks of the 8-bit block size {block_size}")
    return chunk, tile, warps


def adam8bit_update(
    table, n_rows, chunks, n_chunks, hyper, maps, *, block_size, amsgrad, maximize, wd_mode, param_dtype,
    grad_dtype, aligned, config, grad_scale=None, found_inf=None, clip_coef=None, master=False,
    stochastic=False, seed=0, whole_chunk=False,
):
    """Launch the 8-bit Adam update over every chunk of a bucket (one launch, any number of
    param groups; each tensor's row of `hyper` is Adam's). maps: quant8.map_tables on the
    device. dtypes are triton dtypes; config is a tuning config (CHUNK, BLOCK, num_warps),
    turned into this kernel's chunk, tile and warps by launch_shape; the chunk table must be
    built with that chunk."""
    chunk, tile, warps = launch_shape(block_size, config, whole_chunk)
    _adam8bit_kernel[(n_chunks,)](
        table, n_rows, chunks, hyper, maps, grad_scale, found_inf, clip_coef, int(seed),
        PARAM_DTYPE=param_dtype, GRAD_DTYPE=grad_dtype,
        AMSGRAD=bool(amsgrad), MAXIMIZE=bool(maximize), WD_MODE=wd_mode,
        MASTER=bool(master), STOCHASTIC=bool(stochastic), ALIGNED=bool(aligned),
        CHUNK=chunk, BLOCK=tile, QBLOCK=block_size, num_warps=warps, enable_fp_fusion=ENABLE_FP_FUSION,
        maxnreg=max_registers(block_size, amsgrad),
    )
