"""adam-triton: one multi-tensor fused Adam / AdamW / AMSGrad step in Triton across all of a
model's parameters, behind drop-in replacements for torch.optim."""

from . import reference
from .adam import Adam, AdamW

__all__ = ["Adam", "AdamW", "reference"]
__version__ = "0.1.0"
