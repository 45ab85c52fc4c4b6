"""Adam, AdamW and AMSGrad: adam-triton against torch.optim's for-loop, foreach, fused and
torch.compile'd step, on every workload and dtype (see conftest.py for the switches)."""

import pytest
from _suite import DTYPES, WORKLOADS

from adam_triton import bench


@pytest.mark.parametrize("impl", bench.impls_for(bench.VARIANTS["adam"]))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("workload", WORKLOADS)
@pytest.mark.parametrize("variant", ["adam", "adamw", "amsgrad"])
def test_step(step_benchmark, variant, workload, dtype, impl):
    step_benchmark(variant, workload, dtype, impl)
