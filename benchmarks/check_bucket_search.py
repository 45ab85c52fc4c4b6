"""Every fp32 value y with |y| <= 2.5, of both signs, through the 8-bit kernels' nearest-code
search (kernels/quant8.py; quant8.search is its torch form, tested against the kernel's own
quantize in tests/test_adam8bit.py) against torch.bucketize over the map's decision points,
for the signed and the unsigned dynamic map. About 2.15 billion values a map; on a 2-core CPU
about 4 minutes a map (240 s and 256 s on 2026-11-22: 0 codes differ for either map).

    python benchmarks/check_bucket_search.py
"""

import time

import torch

from adam_triton import reference
from adam_triton.kernels import quant8

SLICE = 1 << 24


def check(signed):
    table = quant8.map_tables(reference.dynamic_map(True), reference.dynamic_map(False))
    _, points, buckets = quant8.map_parts(table, signed)
    t = reference.code_thresholds(reference.dynamic_map(signed))
    top = torch.tensor(2.5).view(torch.int32).item()
    sign = torch.tensor(-(2**31), dtype=torch.int32)
    checked = differ = 0
    for start in range(0, top + 1, SLICE):
        bits = torch.arange(start, min(start + SLICE, top + 1), dtype=torch.int32)
        for b in (bits, bits | sign):
            y = b.view(torch.float32)
            differ += int((quant8.search(y, points, buckets, signed) != torch.bucketize(y, t, right=True)).sum())
            checked += y.numel()
    return checked, differ


if __name__ == "__main__":
    for signed in (True, False):
        t0 = time.time()
        checked, differ = check(signed)
        print(f"{'signed' if signed else 'unsigned'} map: {checked} values, {differ} codes differ ({time.time() - t0:.0f} s)")
