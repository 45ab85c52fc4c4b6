"""adam-triton: one multi-tensor fused Adam / AdamW / AMSGrad / RMSprop step in Triton across all of a
model's parameters, behind drop-in replacements for torch.optim."""

from . import reference
from .adam import Adam, AdamW
from .adam8bit import Adam8bit, AdamW8bit
from .rmsprop import RMSprop

__all__ = ["Adam", "AdamW", "Adam8bit", "AdamW8bit", "RMSprop", "reference"]
__version__ = "0.1.0"
