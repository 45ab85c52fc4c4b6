"""Test set-up. By default the kernels run on CPU tensors through Triton's interpreter,
which must be switched on before triton is first imported. On a GPU machine run
`ADAM_TRITON_TEST_DEVICE=cuda pytest tests` to run the same tests on CUDA tensors."""

import os

DEVICE = os.environ.get("ADAM_TRITON_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def device():
    """Where the tests' tensors live: cpu (interpreter) or cuda."""
    return torch.device(DEVICE)


def pytest_report_header(config):
    return f"adam-triton tests on {DEVICE}" + (" (Triton interpreter)" if DEVICE == "cpu" else "")
