"""What `adam-triton check` runs: every optimizer for a few steps on tensors of odd sizes, in
fp32 and bf16, against torch.optim and adam_triton.reference in float64, and the 8-bit
optimizers against the 8-bit reference code for code; one printed row per (case, dtype)."""

import math
import traceback

import torch  # does not import triton

# Tensor shapes of `check`: odd sizes, so every kernel sees partial blocks and chunks
# (4097 spans two chunks of 4096), plus one 2-D tensor.
CHECK_SHAPES = [(1,), (17,), (1025,), (4097,), (33, 65)]
# Tolerances, each times max(1, max |ref64|) of the tensor kind (params, each state buffer).
# fp32: |ours - torch| and |ours - ref64| after a few steps from params ~ N(0, 1) are a few
# fp32 ulps (~1e-7 .. 1e-6 seen); 1e-5 leaves room without hiding a wrong formula.
FP32_ATOL = 1e-5
# bf16: no worse than twice torch's own error against the fp64 reference, plus this.
BF16_ATOL = 1e-6
# The perturbation --inject-error adds to one element of our first fp32 result.
INJECTED_ERROR = 1e-3


def check_cases():
    """(name, optimizer class name, constructor kwargs) of every case `check` runs; the
    RMSprop cases only where adam_triton.RMSprop exists."""
    import adam_triton

    cases = [
        ("Adam", "Adam", dict(lr=1e-2)),
        ("Adam wd=0.1 maximize", "Adam", dict(lr=1e-2, weight_decay=0.1, maximize=True)),
        ("AdamW wd=0.1", "AdamW", dict(lr=1e-2, weight_decay=0.1)),
        ("Adam amsgrad", "Adam", dict(lr=1e-2, amsgrad=True)),
    ]
    if getattr(adam_triton, "RMSprop", None) is not None:
        cases += [
            ("RMSprop", "RMSprop", dict(lr=1e-2)),
            ("RMSprop centered momentum wd", "RMSprop",
             dict(lr=1e-2, momentum=0.9, centered=True, weight_decay=0.1)),
        ]
    return cases


def _tensors_by_kind(params, opt):
    """{"param": params, "step": steps, <state key>: buffers} of an optimizer after its steps."""
    kinds = {"param": list(params)}
    for p in params:
        for key, value in opt.state[p].items():
            kinds.setdefault(key, []).append(value)
    return kinds


def reference_run(cls_name, group, init64, grads64):
    """The algorithm of torch.optim.<cls_name> run by adam_triton.reference in float64 from
    init64 over the steps' grads64; returns tensors by kind, as _tensors_by_kind."""
    from . import reference

    beta1, beta2 = (float(b) for b in group.get("betas", (0.0, 0.0)))
    if cls_name in ("Adam", "AdamW"):
        step_fn = reference.adam_step
        slots = ["exp_avg", "exp_avg_sq", "max_exp_avg_sq" if group["amsgrad"] else None]
        hyper = dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                     weight_decay=group["weight_decay"], amsgrad=group["amsgrad"],
                     maximize=group["maximize"], decoupled_weight_decay=group["decoupled_weight_decay"])
    elif cls_name == "RMSprop":
        step_fn = reference.rmsprop_step
        slots = ["square_avg", "momentum_buffer" if group["momentum"] > 0 else None,
                 "grad_avg" if group["centered"] else None]
        hyper = dict(lr=group["lr"], alpha=group["alpha"], eps=group["eps"],
                     weight_decay=group["weight_decay"], momentum=group["momentum"],
                     centered=group["centered"], maximize=group["maximize"])
    else:
        raise ValueError(f"no reference for {cls_name}")
    params = [t.clone() for t in init64]
    steps = [t.new_zeros(()) for t in init64]
    states = {key: [torch.zeros_like(t) for t in init64] for key in slots if key is not None}
    for grads in grads64:
        step_fn(params, grads, *[states.get(key) for key in slots], steps, **hyper)
    return {"param": params, "step": steps, **states}


def _max_abs_diff(a_tensors, b_tensors):
    """max |a - b| over pairs of tensors, in float64 on the CPU; inf where either has a NaN."""
    out = 0.0
    for a, b in zip(a_tensors, b_tensors, strict=True):
        d = (a.detach().cpu().double() - b.detach().cpu().double()).abs().max().item()
        out = math.inf if math.isnan(d) else max(out, d)
    return out


