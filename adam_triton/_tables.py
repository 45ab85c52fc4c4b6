"""Host side of the multi-tensor launch: tensor tables and chunk tables, cached per bucket.

A bucket is every tensor of one param group that shares (device, param dtype, grad dtype,
state dtype). Its tensor table holds one int64 row per tensor (see kernels/_common.py for
the columns); its chunk table maps each kernel program to (tensor, first element). Both are
cached and rebuilt only when a data pointer or a size changes: grads are often reallocated
every step; params and states move on load_state_dict, .to() or resharding. Caches are keyed
on data_ptr()s, never on id().
"""

import torch

ROW = 8  # columns of a table row: numel, step, param, grad, state0..state3


class BucketTables:
    """The device-side tables of one bucket, rebuilt only when their contents change."""

    __slots__ = ("rows", "table", "numels", "chunk", "chunks", "n_chunks", "aligned")

    def __init__(self):
        self.rows = None
        self.numels = None
        self.chunk = None

    def update(self, rows, device, chunk):
        """rows: list of ROW-int tuples. Returns self with table/chunks current."""
        if rows != self.rows:
            self.table = torch.tensor(rows, dtype=torch.int64).to(device, non_blocking=True)
            # 16-byte alignment of every data pointer allows 128-bit unmasked accesses
            self.aligned = all(ptr % 16 == 0 for row in rows for ptr in row[2:])
            self.rows = rows
        numels = [row[0] for row in rows]
        if numels != self.numels or chunk != self.chunk:
            self.chunks, self.n_chunks = chunk_table(numels, chunk, device)
            self.numels, self.chunk = numels, chunk
        return self


def chunk_table(numels, chunk, device):
    """int64 [n_chunks, 2] table of (tensor index, first element) covering every element."""
    numels_t = torch.tensor(numels, dtype=torch.int64)
    counts = (numels_t + chunk - 1) // chunk
    n_chunks = int(counts.sum())
    tensor_index = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int64), counts)
    first_chunk = torch.cumsum(counts, 0) - counts
    starts = (torch.arange(n_chunks, dtype=torch.int64) - first_chunk[tensor_index]) * chunk
    table = torch.stack([tensor_index, starts], dim=1).contiguous()
    return table.to(device, non_blocking=True), n_chunks
