"""The launch plan of a step, cached from one step to the next.

A plan sorts every param that has a grad into buckets: one per (device, param / grad /
state dtype, master copy, DTensor sharding, code-shaping flags such as amsgrad), across
param groups — each tensor's group picks its row of the hyperparameter table — plus one
bucket per group and dtype for params that take the plain-PyTorch path. It holds each
kernel bucket's device tables and launch config.

`Plan.build` validates everything (flags, params, grads, existing state), creates lazy
state, and uploads the tables. `Plan.refresh` runs on every later step: one cheap pass over
the params checks that nothing which shapes a launch has changed (param groups, flags,
params' storage, state buffers); grads that were reallocated (`zero_grad()`'s default) are
checked and only their pointers re-uploaded, and hyperparameters a scheduler changed are
re-uploaded in the hyperparameter table. Anything else asks for a rebuild.
"""

import operator
from itertools import chain, compress, repeat

import torch

from . import tuning
from ._state import MASTER_KEY, init_state, master_slot, wants_master
from ._tables import GRAD, HyperTable, TensorTable, chunk_table
from ._tensors import is_dtensor, local, real, sharding, tl_dtype
from ._validate import check_flags, check_param, check_state

_is = operator.is_
is_not = operator.is_not
_grad_of = operator.attrgetter("grad")
_data_ptr = torch.Tensor.data_ptr
_RELEASED = object()  # in Plan.grads: a grad the plan no longer holds (see release_grads)
_kgrad_of = operator.attrgetter("kgrad")
_gptr_of = operator.attrgetter("gptr")
_Tensor = torch.Tensor


class Entry:
    """One param with a grad, as its launch sees it: its kernel views (real, local,
    contiguous; staged copies where the original is not) and where they came from."""

    __slots__ = ("gi", "pi", "param", "grad", "state", "step", "slots", "master", "kparam", "kgrad", "kslots",
                 "kmaster", "staged", "grad_buf", "source", "bucket", "grad_kind", "local_ptrs", "gptr", "direct")

    def __init__(self, gi, pi, param, grad, state, slots, master, step):
        self.gi, self.pi, self.param, self.state, self.step = gi, pi, param, state, step
        self.slots, self.master = slots, master  # the algorithm's state tensors (or None), the master copy
        self.bucket = None
        self.staged = []  # (original, contiguous copy): copied in before, and back after, each step
        self.kparam = self._view(param)
        self.kslots = [None if s is None else self._view(s) for s in slots]
        self.kmaster = None if master is None else self._view(master)
        # the storage the param's pointer came from, held so its address cannot be reused
        self.source = local(param).detach()
        self.grad_buf = None
        self.set_grad(grad)
        self.local_ptrs = _local_ptrs(self) if self.special else None

    def _view(self, t):
        r = real(t)
        if r.is_contiguous():
            return r
        copy = torch.empty_like(r, memory_format=torch.contiguous_format)
        self.staged.append((r, copy))
        return copy

    def set_grad(self, grad):
        """Take a (new) grad: the kernels read it directly, or a staged copy of it."""
        self.grad = grad
        r = real(grad)
        if r.is_contiguous():
            self.kgrad, self.grad_buf = r, None
        else:
            if self.grad_buf is None or self.grad_buf.shape != r.shape or self.grad_buf.dtype != r.dtype:
                self.grad_buf = torch.empty_like(r, memory_format=torch.contiguous_format)
            self.kgrad = self.grad_buf
        self.gptr = self.kgrad.data_ptr()  # the address the kernel reads
        # what a new grad must share with this one to take its place: type, dtype, device,
        # shape, contiguity (read as cheap attributes: device objects cost microseconds)
        self.grad_kind = (type(grad), grad.dtype, grad.get_device(), grad.shape, grad.is_contiguous())
        # the kernel reads the grad itself (a plain, real, contiguous tensor): a new grad of the
        # same kind is swapped in by Plan._take_grads without any of the above
        self.direct = self.kgrad is grad

    def replace_grad(self, grad):
        """set_grad for a grad of the current one's kind (grad_kind) on an entry that reads a
        staged copy or a local shard (a direct grad is swapped in by Plan._take_grads)."""
        if grad.layout is not torch.strided:
            raise RuntimeError("a sparse grad")  # (Plan._take_grads reports torch's error)
        self.set_grad(grad)
        if self.local_ptrs is not None:  # the grad's entry only: a moved param must still show
            self.local_ptrs[1] = real(grad).data_ptr()

    def stage_in(self):
        for original, copy in self.staged:
            copy.copy_(original)
        if self.grad_buf is not None:
            self.grad_buf.copy_(real(self.grad))

    def stage_out(self):
        for original, copy in self.staged:
            original.copy_(copy)

    @property
    def special(self):
        """Needs more than the fast pointer checks every step (DTensor, staged copies)."""
        return is_dtensor(self.param) or bool(self.staged) or self.grad_buf is not None


