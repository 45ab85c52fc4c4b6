"""Plain-PyTorch optimizer steps: the specification the kernels are checked against.

Each function updates its tensors in place, in their own dtype (pass float64 tensors for a
high-precision reference), one tensor at a time, in the order of torch.optim's
single-tensor implementations. `steps` are 0-d tensors incremented here, first.
"""

import functools
import math

import torch

__all__ = [
    "adam_step", "rmsprop_step", "upcast_step",
    "dynamic_map", "code_thresholds", "block_absmax", "quantize_with_absmax", "quantize_blockwise",
    "dequantize_blockwise", "adam8bit_step",
]


def _scalar(x):
    return float(x) if isinstance(x, torch.Tensor) else x


def adam_step(
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, *,
    lr, beta1, beta2, eps, weight_decay=0.0, amsgrad=False, maximize=False,
    decoupled_weight_decay=False, grad_scale=None,
):
    """One Adam / AdamW / AMSGrad step (torch.optim.Adam's math).

    g = ±grad / grad_scale; L2: g += wd p, or decoupled: p *= 1 - lr wd;
    m = lerp(m, g, 1 - b1); v = b2 v + (1 - b2) g²; vmax = max(vmax, v);
    p -= lr / (1 - b1^t) · m / (sqrt(v or vmax) / sqrt(1 - b2^t) + eps).
    max_exp_avg_sqs may be None unless amsgrad."""
    lr, beta1, beta2 = _scalar(lr), _scalar(beta1), _scalar(beta2)
    for i, param in enumerate(params):
        grad = grads[i] if not maximize else -grads[i]
        if grad_scale is not None:
            grad = grad / _scalar(grad_scale)
        exp_avg, exp_avg_sq = exp_avgs[i], exp_avg_sqs[i]
        steps[i] += 1
        step = float(steps[i])
        if weight_decay != 0:
            if decoupled_weight_decay:
                param.mul_(1 - lr * weight_decay)
            else:
                grad = grad.add(param, alpha=weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = math.sqrt(1 - beta2**step)
        if amsgrad:
            torch.maximum(max_exp_avg_sqs[i], exp_avg_sq, out=max_exp_avg_sqs[i])
            second = max_exp_avg_sqs[i]
        else:
            second = exp_avg_sq
        denom = (second.sqrt() / bias_correction2_sqrt).add_(eps)
        param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


def rmsprop_step(
    params, grads, square_avgs, momentum_buffers, grad_avgs, steps, *,
    lr, alpha, eps, weight_decay=0.0, momentum=0.0, centered=False, maximize=False,
    grad_scale=None,
):
    """One RMSprop step (torch.optim.RMSprop's math; no bias correction).

    g = ±grad / grad_scale; L2: g += wd p; v = a v + (1 - a) g²;
    centered: ga = lerp(ga, g, 1 - a), avg = sqrt(v - ga²) + eps, else avg = sqrt(v) + eps;
    momentum: buf = mu buf + g / avg, p -= lr buf; else p -= lr g / avg.
    momentum_buffers / grad_avgs may be None unless momentum > 0 / centered."""
    lr = _scalar(lr)
    for i, param in enumerate(params):
        grad = grads[i] if not maximize else -grads[i]
        if grad_scale is not None:
            grad = grad / _scalar(grad_scale)
        square_avg = square_avgs[i]
        steps[i] += 1
        if weight_decay != 0:
            grad = grad.add(param, alpha=weight_decay)
        square_avg.mul_(alpha).addcmul_(grad, grad, value=1 - alpha)
        if centered:
            grad_avg = grad_avgs[i]
            grad_avg.lerp_(grad, 1 - alpha)
            avg = square_avg.addcmul(grad_avg, grad_avg, value=-1).sqrt_()
        else:
            avg = square_avg.sqrt()
        avg = avg.add_(eps)
        if momentum > 0:
            buf = momentum_buffers[i]
            buf.mul_(momentum).addcdiv_(grad, avg)
            param.add_(buf, alpha=-lr)
        else:
            param.addcdiv_(grad, avg, value=-lr)


def upcast_step(step_fn, tensor_lists, steps, compute_dtype, **hyper):
    """Run step_fn on copies of tensor_lists in compute_dtype and write the results back
    (rounded to nearest even). Lists are [params, grads, state lists...]; grads are not
    written back; a None list or None entry stays None."""
    def up(t):
        return None if t is None else t.detach().to(compute_dtype)

    ups = [None if lst is None else [up(t) for t in lst] for lst in tensor_lists]
    step_fn(*ups, steps, **hyper)
    for k, (orig, new) in enumerate(zip(tensor_lists, ups)):
        if k == 1 or orig is None:
            continue
        for o, n in zip(orig, new):
            if o is not None:
                o.copy_(n)


# ---------------------------------------------------------------------------------------
# 8-bit block-wise optimizer states (Dettmers et al., "8-bit Optimizers via Block-wise
# Quantization", ICLR 2022). A state tensor s of n elements is stored as n uint8 codes (the
# param's shape) and one fp32 absmax per block of `block_size` consecutive elements (in
# flattened order; the last block may be shorter): s[i] ≈ qmap[codes[i]] · absmax[i // block_size].
# ---------------------------------------------------------------------------------------

def dynamic_map(signed):
    """The 256 sorted fp32 values of the 8-bit dynamic quantization map (a new tensor).

    Seven decades k = 0..6: the midpoints of n + 1 fp32 points evenly spaced over [0.1, 1]
    (torch.linspace), times 10^(k-6) in fp32, with n = 2^k per sign (signed) or 2^(k+1)
    (unsigned); plus 0 and 1. Signed: 127 negative values down to -0.99297 (no -1), 0 at
    code 127, 127 positive values and 1 at code 255. Unsigned: 0 at code 0, 254 positive
    values, 1 at code 255. Every value is distinct; the smallest non-zero magnitude is 5.5e-7
    (signed) / 3.25e-7 (unsigned)."""
    return torch.tensor(_dynamic_map_values(bool(signed)), dtype=torch.float32)


@functools.lru_cache(maxsize=2)
def _dynamic_map_values(signed):
    values = [0.0, 1.0]
    for k in range(7):
        n = 2**k if signed else 2 ** (k + 1)
        points = torch.linspace(0.1, 1.0, n + 1, dtype=torch.float32)
        mids = (points[:-1] + points[1:]) / 2.0
        decade = mids * (10.0 ** (k - 6))  # an fp32 product, as in the published construction
        values += decade.tolist()
        if signed:
            values += (-decade).tolist()
    assert len(values) == 256
    return tuple(sorted(values))


def code_thresholds(qmap):
    """The 255 decision points of nearest-code rounding: t[i] = (qmap[i] + qmap[i+1]) / 2 in
    fp32. A normalized value y gets code #{i : t[i] <= y} (a tie goes to the upper code)."""
    return (qmap[:-1] + qmap[1:]) / 2


def _blocks(x, block_size):
    """x flattened and zero-padded to whole blocks, as a [n_blocks, block_size] view."""
    flat = x.reshape(-1)
    pad = -flat.numel() % block_size
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, block_size)


