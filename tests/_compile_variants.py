"""Compile kernel variants for NVIDIA targets without a GPU (run without TRITON_INTERPRET) and
read what a GPU would run from the compiled code.

Usage: python tests/_compile_variants.py OUT.json [CAPABILITY ...]  (sm_80 and sm_90 by default)

Each variant is launched through its public launcher (adam_update, rmsprop_update,
grad_sq_partials, clip_coefficient) with the untuned config (tuning.DEFAULT_CONFIG), the
kernel's run() stubbed out: so the constexprs (BLOCK per dtype, ...) and compile options
(num_warps, maxnreg, enable_fp_fusion) are the ones a GPU launch uses. The specialization
is then compiled for each capability with Triton's own ptxas, and cuobjdump (both ship in
the Triton wheel) disassembles it. Per variant the JSON holds: PTX sqrt/div/rcp flavours and
flush-to-zero arithmetic, registers, local-memory (spill) accesses, and the hot loop of the
aligned path (the loop with the most unpredicated >= 8-byte global loads): its load and
store widths, whether every load is issued before the first use of a loaded value (one
memory round trip per iteration), and the loads in flight per SM that implies.
"""

import json
import math
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

DTYPE_SETS = [  # (param, grad, state)
    ("fp32", "fp32", "fp32"), ("bf16", "bf16", "bf16"), ("fp16", "fp16", "fp16"),
    ("bf16", "bf16", "fp32"), ("fp16", "fp16", "fp32"), ("bf16", "fp32", "fp32"),
]
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "u8": 1}
# (param, grad, state) of the 8-bit kernel: its states are uint8 codes with an fp32 absmax per block
DTYPE_SETS_8BIT = [("fp32", "fp32", "u8"), ("bf16", "bf16", "u8"), ("fp16", "fp16", "u8"), ("bf16", "fp32", "u8")]
# optional pointer arguments (a group's lr tensor is not one: the kernels read it through the
# hyperparameter table, in every variant)
OPTIONAL = ("grad_scale", "found_inf", "clip_coef")
FLAGS = {  # launcher flags besides dtypes and pointers: values, first is the base
    "adam": {"amsgrad": [False, True], "maximize": [False, True], "wd_mode": [0, 1, 2],
             "master": [False, True], "stochastic": [False, True]},
    "rmsprop": {"centered": [False, True], "momentum": [0.0, 0.9], "maximize": [False, True],
                "weight_decay": [0.0, 0.01], "master": [False, True], "stochastic": [False, True]},
    "norm": {},
    "adam8bit": {"amsgrad": [False, True], "maximize": [False, True], "wd_mode": [2, 1],
                 "master": [False, True], "stochastic": [False, True], "block_size": [256, 64, 2048]},
}
SM90 = dict(regs=65536, max_warps=64, max_ctas=32, alloc=256)
PROLOGUE_ROUND_TRIPS = 3  # chunk table -> table row -> step, before the first data load


def variants():
    """(kernel, dtypes, aligned, flags, optional pointers) to compile: every dtype set on the
    aligned and the masked path, every other flag value and optional pointer one at a time
    (fp32 or bf16 params with fp32 states), all flags on together, and the 16-bit cases
    that change the code (stochastic rounding, master weights, RMSprop with 16-bit states)."""
    out = []
    for name, flags in FLAGS.items():
        base = {f: vals[0] for f, vals in flags.items()}
        dtype_sets = {"norm": [d for d in DTYPE_SETS if d[0] == d[1]][:3], "adam8bit": DTYPE_SETS_8BIT}.get(
            name, DTYPE_SETS)
        for dts in dtype_sets:
            for aligned in (True, False):
                out.append((name, dts, aligned, base, ()))
        for flag, vals in flags.items():  # master / stochastic: for 16-bit params only
            for v in vals[1:]:
                dts = dtype_sets[3] if flag in ("master", "stochastic") else dtype_sets[0]
                out.append((name, dts, True, {**base, flag: v}, ()))
        optional = ("grad_scale", "found_inf") if name == "norm" else OPTIONAL
        for p in optional:
            out.append((name, dtype_sets[0], True, base, (p,)))
        if name != "norm":
            all_on = {f: vals[-1] for f, vals in flags.items()}
            all_on["master"] = False  # master and stochastic are alternatives
            all_on.update({"block_size": 256} if name == "adam8bit" else {})
            out.append((name, dtype_sets[3], True, all_on, optional))
            out.append((name, dtype_sets[1], True, {**base, "stochastic": True}, ()))
        if name == "rmsprop":
            out.append((name, DTYPE_SETS[2], True, {**base, "centered": True, "momentum": 0.9}, ()))
    out.append(("clip", (), False, {}, ()))
    return out


