"""Global gradient norm for clipping, deterministic and without float atomics.

Stage 1 (one launch per bucket): program c writes sum((grad / grad_scale)^2) over its chunk
to partials[base + c]; program 0 also increments the bucket's steps (no value of the norm
pass depends on a step, so this is race-free, and it saves the separate step launch).
Stage 2 (one program): sums all partials in a fixed order, then writes
norm = sqrt(sum) and coef = min(1, max_norm / (norm + 1e-6)), as clip_grad_norm_.
"""

import triton
import triton.language as tl

from ._common import (
    FP_FUSION,
    GRAD,
    INTERPRETED,
    NUMEL,
    block_for,
    field,
    field_ptr,
    increment_steps_of,
    launch_options,
    load_f32,
    program_chunk,
)

# The norm pass reads one stream only: an iteration loads NORM_ROWS rows of one 128-bit
# vector per thread each, else too few bytes would be in flight per SM to hide the memory
# latency (one 16-byte load per thread is at most 32 KB per SM).
NORM_ROWS = tl.constexpr(4)


@triton.jit
def _sq_sum_tiles(acc, grad_ptr, start, numel, first, end, grad_div, SCALED: tl.constexpr,
                  GRAD_DTYPE: tl.constexpr, MASKED: tl.constexpr, ROWS: tl.constexpr, WIDTH: tl.constexpr):
    """acc + (grad / grad_div)^2 over elements [first, end) of the chunk at start (end - first
    a multiple of ROWS * WIDTH), in tiles of ROWS x WIDTH elements summed into acc's lanes."""
    tile = tl.arange(0, ROWS)[:, None] * WIDTH + tl.arange(0, WIDTH)[None, :]
    off = first
    while off < end:  # (not range(): Triton 3.6's interpreter needs a constant bound)
        # ptxas would unroll this small loop by 4 and reuse one iteration's registers in the
        # next, so their loads would no longer go out together (4 memory round trips where 1
        # does): a PTX pragma says not to. It must come first in the loop header block, so it
        # is written here, not in a helper (an inlined call starts a new block).
        if not INTERPRETED:
            tl.inline_asm_elementwise('.pragma "nounroll";', "=r", [], dtype=tl.int32, is_pure=False, pack=1)
        offs = start + off + tile
        if MASKED:  # (compiled Triton cannot return None from a helper, so this stays inline)
            mask = offs < numel
        else:
            mask = None
        g = load_f32(grad_ptr, offs, mask, GRAD_DTYPE)  # one load of every row, then the math
        if SCALED:
            g = tl.div_rn(g, grad_div)
        acc += tl.sum(g * g, axis=0)
        off += ROWS * WIDTH
    return acc


@triton.jit(do_not_specialize=["n_rows"])
def _grad_sq_partials_kernel(
    table_ptr,  # int64 [n_fields, n_rows] tensor table of the bucket
    n_rows,  # tensors in the table
    chunks_ptr,  # int64 [n_chunks, 2]: tensor index, first element
    partials_ptr,  # fp32 output, one value per chunk (already offset to this bucket's base)
    n_chunks,  # chunks of the bucket (the grid has at least one program)
    grad_scale_ptr,  # GradScaler's scale (grads are divided by it), or None
    found_inf_ptr,  # GradScaler's found_inf: non-zero leaves the steps as they are; or None
    GRAD_DTYPE: tl.constexpr, ALIGNED: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    c = tl.program_id(0)
    if c == 0:
        increment_steps_of(table_ptr, n_rows, found_inf_ptr, 256)
    if c < n_chunks:
        t, start = program_chunk(chunks_ptr, CHUNK)
        numel = field(table_ptr, n_rows, t, NUMEL)
        grad_div = 1.0
        if grad_scale_ptr is not None:
            grad_div = tl.load(grad_scale_ptr).to(tl.float32)
        grad_ptr = field_ptr(table_ptr, n_rows, t, GRAD, GRAD_DTYPE, ALIGNED)
        scaled = grad_scale_ptr is not None
        # full tiles (NORM_ROWS rows of BLOCK / NORM_ROWS) of aligned grads unmasked (128-bit),
        # the rest one masked row at a time
        width: tl.constexpr = BLOCK // NORM_ROWS
        size = tl.minimum(numel - start, CHUNK).to(tl.int32)
        tiled = 0
        acc = tl.zeros([BLOCK // NORM_ROWS], dtype=tl.float32)
        if ALIGNED:
            tiled = size // BLOCK * BLOCK
            acc = _sq_sum_tiles(acc, grad_ptr, start, numel, 0, tiled, grad_div, scaled, GRAD_DTYPE, False,
                                NORM_ROWS, width)
        acc = _sq_sum_tiles(acc, grad_ptr, start, numel, tiled, tl.cdiv(size, width) * width, grad_div, scaled,
                            GRAD_DTYPE, True, 1, width)
        tl.store(partials_ptr + c, tl.sum(acc))


@triton.jit
def _clip_coef_kernel(
    partials_ptr,  # fp32 [n_partials] squared sums of every bucket
    n_partials,
    norm_ptr,  # fp32 0-d output: the total norm (before clipping)
    coef_ptr,  # fp32 0-d output: min(1, max_norm / (norm + 1e-6))
    max_norm,  # fp32
    BLOCK: tl.constexpr,
):
    # fixed-order reduction: the same inputs give the same bits
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    first = 0
    while first < n_partials:  # not range(): Triton 3.6's interpreter needs a constant bound
        offs = first + tl.arange(0, BLOCK)
        acc += tl.load(partials_ptr + offs, mask=offs < n_partials, other=0.0)
        first += BLOCK
    norm = tl.sqrt_rn(tl.sum(acc))
    tl.store(norm_ptr, norm)
    coef = tl.minimum(tl.div_rn(max_norm, norm + 1e-6), 1.0, propagate_nan=tl.PropagateNan.ALL)
    tl.store(coef_ptr, coef)


def grad_sq_partials(table, n_rows, chunks, n_chunks, partials, *, grad_dtype, aligned,
                     config, grad_scale=None, found_inf=None):
    """Stage 1 for one bucket: partials[c] = sum over chunk c of (grad / grad_scale)^2,
    and the bucket's steps incremented (unless found_inf). One launch."""
    block = min(config["CHUNK"], NORM_ROWS.value * block_for(config, grad_dtype))
    _grad_sq_partials_kernel[(max(1, n_chunks),)](
        table, n_rows, chunks, partials, n_chunks, grad_scale, found_inf,
        GRAD_DTYPE=grad_dtype, ALIGNED=bool(aligned), CHUNK=config["CHUNK"],
        BLOCK=block, **launch_options(config, block, aligned, grad_dtype),
    )


def clip_coefficient(partials, n_partials, max_norm, norm, coef):
    """Stage 2: norm = sqrt(sum(partials)), coef = min(1, max_norm / (norm + 1e-6)). One launch."""
    _clip_coef_kernel[(1,)](partials, n_partials, norm, coef, float(max_norm), BLOCK=1024,
                            enable_fp_fusion=FP_FUSION)
