"""Adam / AdamW / AMSGrad: one launch updates every tensor of a bucket.

Math (torch.optim.Adam, in fp32 with IEEE-rounded sqrt and division like torch's CUDA
kernels; bias corrections in fp64; step already incremented):
    g = -grad if maximize else grad;  g = g / grad_scale (AMP) * clip_coef
    L2:        g = g + wd * p              decoupled: p = p * (1 - lr * wd)
    m = lerp(m, g, 1 - beta1);  v = beta2 * v + (1 - beta2) * g * g;  vmax = max(vmax, v)
    p = p - lr / (1 - beta1^t) * m / (sqrt(v or vmax) / sqrt(1 - beta2^t) + eps)
State slots of the tensor table: STATE0 exp_avg, STATE1 exp_avg_sq, STATE2 max_exp_avg_sq.
"""

import triton
import triton.language as tl

from ._common import (
    N_LR,
    STATE0,
    STATE1,
    STATE2,
    bias_correction,
    block_for,
    chunk_prologue,
    field_ptr,
    hyper_f32,
    hyper_f64,
    launch_options,
    lerp,
    load_f32,
    load_param,
    param_ptrs,
    store_f32,
    store_param,
    unscale_clip_sign,
)

# weight-decay modes (constexpr): none, L2 (added to the gradient), decoupled (AdamW)
WD_NONE, WD_L2, WD_DECOUPLED = 0, 1, 2

# Columns of Adam's hyperparameter rows (after lr's): float64 values from the host
H_BETA1 = tl.constexpr(N_LR + 0)
H_ONE_MINUS_BETA1 = tl.constexpr(N_LR + 1)
H_BETA2 = tl.constexpr(N_LR + 2)
H_ONE_MINUS_BETA2 = tl.constexpr(N_LR + 3)
H_EPS = tl.constexpr(N_LR + 4)
H_WEIGHT_DECAY = tl.constexpr(N_LR + 5)
H_LOG2_BETA1 = tl.constexpr(N_LR + 6)
H_LOG2_BETA2 = tl.constexpr(N_LR + 7)
N_HYPER = tl.constexpr(N_LR + 8)


@triton.jit
def adam_scalars(hyper, step, lr64):
    """The fp32 scalars of a group's update this step, from its hyperparameter row, the
    (already incremented) step and lr in fp64: 1 - beta1, beta2, 1 - beta2, eps and the
    weight decay rounded to fp32 (as torch rounds Python floats for fp32 tensor ops), the step
    size lr / (1 - beta1^t) and sqrt(1 - beta2^t) from fp64 bias corrections, and the
    decoupled decay factor 1 - lr * wd."""
    one_minus_beta1 = hyper_f32(hyper, H_ONE_MINUS_BETA1)
    beta2 = hyper_f32(hyper, H_BETA2)
    one_minus_beta2 = hyper_f32(hyper, H_ONE_MINUS_BETA2)
    eps = hyper_f32(hyper, H_EPS)
    weight_decay64 = hyper_f64(hyper, H_WEIGHT_DECAY)
    weight_decay = weight_decay64.to(tl.float32)
    bc1 = bias_correction(step, hyper_f64(hyper, H_LOG2_BETA1))
    bc2 = bias_correction(step, hyper_f64(hyper, H_LOG2_BETA2))
    step_size = (lr64 / bc1).to(tl.float32)
    bc2_sqrt = tl.sqrt(bc2).to(tl.float32)  # (fp64: sqrt.rn.f64, correctly rounded)
    decay = (1.0 - lr64 * weight_decay64).to(tl.float32)
    return one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, step_size, bc2_sqrt, decay


