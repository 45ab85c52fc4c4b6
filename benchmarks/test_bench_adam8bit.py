"""AdamW on 8-bit block-wise states: adam_triton.AdamW8bit against torch.optim.AdamW(fused=True)
with its full-precision states (each row's GB/s from its own bytes formula)."""

import pytest
from _suite import DTYPES, WORKLOADS

from adam_triton import bench


@pytest.mark.parametrize("impl", bench.impls_for(bench.VARIANTS["adamw-8bit"]))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("workload", WORKLOADS)
def test_step(step_benchmark, workload, dtype, impl):
    step_benchmark("adamw-8bit", workload, dtype, impl)
