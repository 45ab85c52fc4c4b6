"""`adam-triton bench` and `adam-triton tune`: time one optimizer step, and tune the kernels,
on this machine's GPU.

bench times adam-triton and torch.optim's implementations (for-loop, foreach, fused,
torch.compile'd step) on the same tensors, and reports for each: the median step time by
CUDA events, an effective bandwidth from the bytes formula below, that bandwidth as a share
of a device-to-device copy measured in the same run, adam-triton's speed-up, kernel launches
per step, host time of step(), and peak extra memory.

Bytes per element (P, G, S: bytes of one param, grad, state element; fp32 4, bf16 2). Each
formula is the fewest bytes a step must move: every input read once, every output written once.
  Adam / AdamW     read p, g, m, v; write p, m, v           2P + G + 4S   (fp32 28, bf16 14)
  AMSGrad          + read and write vmax                    2P + G + 6S   (fp32 36, bf16 18)
  RMSprop          read p, g, v; write p, v                 2P + G + 2S   (fp32 20, bf16 10)
    momentum       + read and write the momentum buffer     + 2S
    centered       + read and write grad_avg                + 2S
  clipping         + one more read of g (the norm pass)     + G           (AdamW fp32 32)
  fp32 master      read it instead of p, write it too       P + 8 + G + 4S (bf16 p/g, fp32 S: 28)
bf16 modes (adam-fp32-states, adam-master): adam-triton's options state_dtype=fp32 (+
master_weights); torch has neither, so its fused step on the same bf16 params (bf16 states)
is shown beside, each implementation's GB/s from its own formula.
  8-bit states     read p, g, m and v codes; write p and     2P + G + 4 + 16/block
  (adamw-8bit)     the codes; + read/write 2 fp32 absmax      (fp32 16.0625, bf16 10.0625
                   per block                                  at block 256); torch's
                                                              fused AdamW beside (28, 14)
  device copy      read src, write dst                      2 x size
GB/s = bytes formula x elements / median time, the same formula for every implementation:
a rate of useful work, not a count of what each implementation actually moves.

`python -m adam_triton.bench bench|tune ...` works as well as the `adam-triton` CLI.
"""

import argparse
import contextlib
import datetime
import gc
import itertools
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field

import torch

from . import tuning

# ---------------------------------------------------------------------------------------------
# Workloads: lists of (name, shape)
# ---------------------------------------------------------------------------------------------


def gpt2_small_shapes():
    """GPT-2 small (124M) as Hugging Face's GPT2LMHeadModel holds it, lm_head tied to wte:
    wte, wpe, 12 blocks of 12 tensors (Conv1D weights are (in, out)), ln_f: 148 tensors,
    124,439,808 elements."""
    d, vocab, ctx, layers = 768, 50257, 1024, 12
    shapes = [("wte.weight", (vocab, d)), ("wpe.weight", (ctx, d))]
    for i in range(layers):
        h = f"h.{i}."
        shapes += [
            (h + "ln_1.weight", (d,)), (h + "ln_1.bias", (d,)),
            (h + "attn.c_attn.weight", (d, 3 * d)), (h + "attn.c_attn.bias", (3 * d,)),
            (h + "attn.c_proj.weight", (d, d)), (h + "attn.c_proj.bias", (d,)),
            (h + "ln_2.weight", (d,)), (h + "ln_2.bias", (d,)),
            (h + "mlp.c_fc.weight", (d, 4 * d)), (h + "mlp.c_fc.bias", (4 * d,)),
            (h + "mlp.c_proj.weight", (4 * d, d)), (h + "mlp.c_proj.bias", (d,)),
        ]
    return shapes + [("ln_f.weight", (d,)), ("ln_f.bias", (d,))]


def llama_1b_shapes():
    """Llama-3.2-1B's parameters: hidden 2048, 16 layers, 32 query and 8 key/value heads of 64,
    MLP 8192, vocab 128256, embeddings tied (no separate lm_head), RMSNorm weights only:
    1 + 16 x 9 + 1 = 146 tensors, 1,235,814,400 elements."""
    d, layers, kv, ffn, vocab = 2048, 16, 8 * 64, 8192, 128256
    shapes = [("embed_tokens.weight", (vocab, d))]
    for i in range(layers):
        L = f"layers.{i}."
        shapes += [
            (L + "input_layernorm.weight", (d,)),
            (L + "self_attn.q_proj.weight", (d, d)), (L + "self_attn.k_proj.weight", (kv, d)),
            (L + "self_attn.v_proj.weight", (kv, d)), (L + "self_attn.o_proj.weight", (d, d)),
            (L + "post_attention_layernorm.weight", (d,)),
            (L + "mlp.gate_proj.weight", (ffn, d)), (L + "mlp.up_proj.weight", (ffn, d)),
            (L + "mlp.down_proj.weight", (d, ffn)),
        ]
    return shapes + [("norm.weight", (d,))]


# name -> (description, shapes). "all" is every one of these; "sweep" adds single tensors of
# 2^16 .. 2^28 elements (a bandwidth-vs-size curve, like Triton's perf_report).
WORKLOADS = {
    "large": ("one tensor of 2^28 (268M) elements", lambda: [("w", (1 << 28,))]),
    "gpt2": ("GPT-2 small: 148 tensors, 124.4M elements", gpt2_small_shapes),
    "llama-1b": ("Llama-3.2-1B: 146 tensors, 1.236B elements", llama_1b_shapes),
    "many-small": ("2000 tensors of 4096 elements", lambda: [(f"t{i}", (4096,)) for i in range(2000)]),
}
SWEEP = [f"tensor-2^{k}" for k in range(16, 29, 2)]
# The interpreter demo's tensors: odd sizes, a few programs each; never performance.
DEMO_SHAPES = [("a", (33, 17)), ("b", (1000,)), ("c", (4096,)), ("d", (5,))]


def scale_shape(shape, scale):
    """shape with its first dimension multiplied by scale (at least 1): same tensor count,
    about scale x the elements."""
    if scale == 1.0:
        return tuple(shape)
    return (max(1, int(round(shape[0] * scale))),) + tuple(shape[1:])


