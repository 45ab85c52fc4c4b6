"""Adam and AdamW: drop-in replacements for torch.optim.Adam / AdamW, one fused launch per
(device, dtype) bucket across param groups."""

import torch

from . import reference
from ._base import FusedOptimizer, _kernels
from ._validate import check_hyper, check_lr


class Adam(FusedOptimizer):
    """torch.optim.Adam's signature, defaults, errors, math and state keys
    (`step`, `exp_avg`, `exp_avg_sq`, `max_exp_avg_sq`), computed in fp32 by Triton kernels.

    decoupled_weight_decay=True gives AdamW. max_grad_norm clips the global grad norm of
    all groups first (as clip_grad_norm_), fused into the step; last_grad_norm then holds
    the pre-clip norm. state_dtype, master_weights, stochastic_rounding and seed: see
    FusedOptimizer. foreach is accepted (not with fused=True, as torch); fused=False runs
    the plain-PyTorch path; differentiable=True is refused."""

    kernel_name = "adam"
    torch_class = torch.optim.Adam

    def __init__(
        self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False, *,
        foreach=None, maximize=False, capturable=False, differentiable=False, fused=None,
        decoupled_weight_decay=False, max_grad_norm=None, state_dtype=None, master_weights=False,
        stochastic_rounding=False, seed=0,
    ):
        # torch's checks, in torch's order and words
        if isinstance(lr, torch.Tensor) and foreach and not capturable:
            raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
        check_lr(lr)
        check_hyper("epsilon", eps)
        check_hyper("beta", betas[0], f"Invalid beta parameter at index 0: {betas[0]}", upper=1.0)
        check_hyper("beta", betas[1], f"Invalid beta parameter at index 1: {betas[1]}", upper=1.0)
        check_hyper("weight_decay", weight_decay)
        betas = _betas(betas, foreach, capturable)
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            maximize=maximize, foreach=foreach, capturable=capturable,
            differentiable=differentiable, fused=fused,
            decoupled_weight_decay=decoupled_weight_decay,
        )
        super().__init__(params, defaults, max_grad_norm, state_dtype, master_weights, stochastic_rounding, seed)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("capturable", False)
            group.setdefault("differentiable", False)
            group.setdefault("fused", None)
            group.setdefault("decoupled_weight_decay", False)

    def _sparse_message(self):
        return "Adam does not support sparse gradients, please consider SparseAdam instead"

    def state_keys(self, group):
        keys = ["exp_avg", "exp_avg_sq"]
        return keys + ["max_exp_avg_sq"] if group["amsgrad"] else keys

    def _flags(self, group):
        return (group["amsgrad"], group["maximize"], self._wd_mode(group))

    @staticmethod
    def _wd_mode(group):
        """"l2" (weight decay added to the grad) or "decoupled"; no weight decay runs as
        decoupled decay by a factor of exactly 1, so groups with and without decay share a
        launch."""
        return "l2" if group["weight_decay"] != 0 and not group["decoupled_weight_decay"] else "decoupled"

    def _hyper_columns(self, group):
        beta1, beta2 = group["betas"]
        return _kernels().adam_hyper_row(float(beta1), float(beta2), float(group["eps"]), float(group["weight_decay"]))

    def _launch(self, bucket, tables, hyper, grad_scale=None, found_inf=None, clip_coef=None):
        kernels = _kernels()
        amsgrad, maximize, wd_mode = bucket.flags[:3]  # (Adam8bit's flags add its block size)
        p_dtype, g_dtype, s_dtype = bucket.tl_dtypes
        kernels.adam_update(
            tables.table, tables.n_rows, bucket.chunks, bucket.n_chunks, hyper,
            amsgrad=amsgrad, maximize=maximize, wd_mode=kernels.WD_L2 if wd_mode == "l2" else kernels.WD_DECOUPLED,
            param_dtype=p_dtype, grad_dtype=g_dtype, state_dtype=s_dtype,
            aligned=tables.aligned, config=bucket.config, grad_scale=grad_scale, found_inf=found_inf,
            clip_coef=clip_coef, master=bucket.master, stochastic=bucket.stochastic, seed=self.seed,
        )

    def _reference(self, group, tensor_lists, steps, grad_scale, compute_dtype):
        beta1, beta2 = group["betas"]
        reference.upcast_step(
            reference.adam_step, tensor_lists, steps, compute_dtype,
            lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
            weight_decay=group["weight_decay"], amsgrad=group["amsgrad"],
            maximize=group["maximize"], decoupled_weight_decay=group["decoupled_weight_decay"],
            grad_scale=grad_scale,
        )


class AdamW(Adam):
    """torch.optim.AdamW: Adam with decoupled weight decay, default weight_decay=0.01."""

    torch_class = torch.optim.AdamW

    def __init__(
        self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
        maximize=False, foreach=None, capturable=False, differentiable=False, fused=None,
        max_grad_norm=None, state_dtype=None, master_weights=False, stochastic_rounding=False,
        seed=0,
    ):
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
            capturable=capturable, differentiable=differentiable, fused=fused,
            decoupled_weight_decay=True, max_grad_norm=max_grad_norm, state_dtype=state_dtype,
            master_weights=master_weights, stochastic_rounding=stochastic_rounding, seed=seed,
        )

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True


def _betas(betas, foreach, capturable):
    """torch's rules: both floats or both 1-element tensors (not with foreach=True unless
    capturable); tensors must live on the CPU here (a device tensor would need a host read
    every step)."""
    b0, b1 = betas
    if not ((isinstance(b0, float) and isinstance(b1, float))
            or (isinstance(b0, torch.Tensor) and isinstance(b1, torch.Tensor))):
        raise ValueError("betas must be either both floats or both Tensors")
    if isinstance(b0, torch.Tensor):
        for i, b in enumerate((b0, b1)):
            if foreach and not capturable:
                raise ValueError(f"betas[{i}] as a Tensor is not supported for capturable=False and foreach=True")
            if b.numel() != 1:
                raise ValueError(f"Tensor betas[{i}] must be 1-element")
            if b.device.type != "cpu":
                raise ValueError(f"Tensor betas[{i}] must be on the CPU for adam_triton")
        return (b0.reshape(()), b1.reshape(()))
    return (b0, b1)
