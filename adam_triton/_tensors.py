"""How the kernels see a tensor: the local shard of a DTensor, complex numbers as real pairs,
and the dtypes and devices the kernels take."""

import torch

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LOW_PRECISION = (torch.float16, torch.bfloat16)
# devices a param may live on: CUDA (kernels) and CPU (the interpreter, or the PyTorch path)
SUPPORTED_DEVICES = ["cuda", "cpu"]

try:  # DTensor params (FSDP2): the kernels update each rank's local shard
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed
    DTensor = None


def is_dtensor(t):
    return DTensor is not None and isinstance(t, DTensor)


def local(t):
    """The local shard of a DTensor; any other tensor itself."""
    return t._local_tensor if is_dtensor(t) else t


def real(t):
    """The tensor the kernels see: the local shard of a DTensor, as real numbers."""
    t = local(t)
    return torch.view_as_real(t) if t.is_complex() else t


def sharding(t):
    """(mesh, placements) of a DTensor, None for a plain tensor."""
    if is_dtensor(t):
        return (t.device_mesh, tuple(t.placements))
    return None


def tl_dtype(dtype):
    """The Triton dtype of a torch storage dtype the kernels take."""
    import triton.language as tl

    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
            torch.uint8: tl.uint8}[dtype]