def compare(ours, theirs, ref, low_precision):
    """Errors of one tensor kind and the verdict: dict(ours_torch, ours_ref, torch_ref,
    bound, ok). Tolerances scale with the kind's magnitude, max(1, max |ref|).

    fp32: both max|ours - torch| and max|ours - ref| <= FP32_ATOL * scale.
    bf16: max|ours - ref| <= 2 max|torch - ref| + BF16_ATOL * scale."""
    scale = max([1.0] + [t.detach().abs().max().item() for t in ref])
    out = dict(ours_torch=_max_abs_diff(ours, theirs), ours_ref=_max_abs_diff(ours, ref),
               torch_ref=_max_abs_diff(theirs, ref))
    if low_precision:
        out["bound"] = 2 * out["torch_ref"] + BF16_ATOL * scale
        out["ok"] = out["ours_ref"] <= out["bound"]
    else:
        out["bound"] = FP32_ATOL * scale
        out["ok"] = out["ours_torch"] <= out["bound"] and out["ours_ref"] <= out["bound"]
    return out


def run_check_case(name, cls_name, kwargs, dtype, device, steps, inject_error=False):
    """One row of `check`: adam_triton.<cls_name> and torch.optim.<cls_name>(foreach=False)
    in dtype on device, and adam_triton.reference in float64 from the same (rounded) initial
    values and grads, for `steps` steps on tensors of CHECK_SHAPES.

    Returns the params' compare() dict plus case, dtype, and failed: the kinds (param,
    step, each state buffer) that failed their criterion."""
    import adam_triton

    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen).to(dtype) for s in CHECK_SHAPES]
    grads = [[torch.randn(s, generator=gen).to(dtype) for s in CHECK_SHAPES] for _ in range(steps)]

    def run(cls, **extra):
        params = [torch.nn.Parameter(t.to(device).clone()) for t in init]
        opt = cls(params, **kwargs, **extra)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.to(device).clone()
            opt.step()
        return opt, _tensors_by_kind(params, opt)

    ours_opt, ours = run(getattr(adam_triton, cls_name))
    if inject_error:
        with torch.no_grad():
            ours["param"][0].view(-1)[0] += INJECTED_ERROR
    _, theirs = run(getattr(torch.optim, cls_name), foreach=False)
    ref = reference_run(cls_name, ours_opt.param_groups[0], [t.double() for t in init],
                        [[g.double() for g in step_grads] for step_grads in grads])

    if not set(ours) == set(theirs) == set(ref):
        failed = ["state keys differ: " + " / ".join(str(sorted(k)) for k in (ours, theirs, ref))]
        kinds = {}
    else:
        kinds = {k: compare(ours[k], theirs[k], ref[k], dtype != torch.float32) for k in ours}
        failed = [k for k, v in kinds.items() if not v["ok"]]
    row = dict(kinds.get("param", dict(ours_torch=math.nan, ours_ref=math.nan, torch_ref=math.nan,
                                       bound=math.nan)))
    row.update(case=name, dtype=DTYPE_NAMES[dtype], failed=failed)
    return row


DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}
ROW_FORMAT = "{case:<30} {dtype:<5} {ours_torch:>15} {ours_ref:>15} {torch_ref:>16} {bound:>11}  {result}"


# -- check: 8-bit states ----------------------------------------------------------------------
# min_8bit_size of the 8-bit rows: of CHECK_SHAPES, 1025, 4097 and 33 x 65 get 8-bit states,
# 1 and 17 keep fp32 states (Adam's kernel), as in a model.
CHECK_MIN_8BIT = 1000
# An 8-bit row passes when no code is more than one apart from the reference's, at most this
# share is one apart (a value at a decision point that fp32 rounding decides otherwise; none
# through the interpreter), absmax agree to this relative error, and params are within the
# bound: FP32_ATOL (fp32) or one bf16 ulp (bf16 params), times max(1, max|ref|).
MAX_CODES_ONE_APART = 1e-3
ABSMAX_RTOL = 1e-6
ROW8_FORMAT = "{case:<30} {dtype:<5} {ours_ref:>14} {one_apart:>14} {further:>8} {absmax:>11} {bound:>11}  {result}"


