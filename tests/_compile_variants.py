"""Compile kernel variants for NVIDIA targets without a GPU (run without TRITON_INTERPRET).

Usage: python tests/_compile_variants.py OUT.json [CAPABILITY ...]
For every kernel: every (param, grad, state) dtype combination on the aligned and the
masked path, then every value of every flag and every optional pointer (None or given),
one at a time from a base variant, plus all flags on. Writes, per variant, whether it
compiled and which global load/store widths its PTX uses.
"""

import json
import re
import sys
from concurrent.futures import ProcessPoolExecutor

DTYPE_SETS = [  # (param, grad, state)
    ("fp32", "fp32", "fp32"), ("bf16", "bf16", "bf16"), ("fp16", "fp16", "fp16"),
    ("bf16", "bf16", "fp32"), ("fp16", "fp16", "fp32"), ("bf16", "fp32", "fp32"),
]
OPTIONAL_PTRS = ["grad_scale_ptr", "found_inf_ptr", "clip_coef_ptr"]
PTR_TYPES = {"grad_scale_ptr": "*fp32", "found_inf_ptr": "*fp32", "clip_coef_ptr": "*fp32"}


def kernel_specs():
    """name -> (scalar signature, base constexprs, flags {name: values})."""
    update_scalars = {"table_ptr": "*i64", "n_rows": "i32", "chunks_ptr": "*i64", "hyper_ptr": "*i64", "seed": "i32"}
    adam = dict(update_scalars)
    rms = dict(update_scalars)
    return {
        "adam": (adam, {"CHUNK": 4096, "BLOCK": 1024},
                 {"AMSGRAD": [False, True], "MAXIMIZE": [False, True], "WD_MODE": [0, 1, 2],
                  "MASTER": [False, True], "STOCHASTIC": [False, True]}),
        "rmsprop": (rms, {"CHUNK": 4096, "BLOCK": 1024},
                    {"CENTERED": [False, True], "MOMENTUM": [False, True], "MAXIMIZE": [False, True],
                     "WEIGHT_DECAY": [False, True], "MASTER": [False, True], "STOCHASTIC": [False, True]}),
        "norm": ({"table_ptr": "*i64", "n_rows": "i32", "chunks_ptr": "*i64", "partials_ptr": "*fp32",
                  "n_chunks": "i32"}, {"CHUNK": 4096, "BLOCK": 1024}, {}),
    }


def variants():
    out = []
    for name, (_, _, flags) in kernel_specs().items():
        base = {f: vals[0] for f, vals in flags.items()}
        opt_base = {p: False for p in OPTIONAL_PTRS}
        for dts in DTYPE_SETS:
            for aligned in (True, False):
                out.append((name, dts, aligned, base, opt_base))
        for flag, vals in flags.items():
            for v in vals[1:]:
                out.append((name, DTYPE_SETS[3], True, {**base, flag: v}, opt_base))
        ptrs = ["grad_scale_ptr", "found_inf_ptr"] if name == "norm" else OPTIONAL_PTRS
        for p in ptrs:
            out.append((name, DTYPE_SETS[0], True, base, {**opt_base, p: True}))
        all_on = {f: vals[-1] for f, vals in flags.items()}
        if "STOCHASTIC" in all_on:
            all_on["MASTER"] = False  # the two are alternatives
        out.append((name, DTYPE_SETS[3], True, all_on, {p: True for p in ptrs}))
    return out


def compile_one(args):
    name, dts, aligned, flags, ptrs, cap = args
    if name == "adam8bit":
        return compile_adam8bit(args)
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from adam_triton.kernels import adam, norm, rmsprop

    fn = {"adam": adam._adam_kernel, "rmsprop": rmsprop._rmsprop_kernel, "norm": norm._grad_sq_partials_kernel}[name]
    tl_dt = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16}
    scalars, base, _ = kernel_specs()[name]
    constexprs = dict(base)
    constexprs.update(flags)
    constexprs["ALIGNED"] = aligned
    if name == "norm":
        constexprs["GRAD_DTYPE"] = tl_dt[dts[1]]
    else:
        constexprs.update(PARAM_DTYPE=tl_dt[dts[0]], GRAD_DTYPE=tl_dt[dts[1]], STATE_DTYPE=tl_dt[dts[2]])
    signature = {}
    for arg in fn.arg_names:
        if arg in scalars:
            signature[arg] = scalars[arg]
        elif arg in PTR_TYPES:
            if ptrs.get(arg):
                signature[arg] = PTR_TYPES[arg]
            else:
                signature[arg] = "constexpr"
                constexprs[arg] = None
        else:
            signature[arg] = "constexpr"
    try:
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
        ptx = triton.compile(src, target=GPUTarget("cuda", cap, 32), options={"enable_fp_fusion": True}).asm["ptx"]
        widths = sorted(set(re.findall(r"(?:ld|st)\.global(?:\.[a-z0-9]+)*", ptx)))
        return dict(kernel=name, dtypes=dts, aligned=aligned, flags=flags, ptrs=ptrs, cap=cap, ok=True, widths=widths)
    except Exception as e:  # reported, and the test fails on it
        return dict(kernel=name, dtypes=dts, aligned=aligned, flags=flags, ptrs=ptrs, cap=cap, ok=False,
                    error=f"{type(e).__name__}: {e}"[:2000])


