"""The machinery every fused optimizer shares: grouping tensors into buckets, the kernel
path (one update launch per bucket plus one step increment), the plain-PyTorch path, AMP
scaling, and checkpoint loading.

A subclass describes its algorithm: which state buffers it keeps (in kernel slot order),
how to create them, how to launch its kernel on a bucket, and which reference function
the plain-PyTorch path runs.
"""

import torch

from . import tuning
from ._tables import BucketTables

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _real(t):
    return torch.view_as_real(t) if t.is_complex() else t


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


class FusedOptimizer(torch.optim.Optimizer):
    """Base class: subclasses set `kernel_name`, `state_keys(group)`, `_init_state`,
    `_launch` and `_reference`."""

    _step_supports_amp_scaling = True  # GradScaler hands us grad_scale / found_inf
    kernel_name = None

    def __init__(self, params, defaults):
        super().__init__(params, defaults)
        self._bucket_tables = {}

    # -- what a subclass provides -------------------------------------------------------
    def state_keys(self, group):
        """Names of the state buffers, in the kernel's slot order."""
        raise NotImplementedError

    def _init_state(self, param, state, group):
        raise NotImplementedError

    def _launch(self, group, tables, dtypes, config, lr, grad_scale, found_inf):
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
        for gi, (group, params) in enumerate(work):
            if params:
                self._step_group(gi, group, params, grad_scale, found_inf)
        return loss

    def _step_group(self, gi, group, params, grad_scale, found_inf):
        keys = self.state_keys(group)
        buckets = {}
        for p in params:
            state = self.state[p]
            if len(state) == 0:
                self._init_state(p, state, group)
            states = [state.get(k) for k in keys]
            ref = next((s for s in states if s is not None), p)
            key = (p.device, _real(p).dtype, _real(p.grad).dtype, _real(ref).dtype)
            buckets.setdefault(key, []).append(_Entry(p, p.grad, states, state["step"]))
        for key, entries in buckets.items():
            device, p_dtype, g_dtype, s_dtype = key
            if self._uses_kernel(device, (p_dtype, g_dtype, s_dtype)):
                self._kernel_bucket(gi, group, key, entries, grad_scale, found_inf)
            else:
                self._reference_bucket(group, entries, grad_scale, found_inf)
            for e in entries:
                e.finish()

    @staticmethod
    def _uses_kernel(device, dtypes):
        if any(d not in KERNEL_DTYPES for d in dtypes):
            return False  # float64 params take the PyTorch path (the kernels compute in fp32)
        if device.type == "cuda":
            return True
        return device.type == "cpu" and tuning.interpreter_on()

    def _kernel_bucket(self, gi, group, key, entries, grad_scale, found_inf):
        from .kernels import increment_steps

        device = key[0]
        rows = []
        for e in entries:
            slots = [0 if s is None else s.data_ptr() for s in e.states]
            slots += [0] * (4 - len(slots))
            rows.append((e.param.numel(), e.step.data_ptr(), e.param.data_ptr(), e.grad.data_ptr(), *slots))
        dtypes = tuple(_tl_dtype(d) for d in key[1:])
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            lr = lr if lr.device == device else float(lr)
        numels = [r[0] for r in rows]
        tune_key = (self.kernel_name, str(device), key[1:], self._flags(group), tuning.size_class(numels))
        config = tuning.config_for(
            tune_key, lambda c: self._bench_scratch(group, key, numels, len(entries[0].states), c, lr)
        )
        tables = self._bucket_tables.setdefault((gi, key), BucketTables()).update(rows, device, config["CHUNK"])
        increment_steps(tables.table, len(rows), found_inf)
        if tables.n_chunks:
            self._launch(group, tables, dtypes, config, lr, grad_scale, found_inf)

    def _flags(self, group):
        """Group options that select a kernel variant (part of the tuning key)."""
        return ()

    def _bench_scratch(self, group, key, numels, n_states, config, lr):
        """Milliseconds of one launch with config on random scratch tensors shaped like the bucket."""
        device, p_dtype, g_dtype, s_dtype = key
        sizes = tuning.scratch_numels(numels)
        keep = []

        def rand(n, dtype):
            t = torch.rand(n, device=device, dtype=torch.float32).add_(0.5).to(dtype)
            keep.append(t)
            return t.data_ptr()

        step = torch.ones((), device=device)
        rows = [
            (n, step.data_ptr(), rand(n, p_dtype), rand(n, g_dtype),
             *[rand(n, s_dtype) for _ in range(n_states)], *[0] * (4 - n_states))
            for n in sizes
        ]
        tables = BucketTables().update(rows, device, config["CHUNK"])
        dtypes = tuple(_tl_dtype(d) for d in key[1:])
        import triton.testing

        return triton.testing.do_bench(
            lambda: self._launch(group, tables, dtypes, config, lr, None, None), warmup=5, rep=20
        )

    def _reference_bucket(self, group, entries, grad_scale, found_inf):
        if found_inf is not None and float(found_inf) != 0:
            return
        params = [e.param for e in entries]
        compute = torch.float64 if params[0].dtype == torch.float64 else torch.float32
        lists = [params, [e.grad for e in entries]]
        lists += [[e.states[k] for e in entries] for k in range(len(entries[0].states))]
        lists = [None if all(t is None for t in lst) else lst for lst in lists]
        self._reference(group, lists, [e.step for e in entries], grad_scale, compute)

    # -- checkpoints ----------------------------------------------------------------------
    def load_state_dict(self, state_dict):
        """torch's loader, then every `step` as a float32 tensor on its param's device
        (the kernels read it there)."""
        super().load_state_dict(state_dict)
        for p, state in self.state.items():
            step = state.get("step")
            if step is not None:
                state["step"] = torch.as_tensor(step, dtype=torch.float32).to(p.device).clone()
        self._bucket_tables.clear()
