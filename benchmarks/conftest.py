"""pytest-benchmark suites over adam_triton.bench's code: the same workloads, implementations
and bytes formulas as `adam-triton bench`, timed by pytest-benchmark so that
`pytest benchmarks --benchmark-only` gives numbers comparable between implementations.

Environment:
  ADAM_TRITON_BENCH_WORKLOADS  comma-separated workloads (default: large,gpt2,llama-1b,many-small)
  ADAM_TRITON_BENCH_DTYPES     comma-separated dtypes (default: fp32,bf16)
  ADAM_TRITON_BENCH_SCALE      --scale of the CLI (default 1)
  ADAM_TRITON_BENCH_ROUNDS     timed rounds per case (default 20)
  ADAM_TRITON_BENCH_CPU_SMOKE  =1: run the suites on the CPU through Triton's interpreter on the
                               tiny demo workload, to check the suites themselves; those
                               numbers are not performance.
Without CUDA (and without the smoke switch) every benchmark is skipped.
"""

import os

CPU_SMOKE = os.environ.get("ADAM_TRITON_BENCH_CPU_SMOKE") == "1"
if CPU_SMOKE:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402
from _suite import CPU_SMOKE, DTYPES, HAVE_CUDA, SCALE, WORKLOADS, Params, step_benchmark_fn  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if HAVE_CUDA or CPU_SMOKE:
        return
    skip = pytest.mark.skip(reason="needs CUDA (or ADAM_TRITON_BENCH_CPU_SMOKE=1 for a CPU smoke run)")
    for item in items:
        if "benchmarks" in str(item.fspath):
            item.add_marker(skip)


def pytest_report_header(config):
    where = f"CUDA: {torch.cuda.get_device_name()}" if HAVE_CUDA else (
        "CPU smoke run through the Triton interpreter: NOT PERFORMANCE" if CPU_SMOKE else "no CUDA: skipped")
    return f"adam-triton benchmarks on {where}; workloads {WORKLOADS}, dtypes {DTYPES}, scale {SCALE}"


@pytest.fixture(scope="session")
def workload_params():
    return Params()


@pytest.fixture
def step_benchmark(benchmark, workload_params):
    """step_benchmark(variant, workload, dtype, impl): time one optimizer step (synchronized)
    with pytest-benchmark; extra_info carries the bytes formula and the GB/s of the median."""
    return lambda *case: step_benchmark_fn(benchmark, workload_params, *case)
