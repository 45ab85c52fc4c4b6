"""Plain-PyTorch optimizer steps: the specification the kernels are checked against.

Each function updates its tensors in place, in their own dtype (pass float64 tensors for a
high-precision reference), one tensor at a time, in the order of torch.optim's
single-tensor implementations. `steps` are 0-d tensors incremented here, first.
"""

import math

import torch

__all__ = ["adam_step", "rmsprop_step", "upcast_step"]


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