def check_cases_8bit():
    """(name, optimizer class name, constructor kwargs) of the 8-bit rows of `check`."""
    return [
        ("AdamW8bit", "AdamW8bit", dict(lr=1e-2)),
        ("Adam8bit wd=0.1 amsgrad", "Adam8bit", dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
        ("AdamW8bit block 64 maximize", "AdamW8bit", dict(lr=1e-2, block_size=64, maximize=True)),
    ]


def reference_run_8bit(group, init, grads):
    """adam_triton.reference on CPU copies of init: adam8bit_step (8-bit states) for tensors of
    at least the group's min_8bit_size, adam_step in fp32 (upcast_step) for smaller ones;
    returns (params, {state key: tensors}) in the optimizer's state layout."""
    from . import reference

    beta1, beta2 = (float(b) for b in group["betas"])
    hyper = dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                 amsgrad=group["amsgrad"], maximize=group["maximize"],
                 decoupled_weight_decay=group["decoupled_weight_decay"])
    names = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if group["amsgrad"] else [])
    params, states = [], []
    for t, tensor_grads in zip(init, zip(*grads)):
        p, step = t.clone(), torch.zeros(())
        if t.numel() >= group["min_8bit_size"]:
            blocks = -(-t.numel() // group["block_size"])
            st = {name: [torch.full(t.shape, 127 if name == "exp_avg" else 0, dtype=torch.uint8), torch.zeros(blocks)]
                  for name in names}
            for g in tensor_grads:
                reference.adam8bit_step([p], [g], [st["exp_avg"]], [st["exp_avg_sq"]], [st.get("max_exp_avg_sq")],
                                        [step], block_size=group["block_size"], **hyper)
            st = {f"{name}_{kind}": pair[k] for name, pair in st.items() for k, kind in enumerate(("codes", "absmax"))}
        else:
            st = {name: torch.zeros(t.shape) for name in names}
            for g in tensor_grads:
                reference.upcast_step(reference.adam_step, [[p], [g], *[[st[n]] for n in names],
                                                            *([None] if len(names) == 2 else [])],
                                      [step], torch.float32, **hyper)
        params.append(p)
        states.append(dict(st, step=step))
    return params, states


def run_check_case_8bit(name, cls_name, kwargs, dtype, device, steps):
    """One 8-bit row of `check`: adam_triton.<cls_name> (min_8bit_size CHECK_MIN_8BIT) in dtype
    on device against reference_run_8bit from the same params and grads, over CHECK_SHAPES."""
    import adam_triton

    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen).to(dtype) for s in CHECK_SHAPES]
    grads = [[torch.randn(s, generator=gen).to(dtype) for s in CHECK_SHAPES] for _ in range(steps)]
    params = [torch.nn.Parameter(t.to(device).clone()) for t in init]
    opt = getattr(adam_triton, cls_name)(params, min_8bit_size=CHECK_MIN_8BIT, **kwargs)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.to(device).clone()
        opt.step()
    ref_params, ref_states = reference_run_8bit(opt.param_groups[0], init, grads)
    row = dict(case=name, dtype=DTYPE_NAMES[dtype], one_apart=0, further=0, codes=0, absmax=0.0, failed=[])
    for p, st, rp, rst in zip(params, (opt.state[p] for p in params), ref_params, ref_states):
        if set(st) != set(rst):
            row["failed"].append(f"state keys {sorted(st)} != {sorted(rst)}")
            continue
        for key, ref_value in rst.items():
            ours = st[key].detach().cpu()
            if key.endswith("_codes"):
                d = (ours.int() - ref_value.int()).abs()
                row["codes"] += d.numel()
                row["one_apart"] += int((d == 1).sum())
                row["further"] += int((d > 1).sum())
            elif key.endswith("_absmax"):
                rel = ((ours.double() - ref_value.double()).abs() / ref_value.double().abs().clamp_min(1e-38)).max()
                row["absmax"] = max(row["absmax"], float(rel))
            elif key != "step" and _max_abs_diff([ours], [ref_value]) > FP32_ATOL * max(1.0, ref_value.abs().max()):
                row["failed"].append(key)
    scale = max([1.0] + [t.abs().max().item() for t in ref_params])
    row["ours_ref"] = _max_abs_diff(params, ref_params)
    row["bound"] = (FP32_ATOL if dtype == torch.float32 else 2.0**-8) * scale
    if not row["ours_ref"] <= row["bound"]:
        row["failed"].append("param")
    if row["further"] or row["one_apart"] > MAX_CODES_ONE_APART * row["codes"]:
        row["failed"].append("codes")
    if not row["absmax"] <= ABSMAX_RTOL:
        row["failed"].append("absmax")
    return row


