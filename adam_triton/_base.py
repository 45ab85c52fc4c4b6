"""FusedOptimizer: what every fused optimizer shares — its options, the data path of a step,
and the torch.optim.Optimizer methods that must know about the cached launch plan.

A step, top to bottom:
    plan   the cached launch plan still holds (a cheap check), else it is rebuilt
           (validation, lazy state, tables: adam_triton/_plan.py)
    clip   optional global grad norm over every group (adam_triton/_clip.py)
    update one launch per kernel bucket — every group of one (device, dtype, flags) — after
           one step-increment launch (or the norm pass, which increments steps too); buckets
           the kernels do not take run the reference in PyTorch (adam_triton/_torch_path.py)

A subclass describes its algorithm: its state buffers (in kernel slot order), which group
options shape the kernel, its hyperparameter row, how to launch its kernel on a bucket, and
which reference function the PyTorch path runs.
"""

import torch

from . import tuning
from ._clip import clip_coefficients
from ._plan import Plan
from ._state import Slot, restore_loaded, state_bytes_per_param, state_dtype_for
from ._tables import TensorTable, chunk_table
from ._tensors import KERNEL_DTYPES
from ._torch_path import run_bucket
from ._validate import check_flags

# options of every FusedOptimizer, kept by deepcopy / pickle (torch's __getstate__ keeps
# only defaults, state and param_groups), with the values older pickles get
OPTIONS = dict(max_grad_norm=None, state_dtype=None, master_weights=False, stochastic_rounding=False,
               seed=0, last_grad_norm=None)


