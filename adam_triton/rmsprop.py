"""RMSprop: a drop-in replacement for torch.optim.RMSprop (which has no fused path), one
fused launch per (param group, device, dtype) bucket."""

from . import reference
from ._base import FusedOptimizer, check_hyper, check_lr, check_torch_flags


class RMSprop(FusedOptimizer):
    """torch.optim.RMSprop's signature, defaults, errors, math and state keys
    (`step`, `square_avg`, `momentum_buffer` if momentum > 0, `grad_avg` if centered),
    computed in fp32 by Triton kernels. max_grad_norm, state_dtype, master_weights,
    stochastic_rounding and seed: see FusedOptimizer. foreach is accepted and ignored;
    differentiable=True is refused."""

    kernel_name = "rmsprop"

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
        check_torch_flags("RMSprop", None, differentiable)
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

    def _launch(self, plan, tables, grad_scale=None, found_inf=None, clip_coef=None):
        from .kernels import rmsprop_update

        group = plan.group
        rmsprop_update(
            tables.table, tables.chunks, tables.n_chunks,
            lr=plan.lr, alpha=group["alpha"], eps=group["eps"], weight_decay=group["weight_decay"],
            momentum=group["momentum"], centered=group["centered"], maximize=group["maximize"],
            param_dtype=plan.dtypes[0], grad_dtype=plan.dtypes[1], state_dtype=plan.dtypes[2],
            aligned=tables.aligned, config=plan.config, grad_scale=grad_scale, found_inf=found_inf,
            clip_coef=clip_coef, master=plan.master, stochastic=plan.stochastic, seed=self.seed,
        )

    def _reference(self, group, tensor_lists, steps, grad_scale, compute_dtype):
        reference.upcast_step(
            reference.rmsprop_step, tensor_lists, steps, compute_dtype,
            lr=group["lr"], alpha=group["alpha"], eps=group["eps"],
            weight_decay=group["weight_decay"], momentum=group["momentum"],
            centered=group["centered"], maximize=group["maximize"], grad_scale=grad_scale,
        )
