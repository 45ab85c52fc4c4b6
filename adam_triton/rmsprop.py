"""RMSprop: a drop-in replacement for torch.optim.RMSprop (which has no fused path), one
fused launch per (device, dtype) bucket across param groups."""

import torch

from . import reference
from ._base import FusedOptimizer, _kernels
from ._validate import check_hyper, check_lr


class RMSprop(FusedOptimizer):
    """torch.optim.RMSprop's signature, defaults, errors, math and state keys
    (`step`, `square_avg`, `momentum_buffer` if momentum > 0, `grad_avg` if centered),
    computed in fp32 by Triton kernels. max_grad_norm, state_dtype, master_weights,
    stochastic_rounding and seed: see FusedOptimizer. foreach is accepted; differentiable=True
    is refused."""

    kernel_name = "rmsprop"
    torch_class = torch.optim.RMSprop

    def __init__(
        self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0, momentum=0, centered=False,
        capturable=False, foreach=None, maximize=False, differentiable=False, *,
        max_grad_norm=None, state_dtype=None, master_weights=False, stochastic_rounding=False,
        seed=0,
    ):
        check_lr(lr)
        check_hyper("epsilon", eps)
        check_hyper("momentum", momentum)
        check_hyper("weight_decay", weight_decay)
        check_hyper("alpha", alpha)
        defaults = dict(
            lr=lr, momentum=momentum, alpha=alpha, eps=eps, centered=centered,
            weight_decay=weight_decay, capturable=capturable, foreach=foreach,
            maximize=maximize, differentiable=differentiable,
        )
        super().__init__(params, defaults, max_grad_norm, state_dtype, master_weights, stochastic_rounding, seed)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("momentum", 0)
            group.setdefault("centered", False)
            group.setdefault("foreach", None)
            group.setdefault("maximize", False)
            group.setdefault("differentiable", False)
            group.setdefault("capturable", False)

    def _sparse_message(self):
        return "RMSprop does not support sparse gradients"

    def state_keys(self, group):
        return [
            "square_avg",
            "momentum_buffer" if group["momentum"] > 0 else None,
            "grad_avg" if group["centered"] else None,
        ]

    def _flags(self, group):
        return (group["centered"], group["momentum"] > 0, group["maximize"], group["weight_decay"] != 0)

    def _hyper_columns(self, group):
        return _kernels().rmsprop_hyper_row(float(group["alpha"]), float(group["eps"]), float(group["weight_decay"]),
                                 float(group["momentum"]))

    def _launch(self, bucket, tables, hyper, grad_scale=None, found_inf=None, clip_coef=None):
        centered, momentum, maximize, weight_decay = bucket.flags
        p_dtype, g_dtype, s_dtype = bucket.tl_dtypes
        _kernels().rmsprop_update(
            tables.table, tables.n_rows, bucket.chunks, bucket.n_chunks, hyper,
            centered=centered, momentum=momentum, maximize=maximize, weight_decay=weight_decay,
            param_dtype=p_dtype, grad_dtype=g_dtype, state_dtype=s_dtype,
            aligned=tables.aligned, config=bucket.config, grad_scale=grad_scale, found_inf=found_inf,
            clip_coef=clip_coef, master=bucket.master, stochastic=bucket.stochastic, seed=self.seed,
        )

    def _reference(self, group, tensor_lists, steps, grad_scale, compute_dtype):
        reference.upcast_step(
            reference.rmsprop_step, tensor_lists, steps, compute_dtype,
            lr=group["lr"], alpha=group["alpha"], eps=group["eps"],
            weight_decay=group["weight_decay"], momentum=group["momentum"],
            centered=group["centered"], maximize=group["maximize"], grad_scale=grad_scale,
        )
