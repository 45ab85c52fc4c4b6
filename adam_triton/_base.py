"""The machinery every fused optimizer shares: lazy state, grouping tensors into buckets,
the kernel path (one update launch per bucket plus one step increment, or the norm pass
that also increments steps when clipping), the plain-PyTorch path, AMP scaling, clipping,
DTensor shards, mixed-precision modes and checkpoint loading.

A subclass describes its algorithm: which state buffers it keeps (in kernel slot order),
how to launch its kernel on a bucket, and which reference function the plain-PyTorch path
runs.
"""

import torch

from . import tuning
from ._tables import BucketTables

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LOW_PRECISION = (torch.float16, torch.bfloat16)
MASTER_KEY = "master_param"  # state key of the fp32 master copy (master_weights=True)


try:  # DTensor params (FSDP2): the kernels update each rank's local shard
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed
    DTensor = None


def _local(t):
    return t.to_local() if DTensor is not None and isinstance(t, DTensor) else t


def _real(t):
    """The tensor the kernels see: the local shard of a DTensor, as real numbers."""
    t = _local(t)
    return torch.view_as_real(t) if t.is_complex() else t


def _sharding(t):
    """(mesh, placements) of a DTensor, None for a plain tensor."""
    if DTensor is not None and isinstance(t, DTensor):
        return (t.device_mesh, tuple(t.placements))
    return None


def _tl_dtype(dtype):
    import triton.language as tl

    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]


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


def check_torch_flags(name, fused, differentiable):
    """foreach is accepted and ignored (the update is always one fused launch); fused=False
    and differentiable=True cannot be honoured."""
    if fused is False:
        raise RuntimeError(
            f"adam_triton.{name} is always fused; fused=False cannot be honoured "
            f"(use torch.optim.{name} for an unfused step)"
        )
    if differentiable:
        raise RuntimeError(f"adam_triton.{name} does not support differentiable=True")


class _Entry:
    """One parameter's tensors as the kernel sees them: real views, contiguous (staged
    copies where the original is not), plus where to copy staged results back."""

    __slots__ = ("param", "grad", "states", "step", "write_back")

    def __init__(self, param, grad, states, step):
        self.write_back = []
        self.param = self._contiguous(_real(param), True)
        self.grad = self._contiguous(_real(grad), False)
        self.states = [None if s is None else self._contiguous(_real(s), True) for s in states]
        self.step = step

    def _contiguous(self, t, written):
        if t.is_contiguous():
            return t
        staged = t.contiguous()
        if written:
            self.write_back.append((t, staged))
        return staged

    def finish(self):
        for original, staged in self.write_back:
            original.copy_(staged)


class _Plan:
    """One bucket's work for this step: its tensors and, on the kernel path, its tables,
    triton dtypes (param, grad, state), launch config and lr."""

    __slots__ = ("group", "key", "entries", "tables", "dtypes", "config", "lr", "master",
                 "stochastic", "steps_done")

    def __init__(self, group, key, entries):
        self.group, self.key, self.entries = group, key, entries
        self.tables = self.dtypes = self.config = self.lr = None
        self.master = self.stochastic = self.steps_done = False


def _stochastic_bf16(x, seed, step, index):
    """x (fp32) rounded to bf16 stochastically with torch's RNG (the PyTorch path; the
    kernels draw from Philox, so the two paths' random bits differ)."""
    gen = torch.Generator(device=x.device)
    gen.manual_seed(seed + int(step) * 1000003 + index * 7919)
    bits = x.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, generator=gen, device=x.device, dtype=torch.int32)
    rounded = ((bits + noise) >> 16).to(torch.int16)
    out = rounded.view(torch.bfloat16)
    return torch.where(torch.isnan(x), x.to(torch.bfloat16), out)


def _grad_sq_sum(entries, grad_scale):
    """Sum of squares of (grad / grad_scale) over entries, as a 0-d tensor (PyTorch path)."""
    total = None
    for e in entries:
        g = e.grad.to(torch.float64 if e.grad.dtype == torch.float64 else torch.float32)
        if grad_scale is not None:
            g = g / grad_scale
        s = (g * g).sum()
        total = s if total is None else total + s
    return total


