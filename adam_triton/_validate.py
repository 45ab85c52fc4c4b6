"""Every check that runs before anything changes: hyperparameters and flags (torch's
messages), params and grads (device, dtype, sparsity, shape), and existing state buffers
against their param (present, numel, dtype, device), so a kernel never touches memory
through a pointer whose tensor is not what it assumes."""

import torch

from ._tensors import SUPPORTED_DEVICES, is_dtensor, local


def check_hyper(name, value, message=None, upper=None):
    """Raise torch's ValueError when not 0 <= value (< upper)."""
    ok = 0.0 <= value if upper is None else 0.0 <= value < upper
    if not ok:
        raise ValueError(message or f"Invalid {name} value: {value}")


def check_lr(lr):
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")


def check_flags(name, group):
    """The torch flags of a param group (or of the constructor's defaults), as torch checks
    them. fused=False selects the plain-PyTorch path; foreach is accepted (the update is
    always one launch) but not together with fused=True; differentiable=True is refused."""
    if group.get("differentiable"):
        raise RuntimeError(f"adam_triton.{name} does not support differentiable=True")
    if group.get("fused") and group.get("foreach"):
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")


def describe(gi, pi, p):
    return f"param {pi} of param group {gi} (shape {tuple(p.shape)}, {p.dtype})"


def check_param(opt, gi, pi, p, grad):
    """A param and its grad as torch refuses them, before any state exists."""
    dev = local(p).device
    fused = opt.param_groups[gi].get("fused")
    if dev.type not in SUPPORTED_DEVICES or (fused and not p.is_floating_point()):
        raise RuntimeError(
            "`fused=True` requires all the params to be floating point Tensors of "
            f"supported devices: {SUPPORTED_DEVICES} but {p.dtype} and {dev.type}"
        )
    if not (p.is_floating_point() or p.is_complex()):
        opt._raise_torch_error(opt.param_groups[gi], p, grad)
    if grad.is_sparse:
        raise RuntimeError(opt._sparse_message())
    if grad.shape != p.shape:
        raise RuntimeError(
            f"grad of shape {tuple(grad.shape)} does not match its param's {tuple(p.shape)}"
        )
    if grad.dtype.is_complex != p.dtype.is_complex or not (grad.is_floating_point() or grad.is_complex()):
        raise RuntimeError(f"grad of {describe(gi, pi, p)} has dtype {grad.dtype}")
    if local(grad).device != dev or is_dtensor(grad) != is_dtensor(p):
        raise RuntimeError(f"grad of {describe(gi, pi, p)} is on {local(grad).device}, its param on {dev}")
    if is_dtensor(p) and (grad.device_mesh != p.device_mesh or tuple(grad.placements) != tuple(p.placements)):
        raise RuntimeError(
            f"grad of {describe(gi, pi, p)} is a DTensor placed {tuple(grad.placements)}, its param "
            f"{tuple(p.placements)}: the kernels update local shards, which must be laid out alike; "
            "redistribute the grad to its param's placements before step() "
            "(p.grad = p.grad.redistribute(p.device_mesh, p.placements))"
        )


class StateError(KeyError, RuntimeError):
    """A state buffer that is missing, or does not fit its param (a KeyError where torch
    raises one for a missing key, and a RuntimeError)."""

    def __str__(self):
        return str(self.args[0])


def check_state(opt, gi, pi, p, state, slots, on_device):
    """The state tensors of p for slots (Slot or None, in kernel order; None gives None),
    then its step, after checking that each key is present and its tensor matches its slot and p: numel,
    dtype, device, layout; `step` a 1-element float32 tensor (on p's device when on_device).
    Raises StateError naming the param and the key."""
    what = describe(gi, pi, p)
    name = type(opt).__name__
    step = state.get("step")
    if not isinstance(step, torch.Tensor) or step.numel() != 1 or step.dtype != torch.float32 or (
        on_device and step.device != local(p).device
    ):
        raise StateError(
            f"{name}: state 'step' of {what} must be a 1-element float32 tensor"
            + (f" on {local(p).device}" if on_device else "") + f", not {_describe_value(step)}"
        )
    tensors = []
    for slot in slots:
        if slot is None:
            tensors.append(None)
            continue
        if slot.key not in state:
            raise StateError(
                f"{name}: {what} has no state '{slot.key}' (state keys: {sorted(state)}); the param "
                "group's options ask for it, and the state was created or loaded without it"
            )
        t = state[slot.key]
        numel = slot.numel(p)
        ok = (isinstance(t, torch.Tensor) and t.numel() == numel and t.dtype == slot.dtype
              and (slot.shape is not None or is_dtensor(t) == is_dtensor(p))
              and local(t).device == local(p).device and t.layout == torch.strided)
        if not ok:
            raise StateError(
                f"{name}: state '{slot.key}' of {what} is {_describe_value(t)}; expected a {slot.dtype} "
                f"tensor of {numel} elements on {local(p).device}"
            )
        tensors.append(t)
    return (*tensors, step)


def _describe_value(t):
    if isinstance(t, torch.Tensor):
        return f"a {t.dtype} tensor of {t.numel()} elements on {local(t).device}"
    return repr(t)
