"""Host (CPU) cost of step(): `adam-triton bench --host`.

What a step costs the CPU, measured as the calling thread's CPU time (`time.thread_time`:
machines are shared, wall time lies), median over the timed steps, for AdamW on
N tensors of `numel` elements split into G param groups (the groups differ in lr):

* without a GPU: adam-triton's step on CPU tensors with every kernel launch replaced by a
  counter (only our own Python runs), beside torch.optim.AdamW(fused=True) on `meta`
  tensors (its fused kernel computes nothing there, so only torch's Python and dispatch
  run), in the same process;
* with a GPU: both on CUDA tensors, launches included (host time only: the GPU work is
  asynchronous and not waited for inside the timed call).

Two cases each: steady (the same grad tensors every step, as with zero_grad(set_to_none=
False) or gradient accumulation into .grad), and fresh grads (`opt.zero_grad()`, torch's
default set_to_none=True, then new grad tensors before every step, as backward makes them;
both outside the timed call). Launches per step are counted for ours;
for torch, its fused-update calls and step-increment calls per step (each at least one
launch on a GPU).
"""

import contextlib
import statistics
import time

import torch

DEFAULT_TENSORS = (148, 2000, 10000)
DEFAULT_GROUPS = (1, 2, 100)


@contextlib.contextmanager
def stubbed_launches():
    """adam_triton's kernel launches replaced by a counter; CPU tensors take the kernel path
    (with the untuned GPU config) as CUDA tensors would. Yields {"launches": n}."""
    from . import kernels, tuning
    from ._base import FusedOptimizer
    from ._tensors import KERNEL_DTYPES

    counter = {"launches": 0}

    def stub(*args, **kwargs):
        counter["launches"] += 1

    names = ("increment_steps", "adam_update", "rmsprop_update", "grad_sq_partials", "clip_coefficient")
    saved = {name: getattr(kernels, name) for name in names}
    saved_uses, saved_config = FusedOptimizer.__dict__["_uses_kernel"], tuning.config_for
    for name in names:
        setattr(kernels, name, stub)
    FusedOptimizer._uses_kernel = staticmethod(
        lambda group, device, dtypes: group.get("fused") is not False and all(d in KERNEL_DTYPES for d in dtypes))
    tuning.config_for = lambda key, bench: tuning.DEFAULT_CONFIG
    try:
        yield counter
    finally:
        for name, fn in saved.items():
            setattr(kernels, name, fn)
        FusedOptimizer._uses_kernel = saved_uses
        tuning.config_for = saved_config


@contextlib.contextmanager
def torch_fused_counted(on_meta):
    """torch's fused AdamW allowed on meta tensors (where its kernel computes nothing) when
    on_meta; its fused-update and step-increment calls counted. Yields the counts."""
    import torch.optim.optimizer as optimizer_module

    counter = {"fused": 0, "steps": 0}
    saved_devices = optimizer_module._get_fused_kernels_supported_devices
    saved_fused, saved_add = torch._fused_adamw_, torch._foreach_add_

    def fused(*args, **kwargs):
        counter["fused"] += 1
        return saved_fused(*args, **kwargs)

    def foreach_add(*args, **kwargs):
        counter["steps"] += 1
        return saved_add(*args, **kwargs)

    if on_meta:
        optimizer_module._get_fused_kernels_supported_devices = lambda: [*saved_devices(), "meta"]
    torch._fused_adamw_, torch._foreach_add_ = fused, foreach_add
    try:
        yield counter
    finally:
        optimizer_module._get_fused_kernels_supported_devices = saved_devices
        torch._fused_adamw_, torch._foreach_add_ = saved_fused, saved_add


def _groups(params, n_groups, lr=1e-3):
    """params split into n_groups contiguous param groups that differ in lr."""
    n = len(params)
    bounds = [round(i * n / n_groups) for i in range(n_groups + 1)]
    return [{"params": params[a:b], "lr": lr * (1 + i / n_groups)} for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]


