"""Launch configurations: one fixed config under the interpreter, autotuned on the GPU.

Tuning runs the kernel on scratch tensors shaped like the bucket (never on the user's
tensors, so no update is ever applied twice) and keeps the fastest config per
(kernel, device, dtypes, flags, size class) for the rest of the process.
Set ADAM_TRITON_AUTOTUNE=0 to skip tuning and use DEFAULT_CONFIG.
"""

import math
import os

import torch
import triton

# Under the interpreter every tl operation costs the same whatever its size, so the largest
# block makes the CPU tests fastest; warps mean nothing there.
INTERPRETER_CONFIG = {"CHUNK": 4096, "BLOCK": 1024, "num_warps": 1}
# Untuned GPU default: 16 KB of fp32 per stream per program, 128-bit accesses per thread.
DEFAULT_CONFIG = {"CHUNK": 4096, "BLOCK": 1024, "num_warps": 4}
# Candidates tried by the autotuner: chunk (work per program) x block (work per iteration) x warps.
CANDIDATES = [
    {"CHUNK": chunk, "BLOCK": block, "num_warps": warps}
    for chunk in (2048, 4096, 8192, 16384)
    for block, warps in ((512, 4), (1024, 4), (1024, 8), (2048, 8))
    if block <= chunk
]
# Scratch tensors for tuning hold at most this many elements per stream (128 MiB in fp32).
SCRATCH_LIMIT = 1 << 25

_tuned = {}


def interpreter_on():
    """True when Triton kernels run through the CPU interpreter (TRITON_INTERPRET=1)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotune_enabled():
    return os.environ.get("ADAM_TRITON_AUTOTUNE", "1") != "0"


def size_class(numels):
    """Coarse workload class: (log2 of total elements, log2 of tensor count)."""
    total = max(1, sum(numels))
    return (int(math.log2(total)), int(math.log2(max(1, len(numels)))))


def config_for(key, bench):
    """The launch config for key. bench(config) -> milliseconds, on scratch tensors."""
    if interpreter_on():
        return INTERPRETER_CONFIG
    config = _tuned.get(key)
    if config is not None:
        return config
    if not autotune_enabled() or torch.cuda.is_current_stream_capturing():
        return DEFAULT_CONFIG
    timings = [(bench(c), i) for i, c in enumerate(CANDIDATES)]
    config = CANDIDATES[min(timings)[1]]
    _tuned[key] = config
    return config


def scratch_numels(numels):
    """Tensor sizes for tuning scratch: the bucket's own, cut off at SCRATCH_LIMIT in total."""
    out, total = [], 0
    for n in numels:
        if total + n > SCRATCH_LIMIT:
            out.append(max(1, SCRATCH_LIMIT - total))
            break
        out.append(n)
        total += n
    return [n for n in out if n > 0] or [1]
