"""Settings and helpers shared by the benchmark suites (imported after conftest.py has set
TRITON_INTERPRET for a CPU smoke run)."""

import gc
import os

import pytest
import torch

from adam_triton import bench

CPU_SMOKE = os.environ.get("ADAM_TRITON_BENCH_CPU_SMOKE") == "1"
HAVE_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda") if HAVE_CUDA else torch.device("cpu")


def _list(name, default):
    return [x.strip() for x in os.environ.get(name, default).split(",") if x.strip()]


WORKLOADS = ["demo"] if CPU_SMOKE and not HAVE_CUDA else _list("ADAM_TRITON_BENCH_WORKLOADS", ",".join(bench.WORKLOADS))
DTYPES = _list("ADAM_TRITON_BENCH_DTYPES", "fp32,bf16")
SCALE = float(os.environ.get("ADAM_TRITON_BENCH_SCALE", "1"))
ROUNDS = int(os.environ.get("ADAM_TRITON_BENCH_ROUNDS", "3" if CPU_SMOKE and not HAVE_CUDA else "20"))


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


class Params:
    """Random params with random grads for one (workload, dtype) at a time (the last one is
    kept, so consecutive cases of one workload share it)."""

    def __init__(self):
        self.key, self.params = None, None

    def get(self, workload, dtype_name):
        if self.key != (workload, dtype_name):
            self.params = None
            gc.collect()
            if DEVICE.type == "cuda":
                torch.cuda.empty_cache()
            shapes = bench.workload_shapes(workload, SCALE)
            self.params = bench.make_params(shapes, bench.DTYPES[dtype_name], DEVICE)
            self.key = (workload, dtype_name)
        return self.params


def step_benchmark_fn(benchmark, workload_params, variant_name, workload, dtype_name, impl):
    """Time one step of impl (synchronized) with pytest-benchmark; extra_info carries the
    bytes formula and the GB/s of the median."""
    variant = bench.VARIANTS[variant_name]
    params = workload_params.get(workload, dtype_name)
    try:
        step, opt = bench.build(impl, variant, params, interpreter_demo=DEVICE.type != "cuda")
    except bench.Skip as exc:
        pytest.skip(str(exc))
    try:
        for _ in range(bench.WARM_STEPS):  # state, compilation, autotuning, torch.compile
            step()
        sync()

        def timed():
            step()
            sync()

        numel = sum(p.numel() for p in params)
        per_elem = variant.bytes_per_elem(params[0].dtype, impl=impl)  # (its own formula beside ours-only options)
        benchmark.group = f"{variant_name} {workload} {dtype_name}"
        benchmark.extra_info.update(
            variant=variant_name, workload=workload, dtype=dtype_name, impl=impl, numel=numel,
            bytes_per_elem=per_elem, bytes=per_elem * numel, formula=variant.formula(),
            device=torch.cuda.get_device_name() if DEVICE.type == "cuda" else "CPU interpreter (not performance)",
        )
        benchmark.pedantic(timed, rounds=ROUNDS, warmup_rounds=2, iterations=1)
        stats = getattr(benchmark, "stats", None)
        if stats is not None:
            benchmark.extra_info["gbps_median"] = per_elem * numel / stats.stats.median / 1e9
    finally:
        del step, opt
        if impl == "torch-compile":
            torch._dynamo.reset()
        gc.collect()