def workload_shapes(name, scale=1.0):
    """The shapes of workload name ("large", "gpt2", "llama-1b", "many-small", "tensor-2^K",
    "demo"), first dimensions scaled by scale ("demo" is never scaled)."""
    if name == "demo":
        return [s for _, s in DEMO_SHAPES]
    if name.startswith("tensor-2^"):
        shapes = [(1 << int(name[len("tensor-2^"):]),)]
    else:
        shapes = [s for _, s in WORKLOADS[name][1]()]
    return [scale_shape(s, scale) for s in shapes]


def expand_workloads(names):
    """Workload names with "all" and "sweep" expanded, in order, without repeats."""
    out = []
    for name in names:
        for n in (list(WORKLOADS) if name == "all" else SWEEP if name == "sweep" else [name]):
            if n not in out:
                out.append(n)
    return out


def numel_of(shape):
    return math.prod(shape)


# ---------------------------------------------------------------------------------------------
# Bytes formulas (see the module docstring)
# ---------------------------------------------------------------------------------------------


def adam8bit_bytes_per_elem(param_bytes, grad_bytes, block_size=256, amsgrad=False, clip=False):
    """Fewest bytes one Adam step on 8-bit block-wise states moves per element: read p, g and
    the uint8 codes of m, v; write p and the codes; each state's fp32 absmax read and written
    once per block (AMSGrad: + vmax's codes and absmax; clip: + one more read of g)."""
    states = 3 if amsgrad else 2
    n = 2 * param_bytes + grad_bytes + 2 * states + 2 * states * 4 / block_size
    if clip:
        n += grad_bytes
    return n


def adam_bytes_per_elem(param_bytes, grad_bytes, state_bytes, amsgrad=False, clip=False, master=False):
    """Fewest bytes one Adam/AdamW step moves per element: read p, g, m, v; write p, m, v
    (AMSGrad: + read/write vmax; clip: + one more read of g for the norm; master: the fp32
    master is read instead of p and written besides p)."""
    n = (param_bytes + 8 if master else 2 * param_bytes) + grad_bytes + 4 * state_bytes
    if amsgrad:
        n += 2 * state_bytes
    if clip:
        n += grad_bytes
    return n


def rmsprop_bytes_per_elem(param_bytes, grad_bytes, state_bytes, momentum=False, centered=False, clip=False):
    """Fewest bytes one RMSprop step moves per element: read p, g, v; write p, v
    (momentum: + read/write buf; centered: + read/write grad_avg; clip: + a read of g)."""
    n = 2 * param_bytes + grad_bytes + 2 * state_bytes
    if momentum:
        n += 2 * state_bytes
    if centered:
        n += 2 * state_bytes
    if clip:
        n += grad_bytes
    return n


def copy_bytes(nbytes):
    """A device-to-device copy of nbytes reads them and writes them: 2 x size."""
    return 2 * nbytes


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def element_size(dtype):
    return torch.empty((), dtype=dtype).element_size()


# ---------------------------------------------------------------------------------------------
# Variants (what is computed) and implementations (who computes it)
# ---------------------------------------------------------------------------------------------

OURS_NAME = "adam-triton"


@dataclass(frozen=True)
class Variant:
    """One optimizer configuration: the class name (in torch.optim and adam_triton), its
    hyperparameters, the max grad norm for clip+step (None: no clipping), options only
    adam-triton has (state_dtype, master_weights), which torch's baselines run without, and
    adam-triton's class where it has its own (AdamW8bit: torch's AdamW runs beside)."""

    name: str
    cls: str
    hyper: dict = field(default_factory=dict)
    clip: float = None
    ours: dict = field(default_factory=dict)
    ours_cls: str = None

    @property
    def our_cls(self):
        """The adam_triton class name."""
        return self.ours_cls or self.cls

    def bytes_per_elem(self, dtype, clip=None, impl=OURS_NAME):
        """Bytes formula of impl for params and grads of dtype; states of dtype unless
        adam-triton runs with state_dtype (torch's default: the param's dtype)."""
        b = element_size(dtype)
        clip = self.clip is not None if clip is None else clip
        ours = self.ours if impl == OURS_NAME else {}
        if impl == OURS_NAME and self.our_cls.endswith("8bit"):
            return adam8bit_bytes_per_elem(b, b, ours.get("block_size", 256), amsgrad=bool(self.hyper.get("amsgrad")),
                                           clip=clip)
        if ours.get("state_dtype") is not None:
            s_bytes = element_size(ours["state_dtype"])
            return adam_bytes_per_elem(b, b, s_bytes, clip=clip, master=bool(ours.get("master_weights")))
        if self.cls == "RMSprop":
            return rmsprop_bytes_per_elem(
                b, b, b, momentum=self.hyper.get("momentum", 0) != 0,
                centered=bool(self.hyper.get("centered", False)), clip=clip,
            )
        return adam_bytes_per_elem(b, b, b, amsgrad=bool(self.hyper.get("amsgrad", False)), clip=clip)

    def formula(self):
        if self.cls == "RMSprop":
            text = "2P + G + 2S (read p, g, v; write p, v)"
        elif self.our_cls.endswith("8bit"):
            text = ("2P + G + 4 + 16/block (read p, g, uint8 m, v; write p, m, v; 2 fp32 absmax read and written per "
                    "block of 256); torch: 2P + G + 4S")
        elif self.ours.get("master_weights"):
            text = "P + 8 + G + 4S (read master, g, m, v; write p, master, m, v); torch: 2P + G + 4S"
        elif self.ours.get("state_dtype") is not None:
            text = "2P + G + 4S, S = 4 (fp32 states); torch: S = P"
        elif self.hyper.get("amsgrad"):
            text = "2P + G + 6S (read p, g, m, v, vmax; write p, m, v, vmax)"
        else:
            text = "2P + G + 4S (read p, g, m, v; write p, m, v)"
        return text + (" + G (the norm pass reads g)" if self.clip is not None else "")


