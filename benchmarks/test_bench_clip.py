"""Clip + step: AdamW(max_grad_norm=1.0) of adam-triton against
torch.nn.utils.clip_grad_norm_ followed by torch.optim.AdamW(fused=True)."""

import pytest
from _suite import DTYPES, WORKLOADS

from adam_triton import bench


@pytest.mark.parametrize("impl", bench.impls_for(bench.VARIANTS["clip"]))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("workload", WORKLOADS)
def test_step(step_benchmark, workload, dtype, impl):
    step_benchmark("clip", workload, dtype, impl)