class Bucket:
    """Tensors that share one launch (kernel) or one call of the reference (PyTorch path)."""

    __slots__ = ("kernel", "device", "dtypes", "slot_keys", "master", "stochastic", "flags", "sharding",
                 "entries", "group", "tables", "chunks", "n_chunks", "config", "steps_done")

    def __init__(self, kernel, device, dtypes, slot_keys, master, stochastic, flags, sharding, group):
        self.kernel, self.device, self.dtypes, self.slot_keys = kernel, device, dtypes, slot_keys
        self.master, self.stochastic, self.flags, self.sharding = master, stochastic, flags, sharding
        self.group = group  # the param group (PyTorch path buckets hold one group)
        self.entries = []
        self.tables = self.chunks = self.config = None
        self.n_chunks = 0
        self.steps_done = False

    @property
    def tl_dtypes(self):
        """Triton dtypes of the param, the grad and the first state buffer."""
        return tuple(tl_dtype(d) for d in self.dtypes)

    def fields(self):
        """The tensor table's fields, one list per field (kernels/_common.py's order)."""
        rows = [
            (e.kparam.numel(), e.step.data_ptr(), e.gi, e.kparam.data_ptr(), e.kgrad.data_ptr(),
             0 if e.kmaster is None else e.kmaster.data_ptr(), *[0 if s is None else s.data_ptr() for s in e.kslots])
            for e in self.entries
        ]
        return [list(col) for col in zip(*rows)]

    def upload_grads(self):
        self.tables.set_field(GRAD, list(map(_gptr_of, self.entries)))


