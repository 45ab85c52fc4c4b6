"""Pieces every optimizer kernel shares: the tensor table, the per-group hyperparameter
table, chunk decoding and the per-program prologue, fp32 loads and stores for every storage
dtype (bf16 rounded to nearest even, bit for bit like torch, or stochastically), the fp32
master copy, bias corrections from a device-side step, the step-increment kernel, and what
every launcher shares (the block per dtype, FMA contraction).

The tensor table is an int64 tensor of shape [n_cols, n_rows], column-major by field: entry
(FIELD, t) describes tensor t of a bucket, so the host can rewrite one field of every tensor
(the grad pointers, after `zero_grad()`) with one contiguous copy. The hyperparameter table
is an int64 tensor of shape [n_groups, n_hyper]: one row per param group, floats stored as
their float64 bit patterns, pointers as addresses. The chunk table is an int64 tensor of
shape [n_chunks, 2]: (tensor index, first element). Program c of an update kernel handles
CHUNK elements of one tensor.
"""

import math
import os

import triton
import triton.language as tl


def _interpreting():
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes", "y")


# Whether the kernels below run through Triton's interpreter: decided at import, as Triton
# decides it for every @triton.jit function of this module. The interpreter's fp32 -> bf16
# cast truncates, so there bf16 stores round by bits; compiled code uses the hardware's
# round-to-nearest-even conversion (the same values in far fewer instructions).
INTERPRETED = tl.constexpr(_interpreting())

# Fields (rows) of the tensor table: six every kernel has, then the algorithm's state
# buffers STATE0, STATE1, ... in the order its kernel documents; an unused one holds 0.
NUMEL = tl.constexpr(0)
STEP = tl.constexpr(1)  # address of the tensor's fp32 step
GROUP = tl.constexpr(2)  # row of the hyperparameter table
PARAM = tl.constexpr(3)
GRAD = tl.constexpr(4)
MASTER_COPY = tl.constexpr(5)  # the fp32 master copy of a bf16/fp16 param (master_weights), or 0
STATE0 = tl.constexpr(6)
STATE1 = tl.constexpr(7)
STATE2 = tl.constexpr(8)
STATE3 = tl.constexpr(9)
STATE4 = tl.constexpr(10)
STATE5 = tl.constexpr(11)

# Columns every hyperparameter row starts with; an algorithm's own columns follow.
LR = tl.constexpr(0)  # float64 learning rate (used when no lr tensor is given)
LR_PTR_F32 = tl.constexpr(1)  # address of a 0-d fp32 lr tensor on the device, or 0
LR_PTR_F64 = tl.constexpr(2)  # address of a 0-d fp64 lr tensor on the device, or 0
N_LR = tl.constexpr(3)


@triton.jit
def field(table_ptr, n_rows, t, FIELD: tl.constexpr):
    """Entry FIELD of tensor t in the tensor table (an int64)."""
    return tl.load(table_ptr + FIELD * n_rows + t)


@triton.jit
def hyper_f64(hyper_row_ptr, COL: tl.constexpr):
    """Column COL of a hyperparameter row, as the float64 it holds."""
    return tl.load(hyper_row_ptr + COL).to(tl.float64, bitcast=True)


@triton.jit
def hyper_f32(hyper_row_ptr, COL: tl.constexpr):
    """Column COL of a hyperparameter row rounded to fp32, as torch rounds a Python float
    scalar for an fp32 tensor op."""
    return hyper_f64(hyper_row_ptr, COL).to(tl.float32)


@triton.jit
def program_chunk(chunks_ptr, CHUNK: tl.constexpr):
    """(tensor index, first element) of this program's chunk, both int64. Every start is a
    multiple of CHUNK (the host builds the table so); the hint sits on the load itself,
    where Triton 3.6 keeps it (applied to a helper's return value it is lost)."""
    c = tl.program_id(0).to(tl.int64)
    t = tl.load(chunks_ptr + 2 * c)
    start = tl.multiple_of(tl.load(chunks_ptr + 2 * c + 1), CHUNK)
    return t, start