class FusedOptimizer(torch.optim.Optimizer):
    """Base class: subclasses set `kernel_name`, `state_keys(group)`, `_launch` and
    `_reference`.

    Options shared by every optimizer (optimizer-wide, not per group):
      max_grad_norm: clip the global grad norm of all groups first (as clip_grad_norm_).
      state_dtype: dtype of the state buffers (None: the param's dtype, as torch).
      master_weights: keep an fp32 copy of each bf16/fp16 param (state key master_param);
        the kernel updates it and writes the param rounded to nearest even.
      stochastic_rounding: round bf16 params (without master weights) stochastically;
        `seed` makes runs reproducible."""

    _step_supports_amp_scaling = True  # GradScaler hands us grad_scale / found_inf
    kernel_name = None

    def __init__(self, params, defaults, max_grad_norm=None, state_dtype=None,
                 master_weights=False, stochastic_rounding=False, seed=0):
        if max_grad_norm is not None and not 0.0 <= max_grad_norm:
            raise ValueError(f"Invalid max_grad_norm value: {max_grad_norm}")
        if state_dtype is not None and state_dtype not in (*KERNEL_DTYPES, torch.float64):
            raise ValueError(f"Invalid state_dtype: {state_dtype} (use float32, bfloat16, float16 or float64)")
        if master_weights and stochastic_rounding:
            raise ValueError("master_weights and stochastic_rounding are alternatives: choose one")
        super().__init__(params, defaults)
        self.max_grad_norm = max_grad_norm
        self.state_dtype = state_dtype
        self.master_weights = bool(master_weights)
        self.stochastic_rounding = bool(stochastic_rounding)
        self.seed = int(seed)
        self.last_grad_norm = None  # 0-d tensor: total grad norm before clipping, last step
        self._bucket_tables = {}

    # -- what a subclass provides -------------------------------------------------------
    def state_keys(self, group):
        """Names of the state buffers in the kernel's slot order (None: slot unused)."""
        raise NotImplementedError

    def _launch(self, plan, tables, grad_scale=None, found_inf=None, clip_coef=None):
        """Launch the update kernel for a bucket (plan carries group, dtypes, config, lr, modes)."""
        raise NotImplementedError

    def _reference(self, group, tensor_lists, steps, grad_scale, compute_dtype):
        raise NotImplementedError

    def _sparse_message(self):
        return f"{type(self).__name__} does not support sparse gradients"

    # -- step -----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step over every param group; returns closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # validate everything before anything changes
        work = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError(self._sparse_message())
                if p.grad.shape != p.shape:
                    raise RuntimeError(
                        f"grad of shape {tuple(p.grad.shape)} does not match its param's {tuple(p.shape)}"
                    )
            work.append((group, params))
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        plans = [plan for gi, (group, params) in enumerate(work) if params
                 for plan in self._plan_group(gi, group, params)]
        clip = None
        if self.max_grad_norm is not None and plans:
            clip = self._clip_coefficients(plans, grad_scale, found_inf)
        for plan in plans:
            if plan.tables is not None:
                self._kernel_bucket(plan, grad_scale, found_inf, clip)
            else:
                self._reference_bucket(plan, grad_scale, found_inf, clip)
            for e in plan.entries:
                e.finish()
        return loss

    # -- state --------------------------------------------------------------------------
    def _slot_keys(self, group):
        """State keys of the four kernel slots: the algorithm's three, then the master."""
        keys = list(self.state_keys(group))
        return keys + [None] * (3 - len(keys)) + [MASTER_KEY if self.master_weights else None]

    def _state_dtype_for(self, param):
        if self.state_dtype is None or not param.is_floating_point():
            return param.dtype
        return self.state_dtype

    def _init_state(self, param, state, group):
        """torch's lazy state: a 0-d float32 step (on the param's device: the kernels read
        it there) and zeroed buffers; plus the fp32 master copy where asked for."""
        state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
        dtype = self._state_dtype_for(param)
        for key in self.state_keys(group):
            if key is not None:
                state[key] = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
        if self.master_weights and param.dtype in LOW_PRECISION:
            state[MASTER_KEY] = param.detach().to(torch.float32, copy=True)

    def state_bytes_per_param(self):
        """Bytes of optimizer state (buffers, masters and steps) per param element held."""
        n = sum(p.numel() for p in self.state)
        held = sum(t.numel() * t.element_size() for st in self.state.values()
                   for t in st.values() if isinstance(t, torch.Tensor))
        return held / max(1, n)

    # -- buckets --------------------------------------------------------------------------
    def _plan_group(self, gi, group, params):
        """Group a param group's tensors into buckets and prepare each bucket's launch."""
        keys = self._slot_keys(group)
        buckets = {}
        for p in params:
            state = self.state[p]
            if len(state) == 0:
                self._init_state(p, state, group)
            states = [None if k is None else state.get(k) for k in keys]
            ref = next((s for s in states[:3] if s is not None), p)
            key = (p.device, _real(p).dtype, _real(p.grad).dtype, _real(ref).dtype, states[3] is not None,
                   _sharding(p))
            buckets.setdefault(key, []).append(_Entry(p, p.grad, states, state["step"]))
        return [self._plan_bucket(gi, group, key, entries) for key, entries in buckets.items()]

    def _plan_bucket(self, gi, group, key, entries):
        plan = _Plan(group, key, entries)
        plan.master = key[4]
        plan.stochastic = self.stochastic_rounding and key[1] == torch.bfloat16 and not plan.master
        if not self._uses_kernel(key[0], key[1:4]):
            return plan
        plan.dtypes = tuple(_tl_dtype(d) for d in key[1:4])
        rows = []
        for e in entries:
            slots = [0 if s is None else s.data_ptr() for s in e.states]
            slots += [0] * (4 - len(slots))
            rows.append((e.param.numel(), e.step.data_ptr(), e.param.data_ptr(), e.grad.data_ptr(), *slots))
        numels = [r[0] for r in rows]
        lr = group["lr"]
        # a tensor on the bucket's device is read by the kernel; anything else is a number
        plan.lr = lr if isinstance(lr, torch.Tensor) and lr.device == key[0] else float(lr)
        tune_key = (self.kernel_name, str(key[0]), key[1:5], self._flags(group), tuning.size_class(numels))
        plan.config = tuning.config_for(tune_key, lambda c: self._bench_scratch(plan, numels, c))
        tables = self._bucket_tables.setdefault((gi, key), BucketTables())
        plan.tables = tables.update(rows, key[0], plan.config["CHUNK"])
        return plan

    @staticmethod
    def _uses_kernel(device, dtypes):
        if any(d not in KERNEL_DTYPES for d in dtypes):
            return False  # float64 params take the PyTorch path (the kernels compute in fp32)
        if device.type == "cuda":
            return True
        return device.type == "cpu" and tuning.interpreter_on()

    def _clip_coefficients(self, plans, grad_scale, found_inf):
        """{device: 0-d clip coefficient} from the global norm of every grad of every group
        (divided by grad_scale); sets last_grad_norm. Kernel buckets also get their steps
        incremented here (by the norm pass). No host sync."""
        from .kernels import clip_coefficient

        devices = {plan.key[0] for plan in plans}
        kernel_plans = [plan for plan in plans if plan.tables is not None]
        n_partials = sum(max(1, plan.tables.n_chunks) for plan in kernel_plans)
        sharded = any(plan.key[5] is not None for plan in plans)
        if len(devices) == 1 and len(kernel_plans) == len(plans) and not sharded:
            # the common case: one device, all buckets on the kernel path -> stage 2 in one program
            device = next(iter(devices))
            partials = torch.zeros(n_partials, dtype=torch.float32, device=device)
            base = 0
            for plan in kernel_plans:
                self._grad_sq_partials(plan, partials[base:], grad_scale, found_inf)
                base += max(1, plan.tables.n_chunks)
            norm = torch.empty((), dtype=torch.float32, device=device)
            coef = torch.empty((), dtype=torch.float32, device=device)
            clip_coefficient(partials, n_partials, self.max_grad_norm, norm, coef)
            self.last_grad_norm = norm
            return {device: coef}
        # general case: squared sums per bucket, combined with torch ops (and across ranks)
        first = plans[0].key[0]
        sq_sums = {}
        for plan in plans:
            if plan.tables is not None:
                partials = torch.zeros(max(1, plan.tables.n_chunks), dtype=torch.float32, device=plan.key[0])
                self._grad_sq_partials(plan, partials, grad_scale, found_inf)
                local = partials.sum()
            else:
                local = _grad_sq_sum(plan.entries, grad_scale).to(torch.float32)
            sharding = plan.key[5]
            sq_sums[sharding] = local.to(first) + (sq_sums[sharding] if sharding in sq_sums else 0.0)
        norm = self._global_sq_sum(sq_sums).sqrt()
        coef = torch.clamp(self.max_grad_norm / (norm + 1e-6), max=1.0)
        self.last_grad_norm = norm
        return {d: coef.to(d) for d in devices}

    def _grad_sq_partials(self, plan, partials, grad_scale, found_inf):
        from .kernels import grad_sq_partials

        t = plan.tables
        grad_sq_partials(
            t.table, t.chunks, t.n_chunks, len(t.rows), partials, grad_dtype=_tl_dtype(plan.key[2]),
            aligned=t.aligned, config=plan.config, grad_scale=grad_scale, found_inf=found_inf,
        )
        plan.steps_done = True

    @staticmethod
    def _global_sq_sum(sq_sums):
        """Sum of squares over all ranks: each bucket's local sum, grouped by sharding; a
        DTensor group is summed over its sharded mesh dims (an all-reduce), as
        clip_grad_norm_ does on DTensor params."""
        from torch.distributed.tensor import Partial, Replicate

        total = None
        for sharding, local in sq_sums.items():
            if sharding is not None:
                mesh, placements = sharding
                spec = [Partial() if pl.is_shard() else Replicate() for pl in placements]
                local = DTensor.from_local(local, mesh, spec).full_tensor()
            total = local if total is None else total + local.to(total.device)
        return total

    def _kernel_bucket(self, plan, grad_scale, found_inf, clip):
        from .kernels import increment_steps

        if not plan.steps_done:
            increment_steps(plan.tables.table, len(plan.entries), found_inf)
        if plan.tables.n_chunks:
            clip_coef = None if clip is None else clip[plan.key[0]]
            self._launch(plan, plan.tables, grad_scale, found_inf, clip_coef)

    def _flags(self, group):
        """Group options that select a kernel variant (part of the tuning key)."""
        return ()

    def _bench_scratch(self, plan, numels, config):
        """Milliseconds of one launch with config on random scratch tensors shaped like the
        bucket (never the user's tensors: tuning cannot apply an update twice)."""
        device, p_dtype, g_dtype, s_dtype = plan.key[:4]
        keep = []

        def rand(n, dtype):
            t = torch.rand(n, device=device, dtype=torch.float32).add_(0.5).to(dtype)
            keep.append(t)
            return t.data_ptr()

        step = torch.ones((), device=device)
        slots = [s is not None for s in plan.entries[0].states]
        rows = [
            (n, step.data_ptr(), rand(n, p_dtype), rand(n, g_dtype),
             *[rand(n, torch.float32 if k == 3 else s_dtype) if used else 0 for k, used in enumerate(slots)])
            for n in tuning.scratch_numels(numels)
        ]
        scratch = BucketTables().update(rows, device, config["CHUNK"])
        saved = plan.config
        plan.config = config
        try:
            import triton.testing

            return triton.testing.do_bench(lambda: self._launch(plan, scratch), warmup=5, rep=20)
        finally:
            plan.config = saved

    def _reference_bucket(self, plan, grad_scale, found_inf, clip):
        """The plain-PyTorch path (CPU without the interpreter, float64): the reference math
        in fp32 (fp64 for fp64 params). Reads found_inf on the host."""
        if found_inf is not None and float(found_inf) != 0:
            return
        entries = plan.entries
        params = [e.param for e in entries]
        compute = torch.float64 if params[0].dtype == torch.float64 else torch.float32
        grads = [e.grad for e in entries]
        if clip is not None:
            coef = clip[plan.key[0]]
            grads = [g.to(compute) / (1.0 if grad_scale is None else grad_scale) * coef for g in grads]
            grad_scale = None
        if plan.master:
            targets = [e.states[3] for e in entries]
        elif plan.stochastic:
            targets = [p.to(torch.float32) for p in params]
        else:
            targets = params
        lists = [targets, grads] + [[e.states[k] for e in entries] for k in range(3)]
        lists = [None if all(t is None for t in lst) else lst for lst in lists]
        steps = [e.step for e in entries]
        self._reference(plan.group, lists, steps, grad_scale, compute)
        if plan.master or plan.stochastic:
            for i, (p, t) in enumerate(zip(params, targets)):
                p.copy_(t if plan.master else _stochastic_bf16(t, self.seed, steps[i], i))

    # -- checkpoints ----------------------------------------------------------------------
    def load_state_dict(self, state_dict):
        """torch's loader, then: every `step` a float32 tensor on its param's device (the
        kernels read it there), and buffers back in this optimizer's dtypes: torch's loader
        casts floating state to the param's dtype, which would round fp32 states and masters
        of bf16 params; they are restored from the saved values instead."""
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            state = self.state.get(p)
            saved = state_dict["state"].get(saved_id)
            if not state or saved is None:
                continue
            for key, value in saved.items():
                if key == "step":  # a number in checkpoints of torch < 1.12
                    state[key] = torch.as_tensor(value, dtype=torch.float32).to(p.device, copy=True)
                    continue
                if not isinstance(value, torch.Tensor):
                    continue
                if key == MASTER_KEY:
                    state[key] = value.to(device=p.device, dtype=torch.float32, copy=True)
                elif value.is_floating_point() and p.is_floating_point():
                    state[key] = value.to(device=p.device, dtype=self._state_dtype_for(p), copy=True)
            if self.master_weights and p.dtype in LOW_PRECISION and MASTER_KEY not in state:
                state[MASTER_KEY] = p.detach().to(torch.float32, copy=True)
        self._bucket_tables.clear()
