"""The ceiling: a device-to-device copy (bytes moved = 2 x size), timed the same way as the
optimizer steps, so their GB/s can be read as a share of it."""

import os

import pytest
import torch
from _suite import DEVICE, ROUNDS

from adam_triton import bench

COPY_MIB = float(os.environ.get("ADAM_TRITON_BENCH_COPY_MIB", "1024" if DEVICE.type == "cuda" else "16"))


def test_copy(benchmark):
    n = int(COPY_MIB * (1 << 20)) // 4
    src = torch.rand(n, device=DEVICE)  # random, never zeros
    dst = torch.empty_like(src)

    def timed():
        dst.copy_(src)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    moved = bench.copy_bytes(n * 4)
    benchmark.group = "copy"
    benchmark.extra_info.update(bytes=moved, what="dst.copy_(src), fp32, read + write")
    benchmark.pedantic(timed, rounds=ROUNDS, warmup_rounds=2, iterations=1)
    if getattr(benchmark, "stats", None) is not None:
        benchmark.extra_info["gbps_median"] = moved / benchmark.stats.stats.median / 1e9
    assert torch.equal(dst, src)