@triton.jit
def adam_math(g, p, m, v, vmax, grad_div, clip, step_size, bc2_sqrt, decay, one_minus_beta1, beta2, one_minus_beta2,
              eps, weight_decay, SCALED: tl.constexpr, CLIPPED: tl.constexpr, AMSGRAD: tl.constexpr,
              MAXIMIZE: tl.constexpr, WD_MODE: tl.constexpr):
    """One Adam update of fp32 values (any shape): the grad as loaded, the param, the
    moments (vmax is ignored without AMSGRAD); returns the new (p, m, v, vmax). Sqrt and
    division IEEE-rounded, as in torch's kernels; weight decay by WD_MODE (1: L2, 2:
    decoupled)."""
    g = unscale_clip_sign(g, grad_div, clip, SCALED, CLIPPED, MAXIMIZE)
    if WD_MODE == 1:
        g = g + weight_decay * p
    if WD_MODE == 2:
        p = p * decay
    m = lerp(m, g, one_minus_beta1)
    v = beta2 * v + one_minus_beta2 * g * g
    if AMSGRAD:
        vmax = tl.maximum(vmax, v, propagate_nan=tl.PropagateNan.ALL)
        denom = tl.div_rn(tl.sqrt_rn(vmax), bc2_sqrt) + eps
    else:
        denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p = p - step_size * tl.div_rn(m, denom)
    return p, m, v, vmax


