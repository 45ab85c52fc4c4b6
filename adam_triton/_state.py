"""Optimizer state: torch's lazy creation (with the fp32 master copy where asked), the dtypes
checkpoints are restored in, and the bytes state costs per param."""

import math
from typing import NamedTuple, Optional

import torch

from ._tensors import LOW_PRECISION, local

MASTER_KEY = "master_param"  # state key of the fp32 master copy (master_weights=True)


class Slot(NamedTuple):
    """One state buffer a kernel reads through the tensor table: its key, dtype, shape (None:
    the param's shape, layout and DTensor placement) and the value it starts at."""

    key: str
    dtype: torch.dtype
    shape: Optional[tuple] = None
    fill: float = 0.0

    def numel(self, param):
        return param.numel() if self.shape is None else math.prod(self.shape)

    def new(self, param):
        if self.shape is None:
            return torch.full_like(param, self.fill, dtype=self.dtype, memory_format=torch.preserve_format)
        return torch.full(self.shape, self.fill, dtype=self.dtype, device=local(param).device)


def master_slot(opt, param):
    """The fp32 master copy's slot where param has one (master_weights, bf16/fp16 params)."""
    return Slot(MASTER_KEY, torch.float32) if wants_master(opt, param) else None


def state_dtype_for(opt, param):
    """The dtype of param's state buffers: the optimizer's state_dtype, else the param's."""
    if opt.state_dtype is None or not param.is_floating_point():
        return param.dtype
    return opt.state_dtype


def wants_master(opt, param):
    return opt.master_weights and param.dtype in LOW_PRECISION


def init_state(opt, param, state, group):
    """torch's lazy state: a 0-d float32 step (on the param's device: the kernels read it
    there) and the algorithm's buffers at their start values; plus the fp32 master copy
    where asked for."""
    state["step"] = torch.zeros((), dtype=torch.float32, device=local(param).device)
    for slot in opt._slots(group, param):
        if slot is not None:
            state[slot.key] = slot.new(param)
    if wants_master(opt, param):
        state[MASTER_KEY] = param.detach().to(torch.float32, copy=True)


def restore_loaded(opt, state_dict):
    """After torch's loader: every `step` a float32 tensor on its param's device (the
    kernels read it there), and buffers back in this optimizer's dtypes: torch's loader
    casts floating state to the param's dtype, which would round fp32 states and masters
    of bf16 params; they are restored from the saved values instead."""
    saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
    params = [(p, g) for g in opt.param_groups for p in g["params"]]
    for saved_id, (p, group) in zip(saved_ids, params):
        state = opt.state.get(p)
        saved = state_dict["state"].get(saved_id)
        if not state or saved is None:
            continue
        dtypes = {s.key: s.dtype for s in opt._slots(group, p) if s is not None}
        dtypes[MASTER_KEY] = torch.float32
        for key, value in saved.items():
            if key == "step":  # a number in checkpoints of torch < 1.12
                state[key] = torch.as_tensor(value, dtype=torch.float32).to(local(p).device, copy=True)
                continue
            if not isinstance(value, torch.Tensor):
                continue
            if key in dtypes and value.is_floating_point() and dtypes[key].is_floating_point:
                state[key] = value.to(device=p.device, dtype=dtypes[key], copy=True)
        if wants_master(opt, p) and MASTER_KEY not in state:
            state[MASTER_KEY] = p.detach().to(torch.float32, copy=True)


def state_bytes_per_param(opt):
    """Bytes of optimizer state (buffers, masters and steps) per param element held."""
    n = sum(p.numel() for p in opt.state)
    held = sum(t.numel() * t.element_size() for st in opt.state.values()
               for t in st.values() if isinstance(t, torch.Tensor))
    return held / max(1, n)
