"""adam_triton.reference's 8-bit AdamW against bitsandbytes' CPU AdamW8bit (needs
bitsandbytes; not a test dependency: `pip install -e ".[compare]"`).

Usage: python benchmarks/compare_bnb_8bit.py [--steps 10] [--numel 65536] [--json out.json]

Both start from the same fp32 param and zero states and take the same seeded grads. Two runs:
  free:     each optimizer steps on its own state for --steps steps; then count the codes and
            absmax values that agree and how far the params are apart.
  lockstep: before every step both start from bitsandbytes' state, so each step's differences
            are fresh; every differing code is then put in exactly one class:
              quantizer: bitsandbytes' code is not the nearest code of its own fp32 value
                         (its CPU quantizer is not exact nearest rounding), or
              tie:       both nearest, on values 1 ulp apart (bitsandbytes' m = b1·m + (1-b1)·g,
                         ours torch's lerp formula), straddling a decision point; or
              other:     anything else (expected 0).
            The replica of bitsandbytes' fp32 values is checked against its absmax (all equal).
Last, the quantizers alone (bitsandbytes', and torchao's where installed) on 2^20 values.
Numbers are printed, and returned by compare() for tests/test_adam8bit.py.
"""

import argparse
import json
import sys

import torch

from adam_triton import reference as ref

HYPER = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)


