"""The plain-PyTorch path: the reference math (adam_triton.reference) in fp32 (fp64 for
fp64 params) for buckets the kernels do not take — fp64 tensors, CPU tensors without the
interpreter, and param groups with fused=False. Reads found_inf on the host."""

import torch


def run_bucket(opt, bucket, grad_scale, found_inf, clip):
    """One step of a PyTorch-path bucket (one param group), in place."""
    if found_inf is not None and float(found_inf) != 0:
        return
    entries = bucket.entries
    params = [e.kparam for e in entries]
    compute = torch.float64 if params[0].dtype == torch.float64 else torch.float32
    grads = [e.kgrad for e in entries]
    if clip is not None:
        coef = clip[bucket.device]
        grads = [g.to(compute) / (1.0 if grad_scale is None else grad_scale) * coef for g in grads]
        grad_scale = None
    if bucket.master:
        targets = [e.kmaster for e in entries]
    elif bucket.stochastic:
        targets = [p.to(torch.float32) for p in params]
    else:
        targets = params
    lists = [targets, grads] + [[e.kslots[k] for e in entries] for k in range(len(bucket.slot_keys))]
    lists = [None if all(t is None for t in lst) else lst for lst in lists]
    steps = [e.step for e in entries]
    opt._reference(bucket.group, lists, steps, grad_scale, compute)
    if bucket.master or bucket.stochastic:
        for i, (p, t) in enumerate(zip(params, targets)):
            p.copy_(t if bucket.master else stochastic_bf16(t, opt.seed, steps[i], i))


def stochastic_bf16(x, seed, step, index):
    """x (fp32) rounded to bf16 stochastically with torch's RNG (the PyTorch path; the
    kernels draw from Philox, so the two paths' random bits differ)."""
    gen = torch.Generator(device=x.device)
    gen.manual_seed(seed + int(step) * 1000003 + index * 7919)
    bits = x.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, generator=gen, device=x.device, dtype=torch.int32)
    rounded = ((bits + noise) >> 16).to(torch.int16)
    out = rounded.view(torch.bfloat16)
    return torch.where(torch.isnan(x), x.to(torch.bfloat16), out)