@triton.jit
def chunk_prologue(table_ptr, n_rows, chunks_ptr, hyper_ptr, grad_scale_ptr, found_inf_ptr, clip_coef_ptr,
                   N_HYPER: tl.constexpr, CHUNK: tl.constexpr):
    """What every program needs first: its tensor t, first element and the tensor's numel;
    its step (fp32, already incremented for this step); its group's hyperparameter row and
    lr in fp64 (read from the group's lr tensor when it has one); the divisor of the grads
    (AMP scale, 1 without) and their clip coefficient (1 without); and whether to run at all
    (False when GradScaler found an inf). Grads are used as grad / grad_div * clip, torch's
    order."""
    t, start = program_chunk(chunks_ptr, CHUNK)
    numel = field(table_ptr, n_rows, t, NUMEL)
    step = tl.load(field(table_ptr, n_rows, t, STEP).to(tl.pointer_type(tl.float32)))
    hyper = hyper_ptr + field(table_ptr, n_rows, t, GROUP) * N_HYPER
    lr64 = hyper_f64(hyper, LR)
    lr_f32 = tl.load(hyper + LR_PTR_F32)
    if lr_f32 != 0:
        lr64 = tl.load(lr_f32.to(tl.pointer_type(tl.float32))).to(tl.float64)
    lr_f64 = tl.load(hyper + LR_PTR_F64)
    if lr_f64 != 0:
        lr64 = tl.load(lr_f64.to(tl.pointer_type(tl.float64)))
    grad_div = 1.0
    if grad_scale_ptr is not None:
        grad_div = tl.load(grad_scale_ptr).to(tl.float32)
    clip = 1.0
    if clip_coef_ptr is not None:
        clip = tl.load(clip_coef_ptr)
    run = True
    if found_inf_ptr is not None:
        run = tl.load(found_inf_ptr) == 0
    return t, start, numel, step, hyper, lr64, grad_div, clip, run