def _grads(numel, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    # a spread of magnitudes within and across blocks, as real gradients have
    scale = torch.exp(torch.randn(numel // 256 + 1, generator=gen)).repeat_interleave(256)[:numel]
    return [torch.randn(numel, generator=gen) * scale for _ in range(steps)]


def _bnb_state(opt, p):
    s = opt.state[p]
    return s["state1"], s["absmax1"], s["state2"], s["absmax2"]


def _ours_step(p, g, m, v, step):
    ref.adam8bit_step([p], [g], [m], [v], None, [step], lr=HYPER["lr"], beta1=HYPER["betas"][0],
                      beta2=HYPER["betas"][1], eps=HYPER["eps"], weight_decay=HYPER["weight_decay"],
                      decoupled_weight_decay=True)


def _agree(a, b):
    return int((a == b).sum())


def compare(numel=65536, steps=10, seed=0):
    """Run both comparisons; returns a dict of counts (see the module docstring)."""
    import bitsandbytes as bnb

    qs, qu = ref.dynamic_map(True), ref.dynamic_map(False)
    torch.manual_seed(seed)
    p0 = torch.randn(numel) * 0.02
    grads = _grads(numel, steps, seed + 1)
    out = dict(numel=numel, steps=steps, blocks=-(-numel // 256), bnb_version=bnb.__version__,
               torch_version=torch.__version__, device="cpu", **HYPER)

    # free-running
    pb = p0.clone().requires_grad_()
    opt = bnb.optim.AdamW8bit([pb], min_8bit_size=4096, **HYPER)
    po = p0.clone()
    m = (torch.full((numel,), 127, dtype=torch.uint8), torch.zeros(out["blocks"]))
    v = (torch.zeros(numel, dtype=torch.uint8), torch.zeros(out["blocks"]))
    step = torch.tensor(0.0)
    for g in grads:
        pb.grad = g.clone()
        opt.step()
        _ours_step(po, g, m, v, step)
    c1, a1, c2, a2 = _bnb_state(opt, pb)
    diff = (pb.detach() - po).abs()
    out["free"] = dict(
        exp_avg_codes_equal=_agree(c1, m[0]), exp_avg_codes_within_1=int(((c1.int() - m[0].int()).abs() <= 1).sum()),
        exp_avg_sq_codes_equal=_agree(c2, v[0]), exp_avg_sq_codes_within_1=int(((c2.int() - v[0].int()).abs() <= 1).sum()),
        absmax1_equal=_agree(a1, m[1]), absmax2_equal=_agree(a2, v[1]),
        absmax1_max_rel_diff=float(((a1 - m[1]).abs() / a1).max()),
        absmax2_max_rel_diff=float(((a2 - v[1]).abs() / a2).max()),
        param_max_abs_diff=float(diff.max()), param_mean_abs_diff=float(diff.mean()),
        param_p999_abs_diff=float(diff.quantile(0.999)),
        param_max_abs_change=float((po - p0).abs().max()),
    )

    # lockstep: every step starts both from bitsandbytes' state
    pb = p0.clone().requires_grad_()
    opt = bnb.optim.AdamW8bit([pb], min_8bit_size=4096, **HYPER)
    counts = dict(codes=0, exp_avg_equal=0, exp_avg_sq_equal=0, quantizer=0, tie=0, other=0,
                  absmax1_equal=0, absmax2_equal=0, absmax_blocks=0, param_max_abs_diff=0.0)
    b1, b2 = HYPER["betas"]
    for k, g in enumerate(grads):
        if k > 0:
            c1, a1, c2, a2 = (t.clone() for t in _bnb_state(opt, pb))
        else:
            c1, a1 = torch.full((numel,), 127, dtype=torch.uint8), torch.zeros(out["blocks"])
            c2, a2 = torch.zeros(numel, dtype=torch.uint8), torch.zeros(out["blocks"])
        po = pb.detach().clone()
        m, v = (c1.clone(), a1.clone()), (c2.clone(), a2.clone())
        _ours_step(po, g, m, v, torch.tensor(float(k)))
        # bitsandbytes' own fp32 values of this step (its CPU formulas, same torch ops)
        bm = ref.dequantize_blockwise(c1, a1, qs).mul_(b1).add_(g, alpha=1 - b1)
        bv = ref.dequantize_blockwise(c2, a2, qu).mul_(b2).addcmul_(g, g, value=1 - b2)
        pb.grad = g.clone()
        opt.step()
        n1, na1, n2, na2 = _bnb_state(opt, pb)
        counts["param_max_abs_diff"] = max(counts["param_max_abs_diff"], float((pb.detach() - po).abs().max()))
        counts["absmax1_equal"] += _agree(na1, m[1])
        counts["absmax2_equal"] += _agree(na2, v[1])
        for key, a, b in [("absmax1_max_ulps", na1, m[1]), ("absmax2_max_ulps", na2, v[1])]:
            ulps = int((a.view(torch.int32) - b.view(torch.int32)).abs().max())
            counts[key] = max(counts.get(key, 0), ulps)
        counts["absmax_blocks"] += out["blocks"]
        # the replica of bitsandbytes' fp32 values is exact where it shows: its absmax
        counts["replica_absmax_equal"] = counts.get("replica_absmax_equal", 0) + _agree(
            ref.block_absmax(bm), na1) + _agree(ref.block_absmax(bv), na2)
        for name, new_b, absmax_b, ours, bval, qmap in [
            ("exp_avg", n1, na1, m[0], bm, qs), ("exp_avg_sq", n2, na2, v[0], bv, qu),
        ]:
            counts["codes"] += numel
            same = new_b == ours
            counts[name + "_equal"] += int(same.sum())
            nearest_of_bnb_value = ref.quantize_with_absmax(bval, absmax_b, qmap)
            bnb_not_nearest = new_b != nearest_of_bnb_value
            rest = ~same & ~bnb_not_nearest
            is_tie = rest & (nearest_of_bnb_value.int() - ours.int()).abs().eq(1)
            counts["quantizer"] += int((~same & bnb_not_nearest).sum())
            counts["tie"] += int(is_tie.sum())
            ours_value = ref.dequantize_blockwise(c1, a1, qs) if name == "exp_avg" else None
            if ours_value is not None:  # our fp32 m, to measure how far apart the tie values are
                w = 1 - b1
                ours_value = ours_value + w * (g - ours_value)
                ulps = (ours_value.view(torch.int32) - bval.view(torch.int32)).abs()
                counts["tie_max_ulps"] = max(counts.get("tie_max_ulps", 0), int(ulps[is_tie].max()) if is_tie.any() else 0)
            counts["other"] += int((rest & ~is_tie).sum())
    out["lockstep"] = counts

    # the quantizers alone, on 2^20 values (signed: normal; unsigned: squared normal)
    gen = torch.Generator().manual_seed(seed + 2)
    quant = {}
    for name, qmap, x in [("signed", qs, torch.randn(1 << 20, generator=gen)),
                          ("unsigned", qu, torch.randn(1 << 20, generator=gen) ** 2)]:
        ours, absmax = ref.quantize_blockwise(x, qmap)
        theirs, absmax_b = torch.ops.bitsandbytes.quantize_blockwise(x, qmap.clone(), 256)
        quant[name] = dict(values=x.numel(), codes_equal=_agree(ours, theirs),
                           max_code_distance=int((ours.int() - theirs.int()).abs().max()),
                           absmax_equal=_agree(absmax, absmax_b), blocks=absmax.numel())
    out["quantizer_only"] = quant
    try:  # torchao's quantizer on the same values, where torchao is installed
        from torchao.optim.quant_utils import quantize_8bit_with_qmap, scale_tensor
        import torchao

        out["torchao_version"] = torchao.__version__
        gen = torch.Generator().manual_seed(seed + 2)
        for name, qmap, x in [("signed", qs, torch.randn(1 << 20, generator=gen)),
                              ("unsigned", qu, torch.randn(1 << 20, generator=gen) ** 2)]:
            ours, absmax = ref.quantize_blockwise(x, qmap)
            scaled, scale = scale_tensor(x, 256)
            theirs = quantize_8bit_with_qmap(scaled, qmap)
            quant[name]["torchao_codes_equal"] = _agree(ours, theirs)
            quant[name]["torchao_max_code_distance"] = int((ours.int() - theirs.int()).abs().max())
            quant[name]["torchao_absmax_equal"] = _agree(absmax, scale)
    except ImportError:
        pass
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--numel", type=int, default=65536)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    out = compare(args.numel, args.steps, args.seed)
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