class Plan:
    """See the module docstring."""

    def __init__(self):
        self.buckets = []
        self.hyper = {}  # device -> HyperTable (kernel buckets of that device share it)

    # -- build ------------------------------------------------------------------------------
    @classmethod
    def build(cls, opt):
        """Validate every group, param, grad and existing state, then create lazy state and
        the buckets with their tables. Raises before anything changes."""
        plan = cls()
        groups = opt.param_groups
        name = type(opt).__name__
        work = []
        for gi, group in enumerate(groups):
            check_flags(name, group)
            for pi, p in enumerate(group["params"]):
                if p.grad is not None:
                    check_param(opt, gi, pi, p, p.grad)
                    work.append((gi, pi, p))
        for gi, pi, p in work:  # existing state, before any new state is created
            st = opt.state.get(p)
            if st:
                master = master_slot(opt, p) if MASTER_KEY in st else None  # (else created below)
                check_state(opt, gi, pi, p, st, [*opt._slots(groups[gi], p), master], True)
        buckets = {}
        for gi, pi, p in work:
            group, st = groups[gi], opt.state[p]
            if len(st) == 0:
                init_state(opt, p, st, group)
            elif wants_master(opt, p) and MASTER_KEY not in st:
                st[MASTER_KEY] = p.detach().to(torch.float32, copy=True)
            slots = opt._slots(group, p)
            *tensors, master, step = check_state(opt, gi, pi, p, st, [*slots, master_slot(opt, p)], True)
            e = Entry(gi, pi, p, p.grad, st, tensors, master, step)
            slot_dtypes = tuple(None if t is None else t.dtype for t in e.kslots)
            dtypes = (e.kparam.dtype, e.kgrad.dtype, next((d for d in slot_dtypes if d is not None), e.kparam.dtype))
            device = e.kparam.device
            kernel = opt._uses_kernel(group, device, (*dtypes[:2], *filter(None, slot_dtypes)))
            flags = opt._flags(group)
            slot_keys = tuple(None if s is None else s.key for s in slots)
            key = (kernel, device, dtypes, slot_keys, slot_dtypes, master is not None, sharding(p), flags,
                   None if kernel else gi)
            b = buckets.get(key)
            if b is None:
                stochastic = opt.stochastic_rounding and dtypes[0] == torch.bfloat16 and master is None
                b = buckets[key] = Bucket(kernel, device, dtypes, slot_keys, master is not None, stochastic, flags,
                                          sharding(p), None if kernel else group)
            b.entries.append(e)
            e.bucket = b
        plan.buckets = list(buckets.values())
        for b in plan.buckets:
            if b.kernel:
                plan.hyper.setdefault(b.device, HyperTable(b.device))
        plan.update_hyper(opt)
        for b in plan.buckets:
            if b.kernel:
                plan._upload(opt, b)
        plan._snapshot(opt)
        return plan

    def _upload(self, opt, b):
        numels = [e.kparam.numel() for e in b.entries]
        tune_key = (opt.kernel_name, str(b.device), (*b.dtypes, b.master), b.slot_keys, b.flags,
                    tuning.size_class(numels))
        b.config = tuning.config_for(tune_key, lambda config: opt._bench_scratch(b, self.hyper[b.device], config))
        b.tables = TensorTable(b.fields(), b.device)
        b.chunks, b.n_chunks = chunk_table(numels, opt._chunk_elements(b, b.config), b.device)

    def _snapshot(self, opt):
        """What refresh compares against: the groups, every param and its grad, the state
        dicts and their values, the storage of every param and grad."""
        groups = opt.param_groups
        self.group_lists = [(g["params"], len(g["params"])) for g in groups]
        self.flags = [_group_flags(opt, g) for g in groups]
        self.flat = [p for g in groups for p in g["params"]]
        self.grads = list(map(_grad_of, self.flat))
        entries = [e for b in self.buckets for e in b.entries]
        by_param = {id(e.param): e for e in entries}
        self.flat_entries = [by_param.get(id(p)) for p in self.flat]  # None: no grad at the build
        self.grad_less = None in self.flat_entries  # some param has no grad (and no entry)
        self.entry_kinds = [e.grad_kind for e in self.flat_entries] if not self.grad_less else None
        self.released = False
        self.state = opt.state
        self.state_keys = list(opt.state.keys())
        self.state_dicts = list(opt.state.values())
        self.values = list(chain.from_iterable(map(dict.values, self.state_dicts)))
        self.plain = [e for e in entries if not e.special]
        self.special = [e for e in entries if e.special]
        self.plain_params = [e.param for e in self.plain]
        self.plain_ptrs = list(map(_data_ptr, self.plain_params))
        self._grad_snapshot()

    def _grad_snapshot(self):
        self.kgrads = list(map(_kgrad_of, self.plain))
        self.grad_ptrs = list(map(_gptr_of, self.plain))

    # -- every step ---------------------------------------------------------------------------
    def refresh(self, opt):
        """True when the plan still holds (reallocated grads and changed hyperparameters are
        taken in); False when it must be rebuilt."""
        groups = opt.param_groups
        if len(groups) != len(self.group_lists):
            return False
        for g, (params, n), flags in zip(groups, self.group_lists, self.flags):
            if g["params"] is not params or len(params) != n or flags != _group_flags(opt, g):
                return False
        flat = [p for g in groups for p in g["params"]]
        if not all(map(_is, flat, self.flat)):
            return False
        grads = list(map(_grad_of, flat))
        if self.released or not all(map(_is, grads, self.grads)):
            if not self._take_grads(opt, grads):  # (reads the new grads' storage)
                return False
        elif list(map(_data_ptr, self.kgrads)) != self.grad_ptrs:  # the same grads, their storage
            return False
        # storage of params, state dicts and their values
        if list(map(_data_ptr, self.plain_params)) != self.plain_ptrs:
            return False
        state = opt.state  # (read by iteration: a lookup by param hashes in Python)
        if state is not self.state or len(state) != len(self.state_keys):
            return False
        if not (all(map(_is, state.keys(), self.state_keys)) and all(map(_is, state.values(), self.state_dicts))):
            return False
        values = list(chain.from_iterable(map(dict.values, self.state_dicts)))
        if len(values) != len(self.values) or not all(map(_is, values, self.values)):
            return False
        for e in self.special:
            if not _still_holds(e):
                return False
        self.update_hyper(opt)
        return True

    def _take_grads(self, opt, grads):
        """New grad objects for some params (all of them after `zero_grad()`): each must be of
        its predecessor's kind (else torch's error for a bad grad, or a rebuild for a good one
        of another kind); their buckets' grad pointers are re-uploaded. False (rebuild) when a
        grad appeared or vanished."""
        if self.released and len(grads) == len(self.entry_kinds) and not self.grad_less:
            entries, new, kinds = self.flat_entries, grads, self.entry_kinds  # every grad is new
        else:
            changed = list(compress(range(len(grads)), map(is_not, grads, self.grads)))
            new = [grads[i] for i in changed]
            entries = [self.flat_entries[i] for i in changed]
            if None in entries:
                return False  # a grad appeared on a param that had none
            kinds = [e.grad_kind for e in entries]
        if not all(map(is_not, new, repeat(None))):
            return False  # a grad vanished
        # A few attribute reads a grad (each one a call into torch): type, dtype, device,
        # shape, contiguity. A sparse grad fails the contiguity or raises; it is then
        # checked as on a build, which raises torch's error.
        try:
            fits = all([type(g) is k[0] and g.dtype is k[1] and g.get_device() == k[2] and g.shape == k[3]
                        and g.is_contiguous() == k[4] for g, k in zip(new, kinds)])
            if fits:
                ptrs = [g.data_ptr() if e.direct else 0 for e, g in zip(entries, new)]
        except RuntimeError:
            fits = False
        if not fits:
            for e, g in zip(entries, new):
                check_param(opt, e.gi, e.pi, e.param, g)  # raises torch's error for a bad grad
            return False  # good grads of another kind: rebuild
        dirty = {}
        for e, g, ptr in zip(entries, new, ptrs):
            if e.direct:
                e.grad = e.kgrad = g
                e.gptr = ptr
            else:
                if is_dtensor(g):
                    check_param(opt, e.gi, e.pi, e.param, g)  # its placement too
                e.replace_grad(g)
            dirty[id(e.bucket)] = e.bucket
        for b in dirty.values():
            if b.kernel:
                b.upload_grads()
        self.grads = grads
        self.released = False
        self._grad_snapshot()
        return True

    def release_grads(self):
        """Drop the plan's references to the grads (`zero_grad()` with set_to_none): they are
        freed there, as with torch's optimizers, not inside the next step. That step takes
        every grad as new."""
        self.released = True
        self.grads = [None if g is None else _RELEASED for g in self.grads]
        self.kgrads = None
        for e in self.flat_entries:
            if e is not None:
                e.grad = None
                if e.direct:
                    e.kgrad = None

    def update_hyper(self, opt):
        """Re-upload a device's hyperparameter table when a group's values changed."""
        for device, table in self.hyper.items():
            table.update([opt._hyper_row(g, device) for g in opt.param_groups])

    def stage_in(self):
        for e in self.special:
            e.stage_in()

    def stage_out(self):
        for e in self.special:
            e.stage_out()


def _group_flags(opt, group):
    """What of a group decides its bucket and its kernel variant."""
    return (opt._flags(group), group.get("fused"), group.get("differentiable"), group.get("foreach"))


def _still_holds(e):
    """The slower per-step check of an entry that is a DTensor shard or staged: the local
    storage of its param, grad and states is where it was when the plan read it (FSDP2 may
    move a shard's local tensor under the same DTensor)."""
    return e.local_ptrs == _local_ptrs(e)


def _local_ptrs(e):
    """Where the local storage of e's param, grad, states and master is now (in that order)."""
    return [None if t is None else real(t).data_ptr() for t in (e.param, e.grad, *e.slots, e.master)]
