"""Global grad-norm clipping fused into the step: the norm of every grad of every group (as
clip_grad_norm_), reduced deterministically, and the coefficient the update kernels apply.
No host sync."""

import torch

from ._tensors import DTensor


def clip_coefficients(opt, buckets, grad_scale, found_inf):
    """{device: 0-d clip coefficient} from the global norm of every grad of every bucket
    (divided by grad_scale); sets opt.last_grad_norm. Kernel buckets also get their steps
    incremented here (by the norm pass)."""
    from . import kernels

    devices = {b.device for b in buckets}
    kernel_buckets = [b for b in buckets if b.kernel]
    sharded = any(b.sharding is not None for b in buckets)
    if len(devices) == 1 and len(kernel_buckets) == len(buckets) and not sharded:
        # the common case: one device, all buckets on the kernel path -> stage 2 in one program
        device = next(iter(devices))
        n_partials = sum(max(1, b.n_chunks) for b in buckets)
        partials = torch.zeros(n_partials, dtype=torch.float32, device=device)
        base = 0
        for b in buckets:
            grad_sq_partials(b, partials[base:], grad_scale, found_inf)
            base += max(1, b.n_chunks)
        norm = torch.empty((), dtype=torch.float32, device=device)
        coef = torch.empty((), dtype=torch.float32, device=device)
        kernels.clip_coefficient(partials, n_partials, opt.max_grad_norm, norm, coef)
        opt.last_grad_norm = norm
        return {device: coef}
    # general case: squared sums per bucket, combined with torch ops (and across ranks)
    first = buckets[0].device
    sq_sums = {}
    for b in buckets:
        if b.kernel:
            partials = torch.zeros(max(1, b.n_chunks), dtype=torch.float32, device=b.device)
            grad_sq_partials(b, partials, grad_scale, found_inf)
            local_sum = partials.sum()
        else:
            local_sum = grad_sq_sum([e.kgrad for e in b.entries], grad_scale).to(torch.float32)
        sq_sums[b.sharding] = local_sum.to(first) + (sq_sums[b.sharding] if b.sharding in sq_sums else 0.0)
    norm = global_sq_sum(sq_sums).sqrt()
    coef = torch.clamp(opt.max_grad_norm / (norm + 1e-6), max=1.0)
    opt.last_grad_norm = norm
    return {d: coef.to(d) for d in devices}


def grad_sq_partials(bucket, partials, grad_scale, found_inf):
    """Stage 1 of the norm for one kernel bucket (its steps are incremented by the same launch)."""
    from . import kernels

    t = bucket.tables
    kernels.grad_sq_partials(
        t.table, t.n_rows, bucket.chunks, bucket.n_chunks, partials, grad_dtype=bucket.tl_dtypes[1],
        aligned=t.aligned, config=bucket.config, grad_scale=grad_scale, found_inf=found_inf,
    )
    bucket.steps_done = True


def grad_sq_sum(grads, grad_scale):
    """Sum of squares of (grad / grad_scale) over grads, as a 0-d tensor (PyTorch path)."""
    total = None
    for g in grads:
        g = g.to(torch.float64 if g.dtype == torch.float64 else torch.float32)
        if grad_scale is not None:
            g = g / grad_scale
        s = (g * g).sum()
        total = s if total is None else total + s
    return total


def global_sq_sum(sq_sums):
    """Sum of squares over all ranks: each bucket's local sum, grouped by sharding; a
    DTensor group is summed over its sharded mesh dims (an all-reduce), as clip_grad_norm_
    does on DTensor params."""
    from torch.distributed.tensor import Partial, Replicate

    total = None
    for sharding, local_sum in sq_sums.items():
        if sharding is not None:
            mesh, placements = sharding
            spec = [Partial() if pl.is_shard() else Replicate() for pl in placements]
            local_sum = DTensor.from_local(local_sum, mesh, spec).full_tensor()
        total = local_sum if total is None else total + local_sum.to(total.device)
    return total
