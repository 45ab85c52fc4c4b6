"""The device tables of one launch (their layouts are in kernels/_common.py).

* tensor table: int64 [n_fields, n_tensors], one row per field (numel, step, group, param,
  grad, state slots), so one field of every tensor (the grad pointers, after `zero_grad()`)
  is rewritten with one contiguous copy;
* chunk table: int64 [n_chunks, 2] of (tensor index, first element), one row per program;
* hyperparameter table: int64 [n_groups, n_hyper], a row per param group, floats as their
  float64 bit patterns and lr tensors as addresses.

Host copies are kept, so a field or a row is uploaded only when it changed. Uploads are
asynchronous copies from fresh host tensors (never a host sync).
"""

import numpy as np
import torch

# fields of the tensor table (kernels/_common.py: NUMEL, STEP, GROUP, PARAM, GRAD, MASTER_COPY, STATE0..)
NUMEL, STEP, GROUP, PARAM, GRAD, MASTER_COPY, STATE0 = 0, 1, 2, 3, 4, 5, 6
N_LR = 3  # hyperparameter columns every row starts with: lr, fp32 lr address, fp64 lr address


def _upload(host, device):
    """A device copy of a host tensor (an independent copy on the CPU too)."""
    if device.type == "cpu":
        return host.clone()
    _not_capturing(device)
    return host.to(device, non_blocking=True)


def _copy_in(dst, host):
    """dst <- host, asynchronously (no host sync)."""
    if dst.device.type != "cpu":
        _not_capturing(dst.device)
    dst.copy_(host, non_blocking=True)


def _not_capturing(device):
    """A table changes only in eager steps: a copy from host memory cannot be captured in a
    CUDA graph (and would replay stale host memory)."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "adam_triton: the optimizer's launch tables must change while a CUDA graph is being "
            "captured (new params, grads or state, or a float hyperparameter changed since the last "
            "eager step). Run one eager step() with the same tensors and values first; to change lr "
            "between replays, pass it as a tensor on the device and update it in place."
        )


def _aligned(values):
    """Every address in values (ints, or an int64 tensor) a multiple of 16."""
    if not isinstance(values, torch.Tensor):
        values = torch.tensor(values, dtype=torch.int64)
    return not bool((values & 15).any())


class TensorTable:
    """The tensor table of one bucket. `fields` holds one list of ints per field."""

    __slots__ = ("host", "table", "n_rows", "device", "_aligned")

    def __init__(self, fields, device):
        self.host = torch.tensor(fields, dtype=torch.int64)
        self.table = _upload(self.host, device)
        self.n_rows = len(fields[0])
        self.device = device
        # 16-byte alignment of every data pointer allows 128-bit unmasked accesses
        self._aligned = {f: _aligned(self.host[f]) for f in range(PARAM, len(fields))}

    @property
    def aligned(self):
        return all(self._aligned.values())

    def set_field(self, field, values):
        """Rewrite one field of every tensor (one host-to-device copy)."""
        row = torch.tensor(values, dtype=torch.int64)
        self.host[field] = row
        _copy_in(self.table[field], row)
        self._aligned[field] = _aligned(row)


def chunk_table(numels, chunk, device):
    """int64 [n_chunks, 2] table of (tensor index, first element) covering every element."""
    numels_t = torch.tensor(numels, dtype=torch.int64)
    counts = (numels_t + chunk - 1) // chunk
    n_chunks = int(counts.sum())
    tensor_index = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int64), counts)
    first_chunk = torch.cumsum(counts, 0) - counts
    starts = (torch.arange(n_chunks, dtype=torch.int64) - first_chunk[tensor_index]) * chunk
    table = torch.stack([tensor_index, starts], dim=1).contiguous()
    return _upload(table, device), n_chunks


class HyperTable:
    """The hyperparameter table of one device: row g is param group g's
    [lr, fp32 lr address, fp64 lr address, *the algorithm's float columns]."""

    __slots__ = ("rows", "table", "device")

    def __init__(self, device):
        self.rows = None
        self.table = None
        self.device = device

    def update(self, rows):
        """Upload rows (lists of floats, with ints in the address columns) unless they equal
        the rows already on the device."""
        if rows == self.rows:
            return
        packed = np.zeros((len(rows), len(rows[0])), dtype=np.int64)
        floats = packed.view(np.float64)
        for g, row in enumerate(rows):
            floats[g, 0] = row[0]
            packed[g, 1:N_LR] = row[1:N_LR]
            floats[g, N_LR:] = row[N_LR:]
        host = torch.from_numpy(packed)
        if self.table is not None and self.table.shape == host.shape:
            _copy_in(self.table, host)  # in place: a captured CUDA graph sees it too
        else:
            self.table = _upload(host, self.device)
        self.rows = rows