class FusedOptimizer(torch.optim.Optimizer):
    """Base class: subclasses set `kernel_name` and provide `state_keys`, `_flags`,
    `_hyper_columns`, `_launch` and `_reference`.

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
        check_flags(type(self).__name__, defaults)
        _outside_dynamo()
        self._plan = None
        super().__init__(params, defaults)
        self.max_grad_norm = max_grad_norm
        self.state_dtype = state_dtype
        self.master_weights = bool(master_weights)
        self.stochastic_rounding = bool(stochastic_rounding)
        self.seed = int(seed)
        self.last_grad_norm = None  # 0-d tensor: total grad norm before clipping, last step

    # -- what a subclass provides -------------------------------------------------------
    def state_keys(self, group):
        """Names of the state buffers in the kernel's slot order (None: slot unused)."""
        raise NotImplementedError

    def _flags(self, group):
        """Group options that select a kernel variant (part of the bucket and tuning keys)."""
        return ()

    def _hyper_columns(self, group):
        """The group's hyperparameter columns after lr's (floats; see the kernel's layout)."""
        raise NotImplementedError

    def _launch(self, bucket, tables, hyper, grad_scale=None, found_inf=None, clip_coef=None):
        """Launch the update kernel for a bucket (one launch for all its groups)."""
        raise NotImplementedError

    def _reference(self, group, tensor_lists, steps, grad_scale, compute_dtype):
        raise NotImplementedError

    def _sparse_message(self):
        return f"{type(self).__name__} does not support sparse gradients"

    torch_class = None  # the torch.optim class with this optimizer's math

    def _raise_torch_error(self, group, param, grad):
        """Raise what torch.optim's single-tensor step raises for param (an integer param, say),
        by running it on copies: the same exception and message, and nothing of ours changed."""
        import inspect

        names = set(inspect.signature(self.torch_class.__init__).parameters)
        names -= {"self", "params", "foreach", "fused", "capturable", "differentiable"}
        hyper = {k: (float(v) if isinstance(v, torch.Tensor) and k == "lr" else v)
                 for k, v in group.items() if k in names}
        q = param.detach().clone()
        q.grad = grad.detach().clone()
        self.torch_class([q], foreach=False, **hyper).step()  # raises torch's error
        raise RuntimeError(f"{type(self).__name__} does not take params of dtype {param.dtype}")

    # -- step -----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step over every param group; returns closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._step_eager()
        return loss

    _step_eager = None  # _step, never traced by Dynamo (set by _outside_dynamo)

    def _step(self):
        # the launch plan: cached, refreshed, or rebuilt (validation happens before any change)
        plan = self._plan
        if plan is None or not plan.refresh(self):
            self._plan = None
            plan = self._plan = Plan.build(self)
        buckets = plan.buckets
        if not buckets:
            return
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        plan.stage_in()
        clip = None
        if self.max_grad_norm is not None:
            clip = clip_coefficients(self, buckets, grad_scale, found_inf)
        for b in buckets:
            if b.kernel:
                self._kernel_bucket(b, plan.hyper[b.device], grad_scale, found_inf, clip)
            else:
                run_bucket(self, b, grad_scale, found_inf, clip)
        plan.stage_out()

    def _kernel_bucket(self, bucket, hyper, grad_scale, found_inf, clip):
        t = bucket.tables
        if not bucket.steps_done:
            _kernels().increment_steps(t.table, t.n_rows, found_inf)
        bucket.steps_done = False
        if bucket.n_chunks:
            clip_coef = None if clip is None else clip[bucket.device]
            self._launch(bucket, t, hyper.table, grad_scale, found_inf, clip_coef)

    # -- the kernel path's choices ----------------------------------------------------------
    def _slots(self, group, param):
        """The state buffers the kernel reads for param, in its slot order (None: unused):
        state_keys(group), in the optimizer's state dtype, shaped like the param. (The fp32
        master copy is every optimizer's, in a table field of its own.)"""
        dtype = state_dtype_for(self, param)
        keys = list(self.state_keys(group))
        keys += [None] * (3 - len(keys))  # three lists for the reference: (m, v, vmax), (v, buf, ga)
        return [None if key is None else Slot(key, dtype) for key in keys]

    @staticmethod
    def _uses_kernel(group, device, dtypes):
        """dtypes: the param's, the grad's and each state buffer's."""
        if group.get("fused") is False:
            return False  # fused=False asks for the unfused (PyTorch) path
        if any(d not in KERNEL_DTYPES and d != torch.uint8 for d in dtypes):
            return False  # float64 params take the PyTorch path (the kernels compute in fp32)
        if device.type == "cuda":
            return True
        return device.type == "cpu" and tuning.interpreter_on()

    def _hyper_row(self, group, device):
        """A group's row of the hyperparameter table on device: lr (a float, or the address
        of a 0-d lr tensor on that device, read by the kernel) and the algorithm's columns."""
        lr = group["lr"]
        lr_columns = [float(lr), 0, 0] if not isinstance(lr, torch.Tensor) else _lr_tensor_columns(lr, device)
        return lr_columns + self._hyper_columns(group)

    def _chunk_elements(self, bucket, config):
        """Elements per program of a launch of bucket with config (the chunk table's chunk)."""
        return config["CHUNK"]

    def _bench_scratch(self, bucket, hyper, config):
        """Milliseconds of one launch with config on random scratch tensors shaped like the
        bucket (never the user's tensors: tuning cannot apply an update twice)."""
        device, (p_dtype, g_dtype, _) = bucket.device, bucket.dtypes
        keep = []

        def rand(n, dtype):
            t = torch.rand(n, device=device, dtype=torch.float32).add_(0.5).to(dtype)
            keep.append(t)
            return t.data_ptr()

        step = torch.ones((), device=device)
        first = bucket.entries[0]
        rows = [
            (n, step.data_ptr(), first.gi, rand(n, p_dtype), rand(n, g_dtype),
             0 if first.kmaster is None else rand(n, torch.float32),
             *[0 if s is None else rand(n, s.dtype) for s in first.kslots])
            for n in tuning.scratch_numels([e.kparam.numel() for e in bucket.entries])
        ]
        scratch = TensorTable([list(c) for c in zip(*rows)], device)
        chunks, n_chunks = chunk_table([r[0] for r in rows], self._chunk_elements(bucket, config), device)
        saved = bucket.config, bucket.chunks, bucket.n_chunks
        bucket.config, bucket.chunks, bucket.n_chunks = config, chunks, n_chunks
        try:
            import triton.testing

            return triton.testing.do_bench(lambda: self._launch(bucket, scratch, hyper.table), warmup=5, rep=20)
        finally:
            bucket.config, bucket.chunks, bucket.n_chunks = saved

    # -- torch.optim.Optimizer methods that know the plan --------------------------------------
    def zero_grad(self, set_to_none=True):
        """torch's zero_grad; with set_to_none the launch plan lets go of the grads too, so they
        are freed here (as with torch's optimizers) rather than inside the next step."""
        super().zero_grad(set_to_none)
        if set_to_none and self._plan is not None:
            self._plan.release_grads()

    def add_param_group(self, param_group):
        """torch's add_param_group, with this optimizer's flag checks in the new group too."""
        check_flags(type(self).__name__, {**self.defaults, **param_group})
        super().add_param_group(param_group)
        self._plan = None

    def load_state_dict(self, state_dict):
        """torch's loader, then steps and buffers in this optimizer's dtypes and devices
        (see _state.restore_loaded); the launch plan is rebuilt on the next step."""
        super().load_state_dict(state_dict)
        restore_loaded(self, state_dict)
        self._plan = None

    def state_bytes_per_param(self):
        """Bytes of optimizer state (buffers, masters and steps) per param element held."""
        return state_bytes_per_param(self)

    def __getstate__(self):
        state = super().__getstate__()
        state.update({name: getattr(self, name) for name in OPTIONS})
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        for name, value in OPTIONS.items():
            self.__dict__.setdefault(name, value)
        self._plan = None


def _kernels():
    """adam_triton.kernels (imported on first use: it imports triton, which must not happen on
    `import adam_triton`)."""
    global _KERNELS
    if _KERNELS is None:
        from . import kernels

        _KERNELS = kernels
    return _KERNELS


_KERNELS = None


def _outside_dynamo():
    """Under torch.compile the step runs eagerly, behind a graph break: Dynamo cannot trace
    launches that read pointer tables. torch.compiler.disable imports torch._dynamo (and
    with it triton), so it is applied when the first optimizer is built, not on import:
    `import adam_triton` leaves triton unimported, so a command can still switch the
    interpreter on."""
    if FusedOptimizer._step_eager is None:
        FusedOptimizer._step_eager = torch.compiler.disable(FusedOptimizer._step)


def _lr_tensor_columns(lr, device):
    """[lr, fp32 address, fp64 address] for an lr tensor: read by the kernel where it lives on
    the bucket's device in fp32 or fp64, else read here (a CPU tensor costs no sync)."""
    if lr.device == device and lr.dtype == torch.float32:
        return [0.0, lr.data_ptr(), 0]
    if lr.device == device and lr.dtype == torch.float64:
        return [0.0, 0, lr.data_ptr()]
    return [float(lr), 0, 0]