VARIANTS = {
    "adam": Variant("adam", "Adam", {"lr": 1e-3}),
    "adamw": Variant("adamw", "AdamW", {"lr": 1e-3, "weight_decay": 1e-2}),
    "amsgrad": Variant("amsgrad", "Adam", {"lr": 1e-3, "amsgrad": True}),
    # torch's defaults: alpha 0.99, no momentum, not centered
    "rmsprop": Variant("rmsprop", "RMSprop", {"lr": 1e-3}),
    "clip": Variant("clip", "AdamW", {"lr": 1e-3, "weight_decay": 1e-2}, clip=1.0),
    # bf16 training modes (run them with --dtype bf16)
    "adam-fp32-states": Variant("adam-fp32-states", "Adam", {"lr": 1e-3}, ours={"state_dtype": torch.float32}),
    "adam-master": Variant(
        "adam-master", "Adam", {"lr": 1e-3}, ours={"state_dtype": torch.float32, "master_weights": True}
    ),
    # 8-bit block-wise states (adam_triton.AdamW8bit; torch's fused AdamW beside)
    "adamw-8bit": Variant("adamw-8bit", "AdamW", {"lr": 1e-3, "weight_decay": 1e-2}, ours_cls="AdamW8bit"),
}

OURS = OURS_NAME
BASELINES = ("torch-for-loop", "torch-foreach", "torch-fused", "torch-compile")
CLIP_BASELINES = ("torch-clip+fused",)  # torch.nn.utils.clip_grad_norm_, then fused=True
IMPLS = (OURS,) + BASELINES + CLIP_BASELINES


def impls_for(variant):
    """adam-triton first (the speed-ups divide by its time), then the torch baselines (for
    adam-triton-only options, torch's fused step as it stands, beside)."""
    if variant.ours or variant.ours_cls:
        return (OURS, "torch-fused")
    return (OURS,) + (CLIP_BASELINES if variant.clip is not None else BASELINES)


class Skip(Exception):
    """This implementation does not exist for this case; the message says why."""


def build(impl, variant, params, interpreter_demo=False):
    """(step function, optimizer) of impl for variant over params (whose .grad are set).
    Raises Skip where the implementation does not exist (e.g. RMSprop without fused)."""
    hyper = dict(variant.hyper)
    if impl == OURS:
        import adam_triton

        cls = getattr(adam_triton, variant.our_cls, None)
        if cls is None:
            raise Skip(f"adam_triton has no {variant.our_cls}")
        if variant.clip is not None:
            hyper["max_grad_norm"] = variant.clip
        hyper.update(variant.ours)
        try:
            opt = cls(params, **hyper)
        except TypeError as exc:
            raise Skip(f"adam_triton.{variant.our_cls} does not take {sorted(hyper)}: {exc}") from None
        return opt.step, opt
    cls = getattr(torch.optim, variant.cls)
    if impl == "torch-clip+fused":
        opt = _torch_optimizer(cls, params, hyper, fused=True)
        max_norm = variant.clip

        def clip_step():
            torch.nn.utils.clip_grad_norm_(params, max_norm)
            opt.step()

        return clip_step, opt
    if impl == "torch-compile":
        if interpreter_demo:
            raise Skip("torch.compile is not run in the interpreter demo")
        # PyTorch's recipe: lr as a tensor (no recompiles when it changes), step() in a compiled fn
        opt = _torch_optimizer(cls, params, {**hyper, "lr": torch.tensor(hyper["lr"])})

        @torch.compile(fullgraph=False)
        def compiled_step():
            opt.step()

        return compiled_step, opt
    flag = {"torch-for-loop": {"foreach": False}, "torch-foreach": {"foreach": True},
            "torch-fused": {"fused": True}}[impl]
    opt = _torch_optimizer(cls, params, hyper, **flag)
    return opt.step, opt


def _torch_optimizer(cls, params, hyper, **flag):
    try:
        return cls(params, **hyper, **flag)
    except (TypeError, RuntimeError, ValueError) as exc:
        raise Skip(f"torch.optim.{cls.__name__}({', '.join(f'{k}={v}' for k, v in flag.items())}) "
                   f"is not available: {exc}") from None


def make_params(shapes, dtype, device, seed=0):
    """Random params with random grads (normal; never zeros: zeros hide unwritten outputs)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.randn(shape, generator=gen, device=device, dtype=dtype).requires_grad_(True)
        p.grad = torch.randn(shape, generator=gen, device=device, dtype=dtype)
        params.append(p)
    return params


# Tensors of the correctness check: the workload's shapes, cut to this many elements in total.
CHECK_LIMIT = 1 << 22


def check_against_torch(variant, shapes, dtype, device, steps=2):
    """Run adam-triton and torch's for-loop (after clip_grad_norm_ for clip) for `steps` steps
    on identical random tensors shaped like the workload's (those that fit in CHECK_LIMIT
    elements together; one tensor of CHECK_LIMIT if none does).
    Returns (max |p_ours - p_torch|, max |p_torch - p_start|): the difference next to the
    size of the update, so a reader can judge it."""
    cut, total = [], 0
    for s in shapes:
        if total + numel_of(s) <= CHECK_LIMIT:
            cut.append(s)
            total += numel_of(s)
    cut = cut or [(CHECK_LIMIT,)]
    ours = make_params(cut, dtype, device, seed=1)
    ref = [p.detach().clone().requires_grad_(True) for p in ours]
    start = [p.detach().clone() for p in ours]
    for p, r in zip(ours, ref):
        r.grad = p.grad.clone()
    step, _ = build(OURS, variant, ours)
    ref_opt = getattr(torch.optim, variant.cls)(ref, foreach=False, **variant.hyper)
    with _autotune_off():  # these odd sizes are no workload: no tuning, no cache entry
        for _ in range(steps):
            step()
            if variant.clip is not None:
                torch.nn.utils.clip_grad_norm_(ref, variant.clip, foreach=False)
            ref_opt.step()
    diff = max(float((p.detach().float() - r.detach().float()).abs().max()) for p, r in zip(ours, ref))
    update = max(float((r.detach().float() - s.float()).abs().max()) for r, s in zip(ref, start))
    return diff, update


@contextlib.contextmanager
def _autotune_off():
    saved = os.environ.get("ADAM_TRITON_AUTOTUNE")
    os.environ["ADAM_TRITON_AUTOTUNE"] = "0"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["ADAM_TRITON_AUTOTUNE"]
        else:
            os.environ["ADAM_TRITON_AUTOTUNE"] = saved


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def cuda_time(fn, warmup_ms=25.0, rep_ms=200.0, min_reps=10, max_reps=2000):
    """(median, 20th, 80th percentile) milliseconds of fn() and the number of reps, timed with
    CUDA events around each call, the way triton.testing.do_bench does: the L2 cache is
    flushed (256 MB written) before each rep outside the events; warm-up and reps are set by
    time from a 5-call estimate; unlike do_bench, at least min_reps reps."""
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(warmup_ms / estimate))):
        fn()
    n = min(max_reps, max(min_reps, int(rep_ms / estimate)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        flush.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    return (*_quantiles(times), n)


def cpu_time(fn, reps=5):
    """(median, 20th, 80th percentile) ms of fn() by time.perf_counter, and reps. Used only by
    the interpreter demo: interpreter timings are not performance."""
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return (*_quantiles(times), reps)


def _quantiles(times):
    q = torch.tensor(times, dtype=torch.float64).quantile(torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    return tuple(float(x) for x in q)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def host_ms(step, device, reps=20):
    """Mean host (CPU) milliseconds of step() alone: synchronized before each call so the
    launch queue is empty, no synchronization inside the timed region."""
    total = 0.0
    for _ in range(reps):
        _sync(device)
        t = time.perf_counter()
        step()
        total += time.perf_counter() - t
    _sync(device)
    return total / reps * 1e3


def peak_extra_mb(step, device):
    """torch.cuda.max_memory_allocated over one step minus what was allocated before it, MiB."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / (1 << 20)


