"""RMSprop (plain, centered, with momentum): one launch updates every tensor of a bucket.

Math (torch.optim.RMSprop, computed in fp32 with IEEE sqrt and division like torch's CUDA
kernels, scalars as fp32; no bias correction):
    g = -grad if maximize else grad;  g = g / grad_scale (AMP) * clip_coef;  L2: g = g + wd * p
    v = alpha * v + (1 - alpha) * g * g
    centered: ga = lerp(ga, g, 1 - alpha);  avg = sqrt(v - ga * ga) + eps
    else:     avg = sqrt(v) + eps                          (eps added after the sqrt)
    momentum: buf = mu * buf + g / avg;  p = p - lr * buf
    else:     p = p - lr * g / avg
Centered: v - ga * ga is formed from v and ga as stored (rounded to 16-bit states), as
torch forms it, and clamped at 0 (rounding can make it a tiny negative number: NaN in torch
unless its 16-bit difference rounds to -0).
State slots of the tensor table: STATE0 square_avg, STATE1 momentum_buffer, STATE2 grad_avg.
"""

import triton
import triton.language as tl

from ._common import (
    N_LR,
    STATE0,
    STATE1,
    STATE2,
    block_for,
    chunk_prologue,
    field_ptr,
    hyper_f32,
    launch_options,
    lerp,
    load_f32,
    load_param,
    param_ptrs,
    round_to,
    store_f32,
    store_param,
    unscale_clip_sign,
)

# Columns of RMSprop's hyperparameter rows (after lr's): float64 values from the host
H_ALPHA = tl.constexpr(N_LR + 0)
H_ONE_MINUS_ALPHA = tl.constexpr(N_LR + 1)
H_EPS = tl.constexpr(N_LR + 2)
H_WEIGHT_DECAY = tl.constexpr(N_LR + 3)
H_MOMENTUM = tl.constexpr(N_LR + 4)
N_HYPER = tl.constexpr(N_LR + 5)


@triton.jit
def _rmsprop_blocks(
    param_ptr, master_ptr, grad_ptr, square_avg_ptr, momentum_buffer_ptr, grad_avg_ptr,  # typed pointers
    start, numel,  # first element of the chunk, elements in the tensor
    first_block, end_block,  # blocks [first_block, end_block) of the chunk, BLOCK elements each
    grad_div, clip, lr, alpha, one_minus_alpha, eps, weight_decay, momentum,
    SCALED: tl.constexpr, CLIPPED: tl.constexpr,  # grads are divided by grad_div / multiplied by clip
    PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr,
    CENTERED: tl.constexpr, MOMENTUM: tl.constexpr, MAXIMIZE: tl.constexpr,
    WEIGHT_DECAY: tl.constexpr, MASTER: tl.constexpr, STOCHASTIC: tl.constexpr, seed,
    MASKED: tl.constexpr, BLOCK: tl.constexpr,
):
    b = first_block
    while b < end_block:  # (not range(): Triton 3.6's interpreter needs a constant bound)
        first = start + b * BLOCK
        offs = first + tl.arange(0, BLOCK)
        if MASKED:  # (compiled Triton cannot return None from a helper, so this stays inline)
            mask = offs < numel
        else:
            mask = None
        # load every operand before the first store: the pointers come from a table, so the
        # compiler must assume a store may alias them and would not move a load above it
        g = load_f32(grad_ptr, offs, mask, GRAD_DTYPE)
        p = load_param(param_ptr, master_ptr, offs, mask, PARAM_DTYPE, MASTER)
        v = load_f32(square_avg_ptr, offs, mask, STATE_DTYPE)
        if CENTERED:
            ga = load_f32(grad_avg_ptr, offs, mask, STATE_DTYPE)
        if MOMENTUM:
            buf = load_f32(momentum_buffer_ptr, offs, mask, STATE_DTYPE)
        g = unscale_clip_sign(g, grad_div, clip, SCALED, CLIPPED, MAXIMIZE)  # then L2
        if WEIGHT_DECAY:
            g = g + weight_decay * p
        # running averages; eps after the sqrt
        v = alpha * v + one_minus_alpha * g * g
        if CENTERED:
            ga = lerp(ga, g, one_minus_alpha)
            # v - ga^2 of the stored (16-bit: rounded) v and ga, as torch forms it: from the
            # unrounded ones it can be negative where torch's is not. It is >= 0 in exact
            # arithmetic, but rounded it can be a tiny negative number, whose sqrt is NaN:
            # clamp at 0 (a NaN stays NaN)
            var = round_to(v, STATE_DTYPE) - round_to(ga, STATE_DTYPE) * round_to(ga, STATE_DTYPE)
            avg = tl.sqrt_rn(tl.maximum(var, 0.0, propagate_nan=tl.PropagateNan.ALL)) + eps
        else:
            avg = tl.sqrt_rn(v) + eps
        # update and write back
        if MOMENTUM:
            buf = momentum * buf + tl.div_rn(g, avg)
            p = p - lr * buf
        else:
            p = p - lr * tl.div_rn(g, avg)
        store_f32(square_avg_ptr, offs, v, mask, STATE_DTYPE)
        if CENTERED:
            store_f32(grad_avg_ptr, offs, ga, mask, STATE_DTYPE)
        if MOMENTUM:
            store_f32(momentum_buffer_ptr, offs, buf, mask, STATE_DTYPE)
        store_param(param_ptr, master_ptr, offs, p, mask, first, seed, PARAM_DTYPE, MASTER, STOCHASTIC, BLOCK)
        b += 1