def _timed_pair(ours, theirs, steps, fresh, sync):
    """Median thread CPU seconds of each optimizer's step() over `steps` steps, the two
    optimizers stepping alternately (so both see the same load on a shared machine), after
    two warm-up steps each; fresh: zero_grad() and new grad tensors before every step
    (outside the timed calls). ours / theirs: (optimizer, params)."""
    def new_grads(opt, params):
        opt.zero_grad()
        for p in params:
            p.grad = torch.zeros_like(p)

    for opt, params in (ours, theirs):
        new_grads(opt, params)
        opt.step()
        opt.step()
    times = ([], [])
    for _ in range(steps):
        for (opt, params), out in zip((ours, theirs), times):
            if fresh:
                new_grads(opt, params)
            t0 = time.thread_time()
            opt.step()
            out.append(time.thread_time() - t0)
    sync()
    return statistics.median(times[0]), statistics.median(times[1])


def measure(n_tensors, n_groups, numel, steps, device):
    """One row: host µs per tensor (steady, fresh grads) of ours and torch fused, launches."""
    import adam_triton

    row = dict(tensors=n_tensors, groups=n_groups)
    on_gpu = device.type == "cuda"
    ours_device = device if on_gpu else torch.device("cpu")
    torch_device = device if on_gpu else torch.device("meta")
    stub = contextlib.nullcontext({"launches": None}) if on_gpu else stubbed_launches()

    def sync():
        if on_gpu:
            torch.cuda.synchronize(device)

    def params_on(dev):
        return [torch.nn.Parameter(torch.zeros(numel, device=dev)) for _ in range(n_tensors)]

    with stub as launches, torch_fused_counted(on_meta=not on_gpu) as calls:
        for fresh in (False, True):
            ours_params, torch_params = params_on(ours_device), params_on(torch_device)
            ours = adam_triton.AdamW(_groups(ours_params, n_groups), lr=1e-3)
            theirs = torch.optim.AdamW(_groups(torch_params, n_groups), lr=1e-3, fused=True)
            before = (launches["launches"], calls["fused"] + calls["steps"])
            t_ours, t_torch = _timed_pair((ours, ours_params), (theirs, torch_params), steps, fresh, sync)
            suffix = "_fresh" if fresh else ""
            row["ours" + suffix] = t_ours * 1e6 / n_tensors
            row["torch" + suffix] = t_torch * 1e6 / n_tensors
            if not fresh:
                if launches["launches"] is not None:
                    row["launches"] = (launches["launches"] - before[0]) / (steps + 2)
                row["torch_calls"] = (calls["fused"] + calls["steps"] - before[1]) / (steps + 2)
    row["ratio"] = row["ours"] / row["torch"]
    row["ratio_fresh"] = row["ours_fresh"] / row["torch_fresh"]
    return row


def format_rows(rows, on_gpu):
    head = ("tensors groups | ours µs/tensor steady  fresh | torch fused µs/tensor steady  fresh | "
            "ratio steady  fresh | launches/step ours  torch calls/step")
    lines = [head]
    for r in rows:
        launches = "-" if r.get("launches") is None else f"{r['launches']:.0f}"
        lines.append(
            f"{r['tensors']:7d} {r['groups']:6d} | {r['ours']:21.2f} {r['ours_fresh']:6.2f} | "
            f"{r['torch']:28.2f} {r['torch_fresh']:6.2f} | {r['ratio']:12.3f} {r['ratio_fresh']:6.3f} | "
            f"{launches:>18} {r['torch_calls']:17.0f}"
        )
    return "\n".join(lines)


def run(args):
    """`adam-triton bench --host`: print the table (and write JSON with --json)."""
    import json
    import os
    import platform

    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda") if on_gpu else torch.device("cpu")
    where = ("CUDA tensors, launches included" if on_gpu else
             "no GPU: ours on CPU tensors with kernel launches stubbed (counted), torch fused on meta tensors")
    print(f"host time of AdamW.step(), thread CPU time, median of {args.host_steps} steps "
          f"(ours and torch alternating); {where}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}")
    rows = []
    for n in args.host_tensors:
        for g in args.host_groups:
            if g > n:
                continue
            rows.append(measure(n, g, args.host_numel, args.host_steps, device))
            print(format_rows(rows[-1:], on_gpu).splitlines()[-1] if len(rows) > 1 else format_rows(rows, on_gpu),
                  flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=where, torch=torch.__version__, cores=os.cpu_count(), rows=rows), f, indent=1)
    return 0