def streams(name, dts, flags):
    """(bytes of each loaded stream, bytes of each stored stream) per element of the hot loop."""
    p, g, s = (BYTES[d] for d in dts) if dts else (4, 4, 4)
    param_load = 4 if flags.get("master") else p
    param_store = [p] + ([4] if flags.get("master") else [])
    if name == "adam":
        st = [s, s] + ([s] if flags["amsgrad"] else [])
        return [g, param_load] + st, st + param_store
    if name == "rmsprop":
        st = [s] + ([s] if flags["centered"] else []) + ([s] if flags["momentum"] else [])
        return [g, param_load] + st, st + param_store
    if name == "adam8bit":  # the uint8 codes (each block's fp32 absmax is read and written once a program)
        st = [1, 1] + ([1] if flags["amsgrad"] else [])
        return [g, param_load] + st, st + param_store
    if name == "norm":
        return [g], []
    return [], []


def capture_launch(name, dts, aligned, flags, ptrs):
    """(kernel, positional args, keyword args) that the public launcher passes for a variant,
    with the default (untuned) GPU config; the kernel's run() is stubbed: nothing launches."""
    import torch
    import triton.language as tl

    from adam_triton import tuning
    from adam_triton.kernels import adam, adam8bit, norm, quant8, rmsprop

    tl_dt = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16}
    kern = {"adam": adam._adam_kernel, "rmsprop": rmsprop._rmsprop_kernel,
            "norm": norm._grad_sq_partials_kernel, "clip": norm._clip_coef_kernel,
            "adam8bit": adam8bit._adam8bit_kernel}[name]
    got = {}

    def record(*args, grid, warmup, **kwargs):
        got.update(args=args, kwargs=kwargs)

    kern.run = record
    table = torch.zeros(9, 3, dtype=torch.int64)
    chunks = torch.zeros(3, 2, dtype=torch.int64)
    hyper = torch.zeros(2, 11, dtype=torch.int64)
    scalar = {p: torch.ones((), dtype=torch.float32) if p in ptrs else None for p in OPTIONAL}
    config = dict(tuning.DEFAULT_CONFIG)
    if name == "clip":
        norm.clip_coefficient(torch.zeros(3), 3, 1.0, torch.zeros(()), torch.zeros(()))
    elif name == "norm":
        norm.grad_sq_partials(table, 3, chunks, 3, torch.zeros(3), grad_dtype=tl_dt[dts[1]], aligned=aligned,
                              config=config, grad_scale=scalar["grad_scale"], found_inf=scalar["found_inf"])
    else:
        common = dict(
            param_dtype=tl_dt[dts[0]], grad_dtype=tl_dt[dts[1]], aligned=aligned,
            config=config, grad_scale=scalar["grad_scale"], found_inf=scalar["found_inf"],
            clip_coef=scalar["clip_coef"], master=flags["master"], stochastic=flags["stochastic"], seed=7,
        )
        if name == "adam8bit":
            maps = torch.zeros(quant8.MAP_WORDS, dtype=torch.int32)
            adam8bit.adam8bit_update(table, 3, chunks, 3, hyper, maps, block_size=flags["block_size"],
                                     amsgrad=flags["amsgrad"], maximize=flags["maximize"], wd_mode=flags["wd_mode"],
                                     **common)
            return kern, got["args"], got["kwargs"]
        common["state_dtype"] = tl_dt[dts[2]]
        if name == "adam":
            adam.adam_update(table, 3, chunks, 3, hyper, amsgrad=flags["amsgrad"], maximize=flags["maximize"],
                             wd_mode=flags["wd_mode"], **common)
        else:
            rmsprop.rmsprop_update(table, 3, chunks, 3, hyper, weight_decay=flags["weight_decay"] != 0,
                                   momentum=flags["momentum"] != 0, centered=flags["centered"],
                                   maximize=flags["maximize"], **common)
    return kern, got["args"], got["kwargs"]