def _gpu_activity(event):
    """"kernel", "copy" (memcpy/memset) or None (not a GPU operation) for a profiler event."""
    if event.device_type != torch.autograd.DeviceType.CUDA or getattr(event, "is_user_annotation", False):
        return None
    kind = getattr(event, "activity_type", None)  # kineto's activity name, where torch has it
    if kind in ("kernel", "concurrent_kernel"):
        return "kernel"
    if kind in ("gpu_memcpy", "gpu_memset"):
        return "copy"
    if kind == "gpu_user_annotation":
        return None
    return "copy" if event.name.startswith(("Memcpy", "Memset")) else "kernel"


def cuda_launches(step):
    """(kernels, memcpy/memset operations, {kernel name: count}) of one step, as torch.profiler
    sees them on the GPU; (None, None, {}) when it records no GPU activity (no CUPTI)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    kernels, copies, names = 0, 0, {}
    for event in prof.events():
        kind = _gpu_activity(event)
        if kind == "kernel":
            kernels += 1
            names[event.name] = names.get(event.name, 0) + 1
        elif kind == "copy":
            copies += 1
    if kernels + copies == 0:
        return None, None, {}
    return kernels, copies, names


@contextlib.contextmanager
def count_interpreter_launches():
    """Counts Triton kernel launches under the interpreter (yields a one-element list)."""
    from triton.runtime.interpreter import InterpretedFunction

    counter = [0]
    original = InterpretedFunction.run

    def run(self, *args, **kwargs):
        if not kwargs.get("warmup", False):
            counter[0] += 1
        return original(self, *args, **kwargs)

    InterpretedFunction.run = run
    try:
        yield counter
    finally:
        InterpretedFunction.run = original


@contextlib.contextmanager
def record_configs():
    """Records the launch configs adam-triton asks tuning.config_for for, and whether each
    was tuned now (the bench callback ran) or came from memory or the cache file."""
    seen = []
    original = tuning.config_for

    def config_for(key, bench):
        called = []

        def counting_bench(config):
            called.append(config)
            return bench(config)

        config = original(key, counting_bench)
        entry = {"key": tuning.key_string(key), "config": dict(config), "tuned_now": bool(called)}
        same = next((e for e in seen if e["key"] == entry["key"]), None)
        if same is None:
            seen.append(entry)
        else:
            same["tuned_now"] |= entry["tuned_now"]
        return config

    tuning.config_for = config_for
    try:
        yield seen
    finally:
        tuning.config_for = original


# ---------------------------------------------------------------------------------------------
# One measurement
# ---------------------------------------------------------------------------------------------

WARM_STEPS = 3  # state creation, Triton compilation, autotuning, torch.compile: all in here


def measure(impl, variant, params, device, opts, copy_gbps, numel):
    """Everything reported about one (implementation, variant) over params: a row dict."""
    demo = device.type != "cuda"
    bytes_per_elem = variant.bytes_per_elem(params[0].dtype, impl=impl)
    row = {"status": "ok", "bytes_per_elem": bytes_per_elem, "bytes": bytes_per_elem * numel}
    try:
        step, opt = build(impl, variant, params, interpreter_demo=demo)
    except Skip as exc:
        return {**row, "status": "skipped", "note": str(exc)}
    except Exception as exc:  # a constructor that fails is a result too
        return {**row, "status": "error", "note": f"{type(exc).__name__}: {exc}"}
    try:
        # warm-up; for torch.compile these calls are the compile time
        with record_configs() as configs:
            t = time.perf_counter()
            for _ in range(WARM_STEPS):
                step()
                _sync(device)
            warm_s = time.perf_counter() - t
        if impl == "torch-compile":
            row["compile_s"] = warm_s  # wall time of the first WARM_STEPS calls, synchronized
        if impl == OURS:
            row["configs"] = configs
        if not demo:
            row["peak_extra_mb"] = peak_extra_mb(step, device)
        if demo:
            median, p20, p80, reps = cpu_time(step, opts.demo_reps)
        else:
            median, p20, p80, reps = cuda_time(step, opts.warmup_ms, opts.rep_ms, opts.min_reps)
        gbps = row["bytes"] / (median * 1e-3) / 1e9
        row.update(median_ms=median, p20_ms=p20, p80_ms=p80, reps=reps, gbps=gbps,
                   pct_copy=100.0 * gbps / copy_gbps if copy_gbps else None)
        row["host_ms"] = host_ms(step, device, opts.host_reps)
        if demo:
            if impl == OURS:
                with count_interpreter_launches() as counter:
                    step()
                row["launches"], row["launches_by"] = counter[0], "Triton interpreter launches"
            else:
                row["launches"], row["launches_by"] = None, "not counted on the CPU"
        else:
            kernels, copies, names = cuda_launches(step)
            top = sorted(names.items(), key=lambda kv: -kv[1])[:8]
            row.update(launches=kernels, memcpy_memset=copies, launches_by="torch.profiler GPU kernels",
                       kernels_by_name=dict(top))
            if kernels is None:
                row["launches_by"] = "torch.profiler saw no GPU activity (CUPTI missing?)"
        if impl == OURS:
            row["check_max_abs_diff"], row["check_max_update"] = check_against_torch(
                variant, [tuple(p.shape) for p in params], params[0].dtype, device)
    except Exception as exc:  # reported, never hidden: the row says what failed
        row = {**row, "status": "error", "note": f"{type(exc).__name__}: {exc}"}
    finally:
        del opt, step
        if impl == "torch-compile":
            torch._dynamo.reset()  # the compiled code holds the optimizer and its states
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def add_speedups(rows):
    """adam-triton's speed-up over each baseline of the same (workload, dtype, variant):
    baseline median / adam-triton median; on the baseline rows and, as a dict, on ours."""
    groups = {}
    for r in rows:
        if r.get("status") == "ok" and r.get("median_ms"):
            groups.setdefault((r["workload"], r["dtype"], r["variant"]), []).append(r)
    for group in groups.values():
        ours = next((r for r in group if r["impl"] == OURS), None)
        if ours is None:
            continue
        ours["speedup_vs"] = {}
        for r in group:
            if r is not ours:
                r["adam_triton_speedup"] = r["median_ms"] / ours["median_ms"]
                ours["speedup_vs"][r["impl"]] = r["adam_triton_speedup"]


# ---------------------------------------------------------------------------------------------
# bench
# ---------------------------------------------------------------------------------------------

NO_GPU_BENCH = (
    "adam-triton bench: no CUDA GPU is visible (torch.cuda.is_available() is False), so there "
    "is nothing to measure here. Run it on a GPU machine, or pass --interpreter-demo for a tiny "
    "run through Triton's CPU interpreter (interpreter timings are not performance)."
)
NO_GPU_TUNE = (
    "adam-triton tune: no CUDA GPU is visible (torch.cuda.is_available() is False), so there "
    "is nothing to tune here (the interpreter always uses one fixed config)."
)
INTERPRETER_SET = (
    "adam-triton {cmd}: TRITON_INTERPRET=1 is set, so Triton kernels would run through the CPU "
    "interpreter; unset it to {verb} the GPU."
)
DEMO_NOTE = "interpreter timings are not performance"


def _versions():
    import triton

    import adam_triton

    return {"torch": torch.__version__, "triton": triton.__version__,
            "adam_triton": getattr(adam_triton, "__version__", None),
            "cuda": torch.version.cuda, "python": platform.python_version()}


def _git_revision():
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if rev.returncode != 0:
        return None
    return {"commit": rev.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def _device_info(device):
    if device.type != "cuda":
        return {"name": f"CPU ({platform.processor() or platform.machine()}), Triton interpreter"}
    props = torch.cuda.get_device_properties(device)
    return {"name": props.name, "capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "memory_gib": round(props.total_memory / (1 << 30), 1)}


def _command(args):
    return getattr(args, "command_line", None) or shlex.join([sys.executable] + sys.argv)


def _ready_interpreter():
    """Switch the Triton interpreter on for this process if triton is not imported yet
    (Triton reads the switch when it defines a jit function, its standard library's
    included). True when it is on."""
    if tuning.interpreter_on():
        return True
    if "triton" in sys.modules:
        return False
    os.environ["TRITON_INTERPRET"] = "1"
    return tuning.interpreter_on()


class Progress:
    """A tqdm bar on stderr when tqdm is installed and stderr is a terminal, else one stderr
    line per task (readable in a log)."""

    def __init__(self, total):
        self.total, self.done, self.bar = total, 0, None
        try:
            from tqdm import tqdm
        except ImportError:
            return
        if sys.stderr.isatty():
            self.bar = tqdm(total=total, file=sys.stderr, unit="case", dynamic_ncols=True)

    def start(self, label):
        if self.bar is not None:
            self.bar.set_description(label)
        else:
            print(f"[{self.done + 1}/{self.total}] {label}", file=sys.stderr, flush=True)

    def finish(self):
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _selected_variants(names):
    return list(VARIANTS) if "all" in names else [n for n in VARIANTS if n in names]


def run_bench(args):
    """The `bench` subcommand; returns the exit code."""
    if args.host:
        from . import host_bench

        return host_bench.run(args)
    demo = args.interpreter_demo
    if demo:
        if not _ready_interpreter():
            print("adam-triton bench --interpreter-demo: triton was imported before the "
                  "interpreter could be switched on; run it as `TRITON_INTERPRET=1 adam-triton "
                  "bench --interpreter-demo`.", file=sys.stderr)
            return 2
        device = torch.device("cpu")
        workloads = ["demo"]
        print(f"Interpreter demo on the CPU: {DEMO_NOTE}. Workload: {len(DEMO_SHAPES)} tiny tensors.")
    else:
        device = _cuda_device_or_exit_code(NO_GPU_BENCH, cmd="bench", verb="time")
        if isinstance(device, int):
            return device
        workloads = expand_workloads(args.workload)
    variants = [VARIANTS[n] for n in _selected_variants(args.variant)]
    impls = IMPLS if "all" in args.impl else tuple(args.impl)

    report = {"meta": {
        "tool": "adam-triton bench",
        "interpreter_demo": demo,
        "note": DEMO_NOTE if demo else "GPU timings by CUDA events (median of reps, L2 flushed before each)",
        "device": _device_info(device),
        **_versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": _command(args),
        "git": _git_revision(),
        "env": {k: os.environ.get(k) for k in ("ADAM_TRITON_AUTOTUNE", "ADAM_TRITON_CACHE_DIR", "TRITON_INTERPRET")},
        "tuning_cache": None if demo else str(tuning.cache_path(device)),
        "timing": ({"method": "time.perf_counter, median", "reps": args.demo_reps} if demo else
                   {"method": "CUDA events, median; L2 flushed before each rep", "warmup_ms": args.warmup_ms,
                    "rep_ms": args.rep_ms, "min_reps": args.min_reps}),
        "warm_steps": WARM_STEPS,
        "host_reps": args.host_reps,
        "scale": 1.0 if demo else args.scale,
        "bytes_formulas": {v.name: v.formula() for v in variants},
        "bytes_note": "P, G, S: bytes of one param, grad, state element; GB/s = formula x elements / median",
    }, "results": []}

    # the copy ceiling, measured in this run: bytes = 2 x size
    copy = measure_copy(device, (16 << 20) if demo else max(1 << 20, int(args.copy_mib * (1 << 20))), args)
    report["meta"]["copy"] = copy
    copy_gbps = copy["gbps"]
    print(f"device copy: {copy_gbps:.1f} GB/s ({copy['bytes_moved'] / 1e9:.2f} GB moved in {copy['median_ms']:.3f} ms)"
          + (f"  [{DEMO_NOTE}]" if demo else ""))

    tasks = [(w, d, v, i) for w in workloads for d in args.dtype for v in variants
             for i in impls_for(v) if i in impls]
    progress = Progress(len(tasks))
    rows = report["results"]
    try:
        for wname in workloads:
            shapes = workload_shapes(wname, 1.0 if demo else args.scale)
            numel = sum(numel_of(s) for s in shapes)
            for dname in args.dtype:
                dtype = DTYPES[dname]
                group = [t for t in tasks if t[0] == wname and t[1] == dname]
                if not group:
                    continue
                base = {"workload": wname, "dtype": dname, "n_tensors": len(shapes), "numel": numel}
                short = _memory_shortfall(numel, dtype, device)
                if short:
                    for _, _, v, i in group:
                        progress.start(f"{wname} {dname} {v.name} {i}")
                        rows.append({**base, "variant": v.name, "impl": i, "status": "skipped", "note": short})
                        progress.finish()
                    continue
                params = make_params(shapes, dtype, device)
                for _, _, v, i in group:
                    progress.start(f"{wname} {dname} {v.name} {i}")
                    row = measure(i, v, params, device, args, copy_gbps, numel)
                    rows.append({**base, "variant": v.name, "impl": i, **row})
                    add_speedups(rows)
                    progress.finish()
                    print(row_line(rows[-1]), flush=True)
                    if args.json:
                        write_json(report, args.json)  # partial results survive a timeout
                del params
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    finally:
        progress.close()

    add_speedups(rows)
    print(format_table(report))
    if args.json:
        write_json(report, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        print(plot(report, args.plot))
    return 0


def measure_copy(device, nbytes, opts):
    """The copy ceiling: dst.copy_(src) of nbytes of random fp32, bytes moved = 2 x size."""
    n = nbytes // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    if device.type == "cuda":
        median = cuda_time(lambda: dst.copy_(src), opts.warmup_ms, opts.rep_ms, opts.min_reps)[0]
    else:
        median = cpu_time(lambda: dst.copy_(src), 10)[0]
    moved = copy_bytes(n * 4)
    return {"bytes_moved": moved, "median_ms": median, "gbps": moved / (median * 1e-3) / 1e9,
            "what": "dst.copy_(src), fp32, read + write"}


def _memory_shortfall(numel, dtype, device):
    """A message when the GPU lacks room for params, grads, three states and two temporaries
    of the workload (a generous bound for every implementation); else None."""
    if device.type != "cuda":
        return None
    need = 7 * numel * element_size(dtype)
    free, _ = torch.cuda.mem_get_info(device)
    if need > 0.9 * free:
        return f"needs about {need / 1e9:.1f} GB of GPU memory, {free / 1e9:.1f} GB free (use --scale)"
    return None


def write_json(report, path):
    """Write the report as JSON (non-finite numbers as null)."""
    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(clean(report), f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def row_line(r):
    """One finished case in a line (printed as the run goes, so a run cut short shows them)."""
    head = f"{r['workload']} {r['dtype']} {r['variant']} {r['impl']}:"
    if r.get("status") != "ok":
        return f"{head} {r.get('status')}: {r.get('note', '')}"
    pct = "" if r.get("pct_copy") is None else f" ({r['pct_copy']:.0f}% of copy)"
    return f"{head} {r['median_ms']:.3f} ms, {r['gbps']:.1f} GB/s{pct}"


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def format_table(report):
    """The results as a fixed-width text table (one line per row; notes for skips/errors)."""
    meta = report["meta"]
    head = f"adam-triton bench on {meta['device']['name']} | torch {meta['torch']} | triton {meta['triton']}"
    if meta.get("interpreter_demo"):
        head += f" | {DEMO_NOTE.upper()}"
    copy = meta.get("copy")
    if copy:
        head += f"\ncopy bandwidth measured in this run: {copy['gbps']:.1f} GB/s"
    cols = ("workload", "dtype", "variant", "impl", "median ms", "p20-p80 ms", "GB/s", "% copy",
            "ours x", "launches", "host ms", "peak MiB", "compile s", "check |dp|")
    lines = []
    for r in report["results"]:
        if r.get("status") != "ok":
            note = str(r.get("note", ""))
            note = note if len(note) <= 160 else note[:157] + "..."
            lines.append((r["workload"], r["dtype"], r["variant"], r["impl"], f"{r.get('status')}: {note}"))
            continue
        spread = f"{r['p20_ms']:.3f}-{r['p80_ms']:.3f}"
        lines.append((
            r["workload"], r["dtype"], r["variant"], r["impl"], f"{r['median_ms']:.3f}", spread,
            _fmt(r.get("gbps"), ".1f"), _fmt(r.get("pct_copy"), ".1f"),
            _fmt(r.get("adam_triton_speedup"), ".2f"), _fmt(r.get("launches"), "d"),
            _fmt(r.get("host_ms"), ".3f"), _fmt(r.get("peak_extra_mb"), ".1f"), _fmt(r.get("compile_s"), ".1f"),
            _fmt(r.get("check_max_abs_diff"), ".1e"),
        ))
    widths = [len(c) for c in cols]
    for line in lines:
        if len(line) == len(cols):
            widths = [max(w, len(str(v))) for w, v in zip(widths, line)]
    out = [head, "  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    for line in lines:
        if len(line) == len(cols):
            out.append("  ".join(str(v).ljust(w) for v, w in zip(line, widths)))
        else:
            out.append("  ".join(str(v).ljust(w) for v, w in zip(line[:4], widths)) + "  " + line[4])
    out.append("ours x: baseline median / adam-triton median (>1: adam-triton is faster). check |dp|: max "
               "|p_ours - p_torch| after 2 steps against torch's for-loop on workload-shaped tensors. "
               "GB/s from the bytes formulas: " + "; ".join(f"{k} {v}" for k, v in meta["bytes_formulas"].items()))
    return "\n".join(out)


def plot(report, path):
    """GB/s against elements per step, one line per implementation, one panel per
    (variant, dtype), the measured copy bandwidth dashed. Returns a line saying what happened."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot written (pip install matplotlib, or adam-triton[plot])"
    rows = [r for r in report["results"] if r.get("status") == "ok" and r.get("gbps")]
    if not rows:
        return "no measurements to plot"
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
    dtypes = [d for d in DTYPES if any(r["dtype"] == d for r in rows)]
    fig, axes = plt.subplots(len(variants), len(dtypes), figsize=(6.5 * len(dtypes), 3.8 * len(variants)),
                             squeeze=False)
    for (vi, variant), (di, dtype) in itertools.product(enumerate(variants), enumerate(dtypes)):
        ax = axes[vi, di]
        for impl in IMPLS:
            pts = sorted((r["numel"], r["gbps"], r["workload"]) for r in rows
                         if r["variant"] == variant and r["dtype"] == dtype and r["impl"] == impl)
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl,
                    color=f"C{IMPLS.index(impl)}")
            if impl == OURS:
                for x, y, name in pts:
                    ax.annotate(name, (x, y), textcoords="offset points", xytext=(3, 4), fontsize=7)
        copy = report["meta"].get("copy")
        if copy:
            ax.axhline(copy["gbps"], linestyle="--", color="gray", label="device copy")
        ax.set_xscale("log")
        ax.set_ylim(bottom=0)
        ax.set_xlabel("elements per step")
        ax.set_ylabel("GB/s (bytes formula / median)")
        ax.set_title(f"{variant}, {dtype}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    meta = report["meta"]
    title = f"adam-triton bench: {meta['device']['name']}, torch {meta['torch']}, triton {meta['triton']}"
    if meta.get("interpreter_demo"):
        title += f"\n{DEMO_NOTE.upper()}"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97 if len(variants) > 1 else 0.9))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"wrote {path}"