def _print_8bit_rows(device, steps):
    """The 8-bit section of `check`; returns the number of failing rows."""
    print()
    print(f"8-bit states (Adam8bit / AdamW8bit, min_8bit_size {CHECK_MIN_8BIT}): against adam_triton.reference "
          "(adam8bit_step for 8-bit tensors, adam_step in fp32 for smaller ones) from the same params and grads")
    print(f"PASS if no code is more than one apart, at most {MAX_CODES_ONE_APART:g} of them one apart, absmax within "
          f"{ABSMAX_RTOL:g} relative, and max|ours-ref| <= bound = {FP32_ATOL:g} (fp32) or 2^-8 (bf16) "
          "* max(1, max|ref|)")
    print(ROW8_FORMAT.format(case="case", dtype="dtype", ours_ref="max|ours-ref|", one_apart="codes 1 apart",
                             further="further", absmax="absmax rel", bound="bound", result="result"))
    failures = 0
    for name, cls_name, kwargs in check_cases_8bit():
        for dtype in (torch.float32, torch.bfloat16):
            try:
                row = run_check_case_8bit(name, cls_name, kwargs, dtype, device, steps)
            except Exception as exc:  # a crash is a failing case; the others still run
                traceback.print_exc()
                row = dict(case=name, dtype=DTYPE_NAMES[dtype], ours_ref=math.nan, one_apart=0, codes=0, further=0,
                           absmax=math.nan, bound=math.nan, failed=[f"{type(exc).__name__}: {exc}"])
            failures += bool(row["failed"])
            result = f"FAIL ({', '.join(row['failed'])})" if row["failed"] else "PASS"
            print(ROW8_FORMAT.format(
                case=row["case"], dtype=row["dtype"], ours_ref=f"{row['ours_ref']:.3e}",
                one_apart=f"{row['one_apart']}/{row['codes']}", further=row["further"], absmax=f"{row['absmax']:.1e}",
                bound=f"{row['bound']:.3e}", result=result,
            ), flush=True)
    return failures


def run(device, steps, inject_error=False):
    """Print the bounds, one row per (case, dtype) and the 8-bit section; return the number
    of failing rows. inject_error adds INJECTED_ERROR to one element of the first fp32
    result (a self-test of the checker: that row must fail)."""
    print(f"steps: {steps}; tensor shapes: {', '.join(str(s) for s in CHECK_SHAPES)}")
    print("columns: the params' errors; a row passes when params, step and every state buffer pass")
    print(f"fp32: PASS if max|ours-torch| and max|ours-ref64| <= bound = {FP32_ATOL:g} * max(1, max|ref64|)")
    print(f"bf16: PASS if max|ours-ref64| <= bound = 2*max|torch-ref64| + {BF16_ATOL:g} * max(1, max|ref64|)")
    if inject_error:
        print(f"--inject-error: adding {INJECTED_ERROR:g} to one param element of the first case "
              "(a self-test of the checker: that row must FAIL)")
    print()
    print(ROW_FORMAT.format(case="case", dtype="dtype", ours_torch="max|ours-torch|",
                            ours_ref="max|ours-ref64|", torch_ref="max|torch-ref64|",
                            bound="bound", result="result"))
    failures = 0
    for i, (name, cls_name, kwargs) in enumerate(check_cases()):
        for dtype in (torch.float32, torch.bfloat16):
            try:
                row = run_check_case(name, cls_name, kwargs, dtype, device, steps,
                                     inject_error=inject_error and i == 0 and dtype == torch.float32)
            except Exception as exc:  # a crash is a failing case; the others still run
                traceback.print_exc()
                row = dict(case=name, dtype=DTYPE_NAMES[dtype], ours_torch=math.nan, ours_ref=math.nan,
                           torch_ref=math.nan, bound=math.nan, failed=[f"{type(exc).__name__}: {exc}"])
            failures += bool(row["failed"])
            result = f"FAIL ({', '.join(row['failed'])})" if row["failed"] else "PASS"
            print(ROW_FORMAT.format(
                case=row["case"], dtype=row["dtype"], ours_torch=f"{row['ours_torch']:.3e}",
                ours_ref=f"{row['ours_ref']:.3e}", torch_ref=f"{row['torch_ref']:.3e}",
                bound=f"{row['bound']:.3e}", result=result,
            ), flush=True)
    return failures + _print_8bit_rows(device, steps)