def compile_one(job):
    name, dts, aligned, flags, ptrs, cap = job
    rec = dict(kernel=name, dtypes=dts, aligned=aligned, flags=flags, ptrs=list(ptrs), cap=cap)
    try:
        import torch
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        fn, args, kwargs = capture_launch(name, dts, aligned, flags, ptrs)
        option_names = ("num_warps", "maxnreg", "enable_fp_fusion")
        options = {k: kwargs[k] for k in option_names if k in kwargs}
        constexprs = {k: v for k, v in kwargs.items() if k not in option_names}
        signature, attrs = {}, {}
        for i, arg in enumerate(fn.arg_names):
            if arg in constexprs:
                signature[arg] = "constexpr"
                continue
            value = args[i]
            if value is None:
                signature[arg] = "constexpr"
                constexprs[arg] = None
            elif isinstance(value, torch.Tensor):
                signature[arg] = {torch.int64: "*i64", torch.int32: "*i32", torch.float32: "*fp32"}[value.dtype]
                attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
            elif isinstance(value, float):
                signature[arg] = "fp32"
            else:
                signature[arg] = "i32"
        rec.update(options=options, block=constexprs.get("BLOCK"), chunk=constexprs.get("CHUNK"),
                   triton=triton.__version__)
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", cap, 32), options=options)
        ptx = compiled.asm["ptx"]
        accesses = re.findall(r"(?:ld|st)\.global(?:\.[a-z0-9]+)*", ptx)
        rec.update(ok=True, widths=sorted(set(accesses)), vector_accesses=sum(".v2" in a or ".v4" in a for a in accesses),
                   ptx_ops=ptx_ops(ptx), bf16_cvt=bool(re.search(r"cvt\.rn\.bf16(x2)?\.f32", ptx)))
        rec.update(sass_stats(compiled.asm["cubin"], rec, *streams(name, dts, flags)))
    except Exception as e:  # reported, and the test fails on it
        rec.update(ok=False, error=f"{type(e).__name__}: {e}"[:2000])
    return rec


def ptx_ops(ptx):
    """Counts of the fp32 sqrt / div / rcp flavours and of fp32 arithmetic with .ftz."""
    out = {}
    for m in re.finditer(r"\b(sqrt|rsqrt|div|rcp|add|sub|mul|fma|abs|neg|min|max)\.([a-z.]*?)f32\b", ptx):
        key = f"{m.group(1)}.{m.group(2)}f32"
        out[key] = out.get(key, 0) + 1
    return out


def cuobjdump():
    import triton.backends.nvidia as nv

    return str(Path(nv.__file__).parent / "bin" / "cuobjdump")


INSN_RE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
REG_RE = re.compile(r"(?<![\w.])R(\d+)(\.64|\.128)?\b")


def regs(operand, width=1):
    out = []
    for m in REG_RE.finditer(operand):
        n = int(m.group(1))
        k = {".64": 2, ".128": 4}.get(m.group(2), width)
        out += range(n, n + k)
    return out


def parse(text):
    """[(address, predicate or None, opcode, [operands])] of cuobjdump -sass output."""
    out = []
    for addr, body in INSN_RE.findall(text):
        pred = None
        if body.startswith("@"):
            pred, body = body.split(None, 1)
        op, _, rest = body.partition(" ")
        out.append((int(addr, 16), pred, op, [o.strip() for o in rest.split(",")] if rest else []))
    return out


def is_global(op, kind):
    return op.split(".")[0] in {"load": ("LDG",), "store": ("STG",)}[kind] and "CONSTANT" not in op