# ---------------------------------------------------------------------------------------------
# tune
# ---------------------------------------------------------------------------------------------


def _cuda_device_or_exit_code(no_gpu_message, cmd, verb):
    """The current CUDA device, or the exit code after saying why not: 0 without a GPU,
    2 when TRITON_INTERPRET is set (the kernels would run through the interpreter)."""
    if not torch.cuda.is_available():
        print(no_gpu_message)
        return 0
    if tuning.interpreter_on():
        print(INTERPRETER_SET.format(cmd=cmd, verb=verb), file=sys.stderr)
        return 2
    return torch.device("cuda", torch.cuda.current_device())


def run_tune(args):
    """The `tune` subcommand: tune every kernel key the chosen workloads hit, store the winners
    in the per-device cache file; returns the exit code."""
    device = _cuda_device_or_exit_code(NO_GPU_TUNE, cmd="tune", verb="tune on")
    if isinstance(device, int):
        return device
    path = tuning.cache_path(device)
    print(f"tuning for {tuning.device_name(device)} (triton {_versions()['triton']}); cache file {path}")
    report = {"meta": {"tool": "adam-triton tune", "device": _device_info(device), **_versions(),
                       "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       "command": _command(args), "cache_file": str(path), "scale": args.scale},
              "results": []}
    workloads = expand_workloads(args.workload)
    variants = [VARIANTS[n] for n in _selected_variants(args.variant)]
    for wname in workloads:
        shapes = workload_shapes(wname, args.scale)
        numels = [numel_of(s) for s in shapes]
        for dname in args.dtype:
            dtype = DTYPES[dname]
            short = _memory_shortfall(sum(numels), dtype, device)
            if short:
                print(f"{wname} {dname}: skipped, {short}")
                continue
            params = make_params(shapes, dtype, device)
            for variant in variants:
                tune_case(f"{wname} {dname} {variant.name}", variant, params, report["results"])
                torch.cuda.synchronize()
            del params
            gc.collect()
            torch.cuda.empty_cache()
    n_tuned = sum(1 for r in report["results"])
    if path.exists():
        print(f"{n_tuned} key(s) tuned; winners stored in {path} (later runs read them instead of tuning)")
    else:
        print(f"{n_tuned} key(s) tuned, but {path} could not be written (see the warning above)")
    if args.json:
        write_json(report, args.json)
        print(f"wrote {args.json}")
    return 0


def tune_case(label, variant, params, results, out=print):
    """Tune, afresh, every kernel key one adam-triton step of variant over params hits (one
    step inside tuning.retune), printing each key's configs and appending them to results.
    Returns the number of keys tuned, or None (with a message) where adam_triton lacks the
    variant."""
    import adam_triton

    cls = getattr(adam_triton, variant.our_cls, None)
    hyper = dict(variant.hyper)
    if variant.clip is not None:
        hyper["max_grad_norm"] = variant.clip
    hyper.update(variant.ours)
    try:
        if cls is None:
            raise TypeError(f"adam_triton has no {variant.our_cls}")
        opt = cls(params, **hyper)
    except TypeError as exc:
        out(f"{label}: skipped ({exc})")
        return None
    # What one bench call moves: the update's bytes over the scratch tensors (_base times one
    # update launch on tensors of tuning.scratch_numels of the bucket's sizes; here one bucket
    # holds every param).
    numels = [p.numel() for p in params]
    nbytes = variant.bytes_per_elem(params[0].dtype, clip=False) * sum(tuning.scratch_numels(numels))
    tuned = []

    def report_key(key, tried, best):
        key_bytes = nbytes if key and key[0] == getattr(opt, "kernel_name", None) else None
        out(format_tuning(label, key, tried, best, key_bytes))
        tuned.append(key)
        results.append({
            "case": label, "key": tuning.key_string(key), "best": dict(best),
            "tried": [{"config": dict(c), "ms": ms if math.isfinite(ms) else None,
                       "gbps": key_bytes / (ms * 1e-3) / 1e9 if key_bytes and math.isfinite(ms) else None,
                       "error": None if err is None else repr(err)} for c, ms, err in tried],
        })

    with tuning.retune(report=report_key):
        opt.step()  # each bucket's key is tuned on scratch tensors first, then this step runs
    return len(tuned)


def format_tuning(label, key, results, best, nbytes):
    """The configs tried for one key with their ms and GB/s; the winner starred."""
    lines = [f"{label}: {tuning.key_string(key)}",
             "    CHUNK  BLOCK  warps        ms      GB/s"]
    for config, ms, err in results:
        mark = "*" if config == best else " "
        if err is not None:
            lines.append(f"  {mark} {config['CHUNK']:5d}  {config['BLOCK']:5d}  {config['num_warps']:5d}  failed: {err}")
            continue
        gbps = f"{nbytes / (ms * 1e-3) / 1e9:8.1f}" if nbytes else "     n/a"
        lines.append(f"  {mark} {config['CHUNK']:5d}  {config['BLOCK']:5d}  {config['num_warps']:5d}  {ms:8.4f}  {gbps}")
    if nbytes is None:
        lines.append("    (GB/s n/a: not the update kernel, its bytes are not known here)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------


def _workload_args(p):
    p.add_argument("--workload", nargs="+", default=["all"], metavar="NAME",
                   choices=["all", "sweep", *WORKLOADS, *SWEEP],
                   help="workloads: " + ", ".join(f"{k} ({v[0]})" for k, v in WORKLOADS.items())
                   + "; all = those four (default); sweep = single tensors of 2^16..2^28 elements")
    p.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=list(DTYPES),
                   help="param/grad/state dtype (default: fp32 bf16)")
    p.add_argument("--variant", nargs="+", default=["all"], choices=["all", *VARIANTS],
                   help="optimizer variants (default all; rmsprop and clip run where adam_triton has them)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply every tensor's first dimension by this (e.g. 0.25 to shrink)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")


def register(subparsers):
    """Add the `bench` and `tune` subcommands to an argparse subparsers object; each sets
    func (call args.func(args); it returns the exit code)."""
    bench = subparsers.add_parser(
        "bench", help="time one optimizer step: adam-triton vs torch.optim on this GPU",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _workload_args(bench)
    bench.add_argument("--impl", nargs="+", default=["all"], choices=["all", *IMPLS],
                       help="implementations (default all; torch-compile costs compile time per case)")
    bench.add_argument("--plot", metavar="PATH", help="write a PNG of GB/s against size (needs matplotlib)")
    bench.add_argument("--interpreter-demo", action="store_true",
                       help="tiny CPU run through Triton's interpreter (interpreter timings are not performance)")
    bench.add_argument("--warmup-ms", type=float, default=25.0, help="warm-up per case, ms (default 25)")
    bench.add_argument("--rep-ms", type=float, default=200.0, help="timed reps per case, ms (default 200)")
    bench.add_argument("--min-reps", type=int, default=10, help="at least this many timed reps (default 10)")
    bench.add_argument("--host-reps", type=int, default=20, help="step() calls averaged for host time")
    bench.add_argument("--copy-mib", type=float, default=1024.0, help="size of the copy measured, MiB")
    bench.add_argument("--demo-reps", type=int, default=3, help="timed reps in the interpreter demo")
    host = bench.add_argument_group(
        "host time (--host)", "the CPU cost of step() against torch fused; runs without a GPU")
    host.add_argument("--host", action="store_true",
                      help="time the host side of step() (thread CPU time; launches stubbed without a GPU)")
    host.add_argument("--host-tensors", type=int, nargs="+", default=[148, 2000, 10000], metavar="N",
                      help="tensor counts (default 148 2000 10000)")
    host.add_argument("--host-groups", type=int, nargs="+", default=[1, 2, 100], metavar="G",
                      help="param group counts (default 1 2 100)")
    host.add_argument("--host-numel", type=int, default=4096, help="elements per tensor (default 4096)")
    host.add_argument("--host-steps", type=int, default=31, help="timed steps per case (default 31)")
    bench.set_defaults(func=run_bench)
    tune = subparsers.add_parser(
        "tune", help="autotune the kernels for this GPU and workload; cache the winners",
        description="Tune each kernel key the workloads hit (every candidate timed on scratch "
                    "tensors), show the configs tried with their GB/s, and store the winners in "
                    "the per-device cache file that later runs read instead of tuning again. "
                    "Cache dir: $ADAM_TRITON_CACHE_DIR, else ~/.cache/adam-triton.")
    _workload_args(tune)
    tune.set_defaults(func=run_tune)


def main(argv=None):
    """`python -m adam_triton.bench bench|tune ...`; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m adam_triton.bench",
                                     description="adam-triton's benchmark and tuner")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(argv)
    if argv is not None:
        args.command_line = shlex.join(["python", "-m", "adam_triton.bench", *argv])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