@triton.jit
def field_ptr(table_ptr, n_rows, t, FIELD: tl.constexpr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """The pointer stored in entry FIELD of tensor t, typed for DTYPE's storage.

    bf16 is addressed as uint16 and converted by bits (the interpreter's bf16 casts truncate
    and flush subnormals). ALIGNED promises 16-byte alignment (checked on the host)."""
    raw = field(table_ptr, n_rows, t, FIELD)
    if DTYPE == tl.bfloat16:
        ptr = raw.to(tl.pointer_type(tl.uint16))
    else:
        ptr = raw.to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def param_ptrs(table_ptr, n_rows, t, step, seed, PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr,
               MASTER: tl.constexpr, ALIGNED: tl.constexpr):
    """Pointers every update kernel uses: param, grad and the fp32 master (field MASTER_COPY
    when MASTER, else the param again), and the stochastic-rounding seed of this (step,
    tensor)."""
    param_ptr = field_ptr(table_ptr, n_rows, t, PARAM, PARAM_DTYPE, ALIGNED)
    grad_ptr = field_ptr(table_ptr, n_rows, t, GRAD, GRAD_DTYPE, ALIGNED)
    master_ptr = param_ptr
    if MASTER:
        master_ptr = field_ptr(table_ptr, n_rows, t, MASTER_COPY, tl.float32, ALIGNED)
    return param_ptr, grad_ptr, master_ptr, rounding_seed(seed, step, t)


@triton.jit
def widen(x, DTYPE: tl.constexpr):
    """A value loaded in DTYPE's storage form (bf16 as its uint16 bits) as fp32, exactly."""
    if DTYPE == tl.bfloat16:
        return (x.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)


@triton.jit
def narrow(x, DTYPE: tl.constexpr):
    """fp32 x in DTYPE's storage form, rounded to nearest even: bf16 as uint16 bits (NaN as
    0x7FC0, the NaN of c10::BFloat16's scalar conversion), fp16, or fp32 as it is."""
    if DTYPE == tl.bfloat16:
        if INTERPRETED:
            return bf16_bits_rne(x)
        else:
            # cvt.rn.bf16.f32 rounds to nearest even. A NaN reaching a store comes out of fp32
            # arithmetic (the GPU's canonical NaN 0x7FFFFFFF), which it turns into 0x7FFF; as
            # int16 nothing else it writes lies above 0x7FC0 (inf is 0x7F80), so a min maps
            # NaN to 0x7FC0 and leaves every other value: one instruction per 2 elements
            bits = x.to(tl.bfloat16).to(tl.int16, bitcast=True)
            return tl.minimum(bits, tl.cast(0x7FC0, tl.int16)).to(tl.uint16, bitcast=True)
    elif DTYPE == tl.float32:
        return x
    else:
        return x.to(DTYPE)


@triton.jit
def round_to(x, DTYPE: tl.constexpr):
    """fp32 x rounded to DTYPE (nearest even) and back: the value a store of x keeps."""
    return widen(narrow(x, DTYPE), DTYPE)


@triton.jit
def load_f32(ptr, offs, mask, DTYPE: tl.constexpr):
    """Load ptr[offs] (masked unless mask is None) and widen to fp32."""
    if mask is None:
        x = tl.load(ptr + offs)
    else:
        x = tl.load(ptr + offs, mask=mask, other=0)
    return widen(x, DTYPE)


@triton.jit
def store_f32(ptr, offs, x, mask, DTYPE: tl.constexpr):
    """Round the fp32 value x to DTYPE (nearest even) and store it at ptr[offs]."""
    tl.store(ptr + offs, narrow(x, DTYPE), mask=mask)


@triton.jit
def bf16_bits_rne(x):
    """fp32 -> bf16 bit pattern, rounded to nearest even, by integer arithmetic (what the
    interpreter needs: its own cast truncates). NaN -> 0x7FC0."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where(x != x, 0x7FC0, rounded)
    return rounded.to(tl.uint16)


@triton.jit
def bf16_bits_stochastic(x, random16):
    """fp32 -> bf16 bit pattern, rounded up with probability (dropped bits) / 2^16, so the
    rounding is unbiased; `random16` holds uniform integers in [0, 2^16). NaN -> 0x7FC0."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + random16.to(tl.uint32)) >> 16
    rounded = tl.where(x != x, 0x7FC0, rounded)
    return rounded.to(tl.uint16)


@triton.jit
def random16(seed, first, BLOCK: tl.constexpr):
    """BLOCK uniform 16-bit integers (in uint32) for elements first .. first + BLOCK - 1 of a
    tensor, first a multiple of 8: one Philox (32-bit counter first / 8 + i) gives four 32-bit
    words, each word two 16-bit halves, so 8 elements per Philox."""
    counter = (first // 8).to(tl.uint32) + tl.arange(0, BLOCK // 8).to(tl.uint32)
    r0, r1, r2, r3 = tl.randint4x(seed, counter)
    col = tl.arange(0, 8)[None, :]  # element 8 * i + col takes word col // 2, half col % 2
    word = tl.where(col < 4, tl.where(col < 2, r0[:, None], r1[:, None]),
                    tl.where(col < 6, r2[:, None], r3[:, None]))
    half = tl.where(col % 2 == 0, word & 0xFFFF, word >> 16)
    return tl.reshape(half, [BLOCK])


@triton.jit
def rounding_seed(seed, step, t):
    """Per-(step, tensor) Philox seed for stochastic rounding: reproducible for a given seed,
    different every step (the step is read on the device, so CUDA graphs replay correctly)."""
    return ((seed + step.to(tl.int64) * 1000003 + t * 7919) & 0x7FFFFFFF).to(tl.int32)


@triton.jit
def load_param(param_ptr, master_ptr, offs, mask, PARAM_DTYPE: tl.constexpr, MASTER: tl.constexpr):
    """The fp32 value being optimized: the fp32 master copy when MASTER, else the param."""
    if MASTER:
        return load_f32(master_ptr, offs, mask, tl.float32)
    else:
        return load_f32(param_ptr, offs, mask, PARAM_DTYPE)


@triton.jit
def store_param(param_ptr, master_ptr, offs, p, mask, first, seed, PARAM_DTYPE: tl.constexpr,
                MASTER: tl.constexpr, STOCHASTIC: tl.constexpr, BLOCK: tl.constexpr):
    """Write the updated fp32 value: into the master (fp32) and the param (nearest even)
    when MASTER; else into the param, stochastically rounded when STOCHASTIC (bf16 only;
    `first` is the element offs starts at, `seed` the rounding_seed; offs holds BLOCK
    consecutive elements, as a row or as a row-major 2-D tile)."""
    if MASTER:
        store_f32(master_ptr, offs, p, mask, tl.float32)
    if STOCHASTIC:
        random = random16(seed, first, BLOCK)
        if len(p.shape) > 1:  # a 2-D tile [rows, cols] of the BLOCK elements from first, row-major
            random = tl.reshape(random, p.shape)
        tl.store(param_ptr + offs, bf16_bits_stochastic(p, random), mask=mask)
    else:
        store_f32(param_ptr, offs, p, mask, PARAM_DTYPE)


@triton.jit
def unscale_clip_sign(g, grad_div, clip, SCALED: tl.constexpr, CLIPPED: tl.constexpr, MAXIMIZE: tl.constexpr):
    """The grad as an update uses it, in torch's order: divided by the AMP scale (IEEE
    division) when SCALED, times the clip coefficient when CLIPPED, negated when MAXIMIZE."""
    if SCALED:
        g = tl.div_rn(g, grad_div)
    if CLIPPED:
        g = g * clip
    if MAXIMIZE:
        g = -g
    return g


@triton.jit
def bias_correction(step, log2_beta):
    """1 - beta**step in fp64 from log2(beta) (a float64 from the host), as torch's
    double-precision `1 - beta ** step`."""
    return 1.0 - tl.exp2(step.to(tl.float64) * log2_beta)


@triton.jit
def lerp(start, end, weight):
    """torch.lerp with an fp32 scalar weight: start + w (end - start) for w < 0.5, else
    end - (end - start)(1 - w), written as one select and one multiply-add per element
    (a - b c == a + (-c) b exactly)."""
    low = weight < 0.5
    coef = tl.where(low, weight, -(1.0 - weight))
    return tl.where(low, start, end) + coef * (end - start)


@triton.jit
def increment_steps_of(table_ptr, n_rows, found_inf_ptr, BLOCK: tl.constexpr):
    """step += 1 for every tensor of a tensor table (unless found_inf != 0); run by ONE program."""
    inc = 1.0
    if found_inf_ptr is not None:
        inc = tl.where(tl.load(found_inf_ptr) == 0, 1.0, 0.0)
    # a while loop: Triton 3.6's interpreter cannot take a runtime bound in range()
    first = 0
    while first < n_rows:
        rows = first + tl.arange(0, BLOCK)
        mask = rows < n_rows
        step_ptrs = tl.load(table_ptr + STEP * n_rows + rows, mask=mask, other=0)
        step_ptrs = step_ptrs.to(tl.pointer_type(tl.float32))
        tl.store(step_ptrs, tl.load(step_ptrs, mask=mask) + inc, mask=mask)
        first += BLOCK


@triton.jit(do_not_specialize=["n_rows"])
def _increment_steps_kernel(
    table_ptr,  # int64 [n_fields, n_rows] tensor table; field STEP holds fp32 step pointers
    n_rows,  # tensors in the table
    found_inf_ptr,  # fp32 flag from GradScaler (None: no scaler); non-zero skips the increment
    BLOCK: tl.constexpr,
):
    # one program walks the whole table: a bucket has at most a few thousand tensors
    increment_steps_of(table_ptr, n_rows, found_inf_ptr, BLOCK)


# FMA contraction, set explicitly on every launch (Triton's default changes in 3.10): on, as
# nvcc compiles torch's CUDA kernels, and one rounding per a * b + c instead of two.
FP_FUSION = True
# Loads each SM should have in flight: Little's law for an H200 (4.8 TB/s over 132 SMs) at
# ~1 us loaded latency gives 36 KB; the register budget below aims 10% above that.
INFLIGHT_BYTES = 40 * 1024
# Dependent loads before a program's first data load (chunk table -> table row -> step):
# a program keeps its loads in flight for CHUNK / BLOCK of its CHUNK / BLOCK + 3 round trips.
PROLOGUE_ROUND_TRIPS = 3


def block_for(config, *dtypes):
    """Elements per loop iteration for a kernel whose streams have these triton dtypes.

    config["BLOCK"] counts 4-byte elements: BLOCK / (32 * num_warps) = 4 gives every thread
    one 128-bit access per fp32 stream. A bucket with a 2-byte stream takes twice the
    elements, so its 16-bit streams move 128 bits per access too (and its fp32 ones two).
    Never more than the chunk."""
    narrowest = min(d.primitive_bitwidth for d in dtypes) // 8
    return min(config["CHUNK"], config["BLOCK"] * 4 // narrowest)


def launch_options(config, block, aligned, *loads):
    """Compile options of a streaming launch whose loop loads streams of these triton dtypes,
    BLOCK elements per iteration: warps, FMA contraction and, on the aligned path where 2- and
    4-byte streams mix, a register cap (maxnreg) that leaves room for enough blocks per SM to
    keep INFLIGHT_BYTES of loads in flight. Without it Triton 3.6 gives bf16-param / fp32-state
    Adam 148 registers (3 blocks of 4 warps per SM, under 36 KB in flight). Buckets of one
    width stay within the budget uncapped, and are not capped: ptxas uses the registers it is
    allowed (Triton 3.9's fp32 Adam goes from 48 to 60 registers under a cap of 128); nor is
    the masked-only (unaligned) code, whose scalar accesses need more registers (it spills
    under the cap)."""
    threads = 32 * config["num_warps"]
    options = dict(num_warps=config["num_warps"], enable_fp_fusion=FP_FUSION)
    if aligned and len({d.primitive_bitwidth for d in loads}) > 1:
        loaded = block // threads * sum(d.primitive_bitwidth // 8 for d in loads)  # bytes per thread
        iters = config["CHUNK"] // block
        resident = INFLIGHT_BYTES * (iters + PROLOGUE_ROUND_TRIPS) / iters / loaded  # threads per SM
        blocks = math.ceil(resident / threads)
        options["maxnreg"] = min(255, 65536 // (blocks * threads) // 8 * 8)  # 64K registers per SM
    return options


def increment_steps(table, n_rows, found_inf=None):
    """step += 1 for every tensor of the table (one launch); no-op where found_inf != 0."""
    _increment_steps_kernel[(1,)](table, n_rows, found_inf, BLOCK=256, enable_fp_fusion=FP_FUSION)