def is_local(op):
    return op.split(".")[0] in ("LDL", "STL")


def access_bytes(op):
    return 16 if ".128" in op else 8 if ".64" in op else 2 if ".U16" in op or ".S16" in op else 4


def sass_stats(cubin, rec, load_streams, store_streams):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        Path(path).write_bytes(cubin)
        sass = subprocess.run([cuobjdump(), "-sass", path], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([cuobjdump(), "-res-usage", path], capture_output=True, text=True, check=True).stdout
    n_regs = int(re.search(r"REG:(\d+)", res).group(1))
    insns = parse(sass)
    out = dict(regs=n_regs, local_accesses=sum(1 for _, _, op, _ in insns if is_local(op)))
    # loops: backward branches; the hot one moves the most unpredicated >= 8-byte global loads
    index = {a: i for i, (a, _, _, _) in enumerate(insns)}
    best, best_bytes = None, 0
    for i, (addr, _, op, ops) in enumerate(insns):
        if op.startswith("BRA") and ops and re.fullmatch(r"0x[0-9a-f]+", ops[-1]):
            target = int(ops[-1], 16)
            if target < addr and target in index:
                body = insns[index[target]:i + 1]
                b = sum(access_bytes(o) for _, p, o, _ in body if p is None and is_global(o, "load")
                        and access_bytes(o) >= 8)
                if b > best_bytes:
                    best, best_bytes = body, b
    if best is None or not rec["aligned"]:
        return out
    out["loop_local_accesses"] = sum(1 for _, _, op, _ in best if is_local(op))
    widths = {}
    for _, p, op, _ in best:
        if p is None and (is_global(op, "load") or is_global(op, "store")):
            widths[op] = widths.get(op, 0) + 1
    # one round trip: no global load after the first instruction that reads a loaded register
    loaded, used, late = set(), False, 0
    for _, p, op, ops in best:
        if p is None and is_global(op, "load"):
            late += used
            loaded |= set(regs(ops[0], {16: 4, 8: 2}.get(access_bytes(op), 1)))
        elif loaded & set(r for o in (ops if is_global(op, "store") else ops[1:]) for r in regs(o)):
            used = True
    threads_cta = rec["options"]["num_warps"] * 32
    per_thread = rec["block"] // threads_cta  # elements per thread and iteration
    ld_bytes = sum(access_bytes(o) for _, p, o, _ in best if p is None and is_global(o, "load"))
    warps_cta = threads_cta // 32
    per_warp = math.ceil(n_regs * 32 / SM90["alloc"]) * SM90["alloc"]
    ctas = min(SM90["max_ctas"], SM90["max_warps"] // warps_cta, SM90["regs"] // per_warp // warps_cta)
    iters = rec["chunk"] // rec["block"]
    out.update(
        hot_widths=widths, late_loads=late, ld_bytes_per_thread=ld_bytes,
        expected_ld_bytes=per_thread * sum(load_streams), expected_st_bytes=per_thread * sum(store_streams),
        st_bytes_per_thread=sum(access_bytes(o) for _, p, o, _ in best if p is None and is_global(o, "store")),
        ctas_per_sm=ctas,
        inflight_kb=ld_bytes * ctas * threads_cta * iters / (iters + PROLOGUE_ROUND_TRIPS) / 1024,
    )
    return out


def main():
    out_path = sys.argv[1]
    caps = [int(c) for c in sys.argv[2:]] or [80, 90]
    # sm_90 (what the checks are about) gets every variant; older targets the base flags of
    # every dtype set on both paths (that each compiles, with IEEE math), to keep CI short
    base = {name: {f: vals[0] for f, vals in flags.items()} for name, flags in FLAGS.items()}
    jobs = [(*v, cap) for cap in caps for v in variants()
            if cap >= 90 or v[3] == base.get(v[0], {}) and not v[4]]
    with ProcessPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(compile_one, jobs))
    with open(out_path, "w") as f:
        json.dump(results, f, default=str)


if __name__ == "__main__":
    main()
