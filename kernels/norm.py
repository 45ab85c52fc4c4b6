"""Global gradient norm for clipping, deterministic and without float atomics.

Stage 1 (one launch per bucket): program c writes sum((grad / grad_scale)^2) over its chunk
to partials[base + c]; program 0 also increments the bucket's steps (no value of the norm
pass depends on a step, so this is race-free, and it saves the separate step launch).
Stage 2 (one program): sums all partials in a fixed order, then writes
norm = sqrt(sum) and coef = min(1, max_norm / (norm + 1e-6)), as clip_grad_norm_.
"""

import triton
import triton.language as tl

from ._common import GRAD, NUMEL, field, field_ptr, increment_steps_of, load_f32, program_chunk


@triton.jit
def _sq_sum_chunk(grad_ptr, start, numel, grad_div, GRAD_DTYPE: tl.constexpr,
                  MASKED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for off in range(0, CHUNK, BLOCK):
        offs = start + off + tl.arange(0, BLOCK)
        if MASKED:  # (compiled Triton cannot return None from a helper, so this stays inline)
            mask = offs < numel
        else:
            mask = None
        g = load_f32(grad_ptr, offs, mask, GRAD_DTYPE) / grad_div
        acc += g * g
    return tl.sum(acc)


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
        if ALIGNED and start + CHUNK <= numel:
            total = _sq_sum_chunk(grad_ptr, start, numel, grad_div, GRAD_DTYPE, False, CHUNK, BLOCK)
        else:
            total = _sq_sum_chunk(grad_ptr, start, numel, grad_div, GRAD_DTYPE, True, CHUNK, BLOCK)
        tl.store(partials_ptr + c, total)


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
    norm = tl.sqrt(tl.sum(acc))
    tl.store(norm_ptr, norm)
    coef = tl.minimum(max_norm / (norm + 1e-6), 1.0, propagate_nan=tl.PropagateNan.ALL)
    tl.store(coef_ptr, coef)


def grad_sq_partials(table, n_rows, chunks, n_chunks, partials, *, grad_dtype, aligned,
                     config, grad_scale=None, found_inf=None):
    """Stage 1 for one bucket: partials[c] = sum over chunk c of (grad / grad_scale)^2,
    and the bucket's steps incremented (unless found_inf). One launch."""
    _grad_sq_partials_kernel[(max(1, n_chunks),)](
        table, n_rows, chunks, partials, n_chunks, grad_scale, found_inf,
        GRAD_DTYPE=grad_dtype, ALIGNED=bool(aligned), CHUNK=config["CHUNK"],
        BLOCK=config["BLOCK"], num_warps=config["num_warps"],
    )


def clip_coefficient(partials, n_partials, max_norm, norm, coef):
    """Stage 2: norm = sqrt(sum(partials)), coef = min(1, max_norm / (norm + 1e-6)). One launch."""
    _clip_coef_kernel[(1,)](partials, n_partials, norm, coef, float(max_norm), BLOCK=1024)