def block_absmax(x, block_size=256):
    """fp32 max |x| of every block of block_size elements (flattened order; the last block
    may be shorter). A block holding a NaN or an inf gets NaN; an all-zero block gets 0."""
    a = _blocks(x.detach().float(), block_size).abs().amax(dim=1)  # amax propagates NaN
    return torch.where(a <= torch.finfo(torch.float32).max, a, torch.full_like(a, math.nan))


def quantize_with_absmax(x, absmax, qmap, block_size=256):
    """uint8 codes (x's shape) of x given each block's absmax: y = x * (1 / absmax) in fp32,
    the reciprocal and the product each rounded to nearest (0 where absmax is 0 or NaN; x and
    absmax both scaled by 2^64 for an absmax below 2^-64, by 2^-64 above 2^64), then
    the nearest value of qmap, found by code_thresholds (ties up). With absmax from
    block_absmax, |y| <= 1 up to an ulp (which leaves the code at the end of the map);
    NaN/zero blocks get the code of 0. (One division per block, as bitsandbytes' 8-bit
    optimizer kernels also normalize.)"""
    n = x.numel()
    xb = _blocks(x.detach().float(), block_size)
    absmax = absmax.float()[:, None]
    ok = absmax > 0  # False for 0 and NaN
    # both scaled by a power of two where the reciprocal would overflow or be subnormal
    scale = torch.where(absmax < 2.0**-64, 2.0**64, torch.where(absmax > 2.0**64, 2.0**-64, 1.0))
    inv = 1.0 / torch.where(ok, absmax * scale, 1.0)
    y = torch.where(ok, (xb * scale) * inv, 0.0)
    codes = torch.bucketize(y, code_thresholds(qmap).to(y.device), right=True)
    return codes.reshape(-1)[:n].to(torch.uint8).reshape(x.shape)