@triton.jit
def _adam_blocks(
    param_ptr, master_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, max_exp_avg_sq_ptr,  # typed pointers
    start, numel,  # first element of the chunk, elements in the tensor
    first_block, end_block,  # blocks [first_block, end_block) of the chunk, BLOCK elements each
    grad_div, clip, step_size, bc2_sqrt, decay, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay,
    SCALED: tl.constexpr, CLIPPED: tl.constexpr,  # grads are divided by grad_div / multiplied by clip
    PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr,
    AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, WD_MODE: tl.constexpr,
    MASTER: tl.constexpr, STOCHASTIC: tl.constexpr, seed,
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
        m = load_f32(exp_avg_ptr, offs, mask, STATE_DTYPE)
        v = load_f32(exp_avg_sq_ptr, offs, mask, STATE_DTYPE)
        if AMSGRAD:
            vmax = load_f32(max_exp_avg_sq_ptr, offs, mask, STATE_DTYPE)
        else:
            vmax = v  # (unused)
        p, m, v, vmax = adam_math(
            g, p, m, v, vmax, grad_div, clip, step_size, bc2_sqrt, decay, one_minus_beta1, beta2, one_minus_beta2,
            eps, weight_decay, SCALED, CLIPPED, AMSGRAD, MAXIMIZE, WD_MODE,
        )
        # write back
        store_f32(exp_avg_ptr, offs, m, mask, STATE_DTYPE)
        store_f32(exp_avg_sq_ptr, offs, v, mask, STATE_DTYPE)
        if AMSGRAD:
            store_f32(max_exp_avg_sq_ptr, offs, vmax, mask, STATE_DTYPE)
        store_param(param_ptr, master_ptr, offs, p, mask, first, seed, PARAM_DTYPE, MASTER, STOCHASTIC, BLOCK)
        b += 1


@triton.jit(do_not_specialize=["n_rows", "seed"])
def _adam_kernel(
    table_ptr,  # int64 [n_fields, n_rows]: numel, step, group, param, grad, master, exp_avg, exp_avg_sq, max_exp_avg_sq
    n_rows,  # tensors in the table
    chunks_ptr,  # int64 [n_chunks, 2]: tensor index, first element
    hyper_ptr,  # int64 [n_groups, N_HYPER]: lr, lr tensor pointers, betas, eps, weight_decay, log2(betas)
    grad_scale_ptr,  # GradScaler's scale (grads are divided by it), or None
    found_inf_ptr,  # GradScaler's found_inf: non-zero leaves everything untouched; or None
    clip_coef_ptr,  # fp32 0-d clip coefficient the grads are multiplied by, or None
    seed,  # int: stochastic-rounding seed (mixed with step and tensor index)
    PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr,
    AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, WD_MODE: tl.constexpr,
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
    exp_avg_ptr = field_ptr(table_ptr, n_rows, t, STATE0, STATE_DTYPE, ALIGNED)
    exp_avg_sq_ptr = field_ptr(table_ptr, n_rows, t, STATE1, STATE_DTYPE, ALIGNED)
    max_exp_avg_sq_ptr = exp_avg_sq_ptr
    if AMSGRAD:
        max_exp_avg_sq_ptr = field_ptr(table_ptr, n_rows, t, STATE2, STATE_DTYPE, ALIGNED)

    one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, step_size, bc2_sqrt, decay = adam_scalars(
        hyper, step, lr64
    )

    if run:
        # the chunk's full blocks take the unmasked (128-bit) path when every pointer is
        # aligned; the last partial block of a tensor, or every block of an unaligned one,
        # the masked path
        size = tl.minimum(numel - start, CHUNK).to(tl.int32)
        n_full = 0
        if ALIGNED:
            n_full = size // BLOCK
            _adam_blocks(
                param_ptr, master_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, max_exp_avg_sq_ptr,
                start, numel, 0, n_full, grad_div, clip, step_size, bc2_sqrt, decay,
                one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay,
                grad_scale_ptr is not None, clip_coef_ptr is not None,
                PARAM_DTYPE, GRAD_DTYPE, STATE_DTYPE, AMSGRAD, MAXIMIZE, WD_MODE,
                MASTER, STOCHASTIC, seed, False, BLOCK,
            )
        _adam_blocks(
            param_ptr, master_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, max_exp_avg_sq_ptr,
            start, numel, n_full, tl.cdiv(size, BLOCK), grad_div, clip, step_size, bc2_sqrt, decay,
            one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay,
            grad_scale_ptr is not None, clip_coef_ptr is not None,
            PARAM_DTYPE, GRAD_DTYPE, STATE_DTYPE, AMSGRAD, MAXIMIZE, WD_MODE,
            MASTER, STOCHASTIC, seed, True, BLOCK,
        )


def adam_hyper_row(beta1, beta2, eps, weight_decay):
    """Adam's hyperparameter columns after lr's, as float64 values (see H_BETA1..H_LOG2_BETA2)."""
    import math

    return [
        beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps, weight_decay,
        math.log2(beta1) if beta1 > 0 else -math.inf, math.log2(beta2) if beta2 > 0 else -math.inf,
    ]


def adam_update(
    table, n_rows, chunks, n_chunks, hyper, *, amsgrad, maximize, wd_mode, param_dtype, grad_dtype,
    state_dtype, aligned, config, grad_scale=None, found_inf=None, clip_coef=None, master=False,
    stochastic=False, seed=0,
):
    """Launch the Adam update over every chunk of a bucket (one launch, any number of param
    groups: each tensor's group row of `hyper` holds its lr, betas, eps and weight decay).

    dtypes are triton dtypes; config is a dict with CHUNK, BLOCK (in 4-byte elements, see
    block_for), num_warps."""
    dtypes = (param_dtype, grad_dtype, state_dtype) + ((tl.float32,) if master else ())
    block = block_for(config, *dtypes)
    loads = (grad_dtype, tl.float32 if master else param_dtype) + (state_dtype,) * (3 if amsgrad else 2)
    _adam_kernel[(n_chunks,)](
        table, n_rows, chunks, hyper, grad_scale, found_inf, clip_coef, int(seed),
        PARAM_DTYPE=param_dtype, GRAD_DTYPE=grad_dtype, STATE_DTYPE=state_dtype,
        AMSGRAD=bool(amsgrad), MAXIMIZE=bool(maximize), WD_MODE=wd_mode,
        MASTER=bool(master), STOCHASTIC=bool(stochastic), ALIGNED=bool(aligned),
        CHUNK=config["CHUNK"], BLOCK=block, **launch_options(config, block, aligned, *loads),
    )
