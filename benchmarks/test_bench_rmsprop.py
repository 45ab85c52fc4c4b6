"""RMSprop: adam-triton (where it has RMSprop) against torch.optim's implementations
(torch.optim.RMSprop has no fused=True: that case is skipped with torch's message)."""

import pytest
from _suite import DTYPES, WORKLOADS

from adam_triton import bench


@pytest.mark.parametrize("impl", bench.impls_for(bench.VARIANTS["rmsprop"]))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("workload", WORKLOADS)
def test_step(step_benchmark, workload, dtype, impl):
    step_benchmark("rmsprop", workload, dtype, impl)