def quantize_blockwise(x, qmap, block_size=256):
    """(codes, absmax): block-wise quantization of x on qmap; absmax = block_absmax(x), codes
    = quantize_with_absmax(x, absmax). dequantize_blockwise(codes, absmax) differs from x by at
    most half the gap between neighbouring qmap values, times absmax, per element."""
    absmax = block_absmax(x, block_size)
    return quantize_with_absmax(x, absmax, qmap, block_size), absmax


def dequantize_blockwise(codes, absmax, qmap, block_size=256):
    """fp32 tensor (codes' shape): qmap[codes[i]] · absmax[i // block_size], one fp32 product."""
    n = codes.numel()
    vals = _blocks(qmap.to(codes.device)[codes.long()], block_size) * absmax[:, None]
    return vals.reshape(-1)[:n].reshape(codes.shape)


def _f32(x):
    """A Python float rounded to the nearest fp32 value (kernel scalar arguments are fp32)."""
    return float(torch.tensor(float(x), dtype=torch.float32))


def adam8bit_step(
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, *,
    lr, beta1, beta2, eps, weight_decay=0.0, amsgrad=False, maximize=False,
    decoupled_weight_decay=False, grad_scale=None, block_size=256,
    signed_map=None, unsigned_map=None,
):
    """One Adam / AdamW / AMSGrad step on 8-bit block-wise states, in place.

    exp_avgs, exp_avg_sqs, max_exp_avg_sqs hold (codes, absmax) pairs: exp_avg on the signed
    dynamic map, exp_avg_sq and max_exp_avg_sq on the unsigned one (max_exp_avg_sqs may be
    None unless amsgrad). Per element, in fp32, every product, sum, quotient and sqrt
    rounded on its own to nearest (IEEE; no fused multiply-add), in this order:
        m, v, vmax = dequantized states;  g = ±grad / grad_scale
        L2: g = g + wd·p   or decoupled: p = p · fp32(1 - lr·wd)
        m = lerp(m, g, w), w = fp32(1 - b1): m + w (g - m) if w < 0.5 else g - (g - m)(1 - w)
        v = b2·v + ((1 - b2)·g)·g;  vmax = max(vmax, v)  (NaN propagates)
        p = p - fp32(lr / (1 - b1^t)) · (m / (sqrt(v or vmax) / fp32(sqrt(1 - b2^t)) + eps))
    The update uses the fp32 m, v, vmax; then each is requantized with its block's new absmax
    (quantize_blockwise). A block whose new state has a NaN or inf gets absmax NaN: the
    whole block dequantizes to NaN at the next step."""
    signed_map = dynamic_map(True) if signed_map is None else signed_map
    unsigned_map = dynamic_map(False) if unsigned_map is None else unsigned_map
    lr, beta1, beta2 = _scalar(lr), _scalar(beta1), _scalar(beta2)
    w = _f32(1 - beta1)
    one_minus_w = _f32(1 - w)
    b2, one_minus_b2 = _f32(beta2), _f32(1 - beta2)
    eps32, wd32 = _f32(eps), _f32(weight_decay)
    for i, param in enumerate(params):
        steps[i] += 1
        t = float(steps[i])
        step_size = _f32(lr / (1 - beta1**t))
        bc2_sqrt = _f32(math.sqrt(1 - beta2**t))
        g = grads[i].detach().float()
        if grad_scale is not None:
            g = g / _f32(_scalar(grad_scale))
        if maximize:
            g = -g
        p = param.detach().float()
        m = dequantize_blockwise(*exp_avgs[i], signed_map, block_size)
        v = dequantize_blockwise(*exp_avg_sqs[i], unsigned_map, block_size)
        if weight_decay != 0:
            if decoupled_weight_decay:
                p = p * _f32(1 - lr * weight_decay)
            else:
                g = g + wd32 * p
        if w < 0.5:
            m = m + w * (g - m)
        else:
            m = g - (g - m) * one_minus_w
        v = b2 * v + (one_minus_b2 * g) * g
        second = v
        if amsgrad:
            vmax = torch.maximum(dequantize_blockwise(*max_exp_avg_sqs[i], unsigned_map, block_size), v)
            second = vmax
        # sqrt correctly rounded (through fp64): torch's fp32 CPU sqrt is off by 1 ulp at times
        root = second.double().sqrt().float()
        p = p - step_size * (m / (root / bc2_sqrt + eps32))
        param.copy_(p)
        for (codes, absmax), new, qmap in [(exp_avgs[i], m, signed_map), (exp_avg_sqs[i], v, unsigned_map)] + (
            [(max_exp_avg_sqs[i], vmax, unsigned_map)] if amsgrad else []
        ):
            new_codes, new_absmax = quantize_blockwise(new, qmap, block_size)
            codes.copy_(new_codes)
            absmax.copy_(new_absmax)
