"""Triton kernels of adam-triton.

This folder (kernels/ at the top of the repository) is installed as the subpackage
`adam_triton.kernels` through setuptools' package-dir, so it never collides with another
distribution's top-level `kernels` module. One file per algorithm; shared pieces in _common.
"""

from ._common import increment_steps
from .adam import WD_DECOUPLED, WD_L2, WD_NONE, adam_hyper_row, adam_update
from .adam8bit import adam8bit_update
from .norm import clip_coefficient, grad_sq_partials
from .rmsprop import rmsprop_hyper_row, rmsprop_update

__all__ = [
    "clip_coefficient", "grad_sq_partials", "increment_steps",
    "adam_update", "adam_hyper_row", "WD_NONE", "WD_L2", "WD_DECOUPLED", "adam8bit_update",
    "rmsprop_update", "rmsprop_hyper_row",
]