@triton.jit(do_not_specialize=["n_rows", "seed"])
def _rmsprop_kernel(
    table_ptr,  # int64 [n_fields, n_rows]: numel, step, group, param, grad, master, square_avg, momentum_buffer, grad_avg
    n_rows,  # tensors in the table
    chunks_ptr,  # int64 [n_chunks, 2]: tensor index, first element
    hyper_ptr,  # int64 [n_groups, N_HYPER]: lr, lr tensor pointers, alpha, eps, weight_decay, momentum
    grad_scale_ptr,  # GradScaler's scale (grads are divided by it), or None
    found_inf_ptr,  # GradScaler's found_inf: non-zero leaves everything untouched; or None
    clip_coef_ptr,  # fp32 0-d clip coefficient the grads are multiplied by, or None
    seed,  # int: stochastic-rounding seed (mixed with step and tensor index)
    PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr,
    CENTERED: tl.constexpr, MOMENTUM: tl.constexpr, MAXIMIZE: tl.constexpr,
    WEIGHT_DECAY: tl.constexpr,
    MASTER: tl.constexpr,  # field MASTER_COPY holds an fp32 master copy of the (bf16/fp16) param
    STOCHASTIC: tl.constexpr,  # round bf16 param stores stochastically
    ALIGNED: tl.constexpr,  # every pointer is 16-byte aligned: unmasked full blocks
    CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    # which tensor, which part of it, and the shared per-step scalars
    t, start, numel, step, hyper, lr64, grad_div, clip, run = chunk_prologue(
        table_ptr, n_rows, chunks_ptr, hyper_ptr, grad_scale_ptr, found_inf_ptr, clip_coef_ptr, N_HYPER, CHUNK
    )
    param_ptr, grad_ptr, master_ptr, seed = param_ptrs(
        table_ptr, n_rows, t, step, seed, PARAM_DTYPE, GRAD_DTYPE, MASTER, ALIGNED
    )
    square_avg_ptr = field_ptr(table_ptr, n_rows, t, STATE0, STATE_DTYPE, ALIGNED)
    momentum_buffer_ptr = square_avg_ptr
    if MOMENTUM:
        momentum_buffer_ptr = field_ptr(table_ptr, n_rows, t, STATE1, STATE_DTYPE, ALIGNED)
    grad_avg_ptr = square_avg_ptr
    if CENTERED:
        grad_avg_ptr = field_ptr(table_ptr, n_rows, t, STATE2, STATE_DTYPE, ALIGNED)
    # the group's hyperparameters, rounded to fp32 where torch uses them as fp32 scalars
    lr32 = lr64.to(tl.float32)
    alpha = hyper_f32(hyper, H_ALPHA)
    one_minus_alpha = hyper_f32(hyper, H_ONE_MINUS_ALPHA)
    eps = hyper_f32(hyper, H_EPS)
    weight_decay = hyper_f32(hyper, H_WEIGHT_DECAY)
    momentum = hyper_f32(hyper, H_MOMENTUM)

    if run:
        # the chunk's full blocks take the unmasked (128-bit) path when every pointer is
        # aligned; the last partial block of a tensor, or every block of an unaligned one,
        # the masked path
        size = tl.minimum(numel - start, CHUNK).to(tl.int32)
        n_full = 0
        if ALIGNED:
            n_full = size // BLOCK
            _rmsprop_blocks(
                param_ptr, master_ptr, grad_ptr, square_avg_ptr, momentum_buffer_ptr, grad_avg_ptr,
                start, numel, 0, n_full, grad_div, clip, lr32, alpha, one_minus_alpha, eps, weight_decay, momentum,
                grad_scale_ptr is not None, clip_coef_ptr is not None,
                PARAM_DTYPE, GRAD_DTYPE, STATE_DTYPE, CENTERED, MOMENTUM, MAXIMIZE, WEIGHT_DECAY,
                MASTER, STOCHASTIC, seed, False, BLOCK,
            )
        _rmsprop_blocks(
            param_ptr, master_ptr, grad_ptr, square_avg_ptr, momentum_buffer_ptr, grad_avg_ptr,
            start, numel, n_full, tl.cdiv(size, BLOCK), grad_div, clip, lr32, alpha, one_minus_alpha, eps,
            weight_decay, momentum, grad_scale_ptr is not None, clip_coef_ptr is not None,
            PARAM_DTYPE, GRAD_DTYPE, STATE_DTYPE, CENTERED, MOMENTUM, MAXIMIZE, WEIGHT_DECAY,
            MASTER, STOCHASTIC, seed, True, BLOCK,
        )


def rmsprop_hyper_row(alpha, eps, weight_decay, momentum):
    """RMSprop's hyperparameter columns after lr's, as float64 values (see H_ALPHA..H_MOMENTUM)."""
    return [alpha, 1.0 - alpha, eps, weight_decay, momentum]


def rmsprop_update(
    table, n_rows, chunks, n_chunks, hyper, *, centered, momentum, maximize, weight_decay,
    param_dtype, grad_dtype, state_dtype, aligned, config,
    grad_scale=None, found_inf=None, clip_coef=None, master=False, stochastic=False, seed=0,
):
    """Launch the RMSprop update over every chunk of a bucket (one launch, any number of
    param groups: each tensor's group row of `hyper` holds its lr, alpha, eps, weight decay
    and momentum). centered, momentum and weight_decay are the code-shaping flags (momentum
    > 0, weight_decay != 0). dtypes are triton dtypes; config is a dict with CHUNK, BLOCK
    (in 4-byte elements, see block_for), num_warps."""
    dtypes = (param_dtype, grad_dtype, state_dtype) + ((tl.float32,) if master else ())
    block = block_for(config, *dtypes)
    n_states = 1 + bool(centered) + bool(momentum)
    loads = (grad_dtype, tl.float32 if master else param_dtype) + (state_dtype,) * n_states
    _rmsprop_kernel[(n_chunks,)](
        table, n_rows, chunks, hyper, grad_scale, found_inf, clip_coef, int(seed),
        PARAM_DTYPE=param_dtype, GRAD_DTYPE=grad_dtype, STATE_DTYPE=state_dtype,
        CENTERED=bool(centered), MOMENTUM=bool(momentum), MAXIMIZE=bool(maximize),
        WEIGHT_DECAY=bool(weight_decay),
        MASTER=bool(master), STOCHASTIC=bool(stochastic), ALIGNED=bool(aligned),
        CHUNK=config["CHUNK"], BLOCK=block, **launch_options(config, block, aligned, *loads),
    )