# -- the 8-bit Adam kernel (kernels/adam8bit.py) ----------------------------------------------
# Its own block: param and grad dtypes only (the states are uint8 codes and fp32 absmax), the
# quantization block size among the flags, the tile (BLOCK) from the launcher's rule, and
# fp-contraction off as at its launch.
ADAM8BIT_DTYPES = [("fp32", "fp32"), ("bf16", "bf16"), ("fp16", "fp16"), ("bf16", "fp32")]
ADAM8BIT_FLAGS = {"AMSGRAD": [False, True], "MAXIMIZE": [False, True], "WD_MODE": [2, 1], "MASTER": [False, True],
                  "STOCHASTIC": [False, True], "QBLOCK": [256, 64, 2048]}


def adam8bit_variants():
    base = {f: vals[0] for f, vals in ADAM8BIT_FLAGS.items()}
    no_ptrs = {p: False for p in OPTIONAL_PTRS}
    out = [("adam8bit", dts, True, base, no_ptrs) for dts in ADAM8BIT_DTYPES]
    out += [("adam8bit", ADAM8BIT_DTYPES[0], False, base, no_ptrs)]
    for flag, vals in ADAM8BIT_FLAGS.items():
        for v in vals[1:]:
            dts = ADAM8BIT_DTYPES[1] if flag in ("MASTER", "STOCHASTIC") else ADAM8BIT_DTYPES[0]
            out.append(("adam8bit", dts, True, {**base, flag: v}, no_ptrs))
    for p in OPTIONAL_PTRS:
        out.append(("adam8bit", ADAM8BIT_DTYPES[0], True, base, {**no_ptrs, p: True}))
    all_on = {**{f: vals[-1] for f, vals in ADAM8BIT_FLAGS.items()}, "MASTER": False, "QBLOCK": 256}
    out.append(("adam8bit", ADAM8BIT_DTYPES[1], True, all_on, {p: True for p in OPTIONAL_PTRS}))
    return out


def compile_adam8bit(args):
    name, dts, aligned, flags, ptrs, cap = args
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from adam_triton import tuning
    from adam_triton.kernels import adam8bit

    fn = adam8bit._adam8bit_kernel
    tl_dt = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16}
    config = tuning.DEFAULT_CONFIG
    constexprs = dict(flags, ALIGNED=aligned, PARAM_DTYPE=tl_dt[dts[0]], GRAD_DTYPE=tl_dt[dts[1]],
                      CHUNK=config["CHUNK"], BLOCK=adam8bit.tile_elements(flags["QBLOCK"], config["CHUNK"],
                                                                         config["num_warps"]))
    scalars = {"table_ptr": "*i64", "n_rows": "i32", "chunks_ptr": "*i64", "hyper_ptr": "*i64", "maps_ptr": "*fp32",
               "seed": "i32"}
    signature = {}
    for arg in fn.arg_names:
        if arg in scalars:
            signature[arg] = scalars[arg]
        elif arg in PTR_TYPES and ptrs.get(arg):
            signature[arg] = PTR_TYPES[arg]
        else:
            signature[arg] = "constexpr"
            if arg in PTR_TYPES:
                constexprs[arg] = None
    result = dict(kernel=name, dtypes=dts, aligned=aligned, flags=flags, ptrs=ptrs, cap=cap)
    try:
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
        options = {"enable_fp_fusion": adam8bit.ENABLE_FP_FUSION, "num_warps": config["num_warps"]}
        ptx = triton.compile(src, target=GPUTarget("cuda", cap, 32), options=options).asm["ptx"]
        widths = sorted(set(re.findall(r"(?:ld|st)\.global(?:\.[a-z0-9]+)*", ptx)))
        return dict(result, ok=True, widths=widths)
    except Exception as e:  # reported, and the test fails on it
        return dict(result, ok=False, error=f"{type(e).__name__}: {e}"[:2000])


def main():
    out_path = sys.argv[1]
    caps = [int(c) for c in sys.argv[2:]] or [80, 90]
    jobs = [(*v, cap) for cap in caps for v in variants() + adam8bit_variants()]
    with ProcessPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(compile_one, jobs))
    with open(out_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
