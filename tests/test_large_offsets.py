"""Element offsets are 64-bit: the update kernel addresses element K + i of a tensor whose
pointers were shifted back by K = 2**31 + 4096 elements, so only int64 offset arithmetic
lands on the real n elements (no 2**31-element tensor is allocated)."""

import math

import pytest
import torch

from adam_triton import reference, tuning
from adam_triton._tables import HyperTable, TensorTable, chunk_table
from adam_triton.kernels import WD_DECOUPLED, WD_L2, WD_NONE, adam_hyper_row, adam_update

K = 2**31 + 4096  # past the int32 range; a multiple of the chunk (chunk starts stay aligned)


def _tl(dtype):
    import triton.language as tl

    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("amsgrad,wd_mode", [(False, WD_NONE), (True, WD_L2), (False, WD_DECOUPLED)])
def test_offsets_past_int32(device, aligned, amsgrad, wd_mode):
    config = dict(tuning.INTERPRETER_CONFIG if tuning.interpreter_on() else tuning.DEFAULT_CONFIG)
    chunk = config["CHUNK"]
    k_shift = K if K % chunk == 0 else 2**31 + chunk
    n = chunk + 1000  # one full chunk and a masked tail
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(n, generator=gen)
    g = torch.randn(n, generator=gen)
    m0 = torch.randn(n, generator=gen) * 0.1
    v0 = torch.rand(n, generator=gen) * 0.01
    vmax0 = v0 + torch.rand(n, generator=gen) * 0.01 * (torch.rand(n, generator=gen) < 0.5)
    # guard elements around each buffer catch a stray write on either side
    pad = 64
    bufs = {name: torch.full((n + 2 * pad,), 7.0, device=device)
            for name in ("param", "grad", "m", "v", "vmax")}
    for name, src in (("param", p0), ("grad", g), ("m", m0), ("v", v0), ("vmax", vmax0)):
        bufs[name][pad:pad + n] = src.to(device)
    views = {name: b[pad:pad + n] for name, b in bufs.items()}
    if aligned:
        assert all(v.data_ptr() % 16 == 0 for v in views.values())
    step = torch.tensor(3.0, device=device)  # already incremented: this is step 3
    shift = k_shift * 4  # bytes of k_shift fp32 elements

    def shifted(t):
        return t.data_ptr() - shift

    # fields: numel, step, group, param, grad, master (none), exp_avg, exp_avg_sq, max_exp_avg_sq
    row = [k_shift + n, step.data_ptr(), 0, shifted(views["param"]), shifted(views["grad"]), 0,
           shifted(views["m"]), shifted(views["v"]), shifted(views["vmax"]) if amsgrad else 0]
    table = TensorTable([[v] for v in row], device)
    chunks, n_chunks = chunk_table([n], chunk, device)
    chunks[:, 1] += k_shift  # every chunk starts past 2**31
    assert n_chunks == math.ceil(n / chunk) == 2
    assert int(chunks[:, 1].min()) > 2**31
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1 if wd_mode else 0.0)
    hyper_table = HyperTable(device)
    hyper_table.update([[hyper["lr"], 0, 0, *adam_hyper_row(0.9, 0.999, 1e-8, hyper["weight_decay"])]])
    adam_update(
        table.table, table.n_rows, chunks, n_chunks, hyper_table.table, amsgrad=amsgrad, maximize=False,
        wd_mode=wd_mode,
        param_dtype=_tl(torch.float32), grad_dtype=_tl(torch.float32), state_dtype=_tl(torch.float32),
        aligned=aligned, config=config,
    )
    # float64 reference of the same step (the reference increments its own step 2 -> 3)
    rp, rm, rv, rvmax = (t.double().clone() for t in (p0, m0, v0, vmax0))
    reference.adam_step(
        [rp], [g.double()], [rm], [rv], [rvmax], [torch.tensor(2.0, dtype=torch.float64)],
        lr=hyper["lr"], beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=hyper["weight_decay"],
        amsgrad=amsgrad, decoupled_weight_decay=wd_mode == WD_DECOUPLED,
    )
    tol = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(views["param"].cpu().double(), rp, **tol)
    torch.testing.assert_close(views["m"].cpu().double(), rm, **tol)
    torch.testing.assert_close(views["v"].cpu().double(), rv, **tol)
    if amsgrad:
        torch.testing.assert_close(views["vmax"].cpu().double(), rvmax, **tol)
    else:
        assert torch.equal(views["vmax"].cpu(), vmax0)
    assert torch.equal(views["grad"].cpu(), g)  # grads are read, never written
    assert not torch.equal(views["param"].cpu(), p0)
    for name, b in bufs.items():
        assert torch.equal(b[:pad].cpu(), torch.full((pad,), 7.0)), f"{name}: write before the tensor"
        assert torch.equal(b[pad + n:].cpu(), torch.full((pad,), 7.0)), f"{name}: write after the tensor"
    assert float(step) == 3.0  # the update kernel does not touch the step
