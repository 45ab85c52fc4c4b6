"""Checks only a GPU can make (skipped elsewhere; run with ADAM_TRITON_TEST_DEVICE=cuda):
CUDA-graph capture of step(), no host sync inside step(), and a tensor of more than 2^31
elements."""

import pytest
import torch

import adam_triton
from adam_triton import reference
from conftest import DEVICE

pytestmark = pytest.mark.skipif(
    DEVICE != "cuda" or not torch.cuda.is_available(), reason="needs ADAM_TRITON_TEST_DEVICE=cuda and a GPU"
)


def _params(seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    shapes = [(1000, 37), (4097,), (), (3, 5, 7), (65537,)]
    return [torch.randn(s, device="cuda", generator=g).requires_grad_() for s in shapes]


def _grads(params, step):
    g = torch.Generator(device="cuda").manual_seed(1000 + step)
    return [torch.randn(p.shape, device="cuda", generator=g) for p in params]


@pytest.mark.parametrize("cls,kw", [
    (adam_triton.Adam, dict(amsgrad=True, weight_decay=0.01)),
    (adam_triton.AdamW, dict(max_grad_norm=1.0)),
    (adam_triton.RMSprop, dict(centered=True, momentum=0.9, max_grad_norm=0.5)),
])
def test_cuda_graph_replay_matches_eager(cls, kw):
    eager, graphed = _params(), _params()
    lr_e = torch.tensor(1e-3, device="cuda")
    lr_g = torch.tensor(1e-3, device="cuda")
    opt_e = cls(eager, lr=lr_e, capturable=True, **kw)
    opt_g = cls(graphed, lr=lr_g, capturable=True, **kw)
    for p in graphed:
        p.grad = torch.zeros_like(p)
    # warm up on a side stream (state creation, tables, tuning), then capture one step
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for p, g in zip(graphed, _grads(graphed, 0)):
            p.grad.copy_(g)
        opt_g.step()
    torch.cuda.current_stream().wait_stream(s)
    for p, g in zip(eager, _grads(eager, 0)):
        p.grad = g
    opt_e.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt_g.step()
    for step in range(1, 8):
        lr = 1e-3 * (0.8 ** step)  # a schedule changes lr in place: the graph reads it
        lr_e.fill_(lr)
        lr_g.fill_(lr)
        grads = _grads(eager, step)
        for p, g in zip(eager, grads):
            p.grad = g.clone()
        for p, g in zip(graphed, grads):
            p.grad.copy_(g)
        opt_e.step()
        graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(eager, graphed):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
        for k, v in opt_e.state[a].items():
            torch.testing.assert_close(opt_g.state[b][k], v, rtol=0, atol=0)


def test_changing_tables_during_capture_raises():
    """A float lr changed right before capture would need a host-to-device copy inside the
    graph: step() refuses with a clear error instead of capturing a copy of host memory."""
    params = _params()
    opt = adam_triton.AdamW(params, lr=1e-3, capturable=True)
    for p in params:
        p.grad = torch.zeros_like(p)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        opt.step()
    torch.cuda.current_stream().wait_stream(s)
    opt.param_groups[0]["lr"] = 5e-4
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="CUDA graph"):
        with torch.cuda.graph(graph):
            opt.step()


def test_no_host_sync_in_step():
    params = _params()
    opt = adam_triton.AdamW(params, lr=torch.tensor(1e-3, device="cuda"), max_grad_norm=1.0)
    for p, g in zip(params, _grads(params, 0)):
        p.grad = g
    opt.step()  # first step: state, tables and tuning (which times kernels)
    before = [p.detach().clone() for p in params]
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(not torch.equal(a, b) for a, b in zip(before, params) if a.numel())


def test_tensor_larger_than_2_pow_31():
    n = (1 << 31) + 4099
    free, _ = torch.cuda.mem_get_info()
    if free < 5 * n * 2 + (4 << 30):
        pytest.skip("needs ~26 GB of free GPU memory")
    p = torch.empty(n, device="cuda", dtype=torch.bfloat16).normal_().requires_grad_()
    p.grad = torch.empty_like(p).normal_()
    edges = [slice(0, 4096), slice(n - 8192, n)]  # Adam is elementwise: check both ends
    before = [p.detach()[e].double() for e in edges]
    ref_p = [x.clone() for x in before]
    ref_g = [p.grad[e].double() for e in edges]
    opt = adam_triton.Adam([p], lr=0.1)
    opt.step()
    ms = [torch.zeros_like(x) for x in ref_p]
    vs = [torch.zeros_like(x) for x in ref_p]
    steps = [torch.zeros((), dtype=torch.float64) for _ in ref_p]
    reference.adam_step(ref_p, ref_g, ms, vs, None, steps, lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8)
    for e, old, want in zip(edges, before, ref_p):
        got = p.detach()[e].double()
        # the first Adam step moves every element by ~lr
        assert (got - old).abs().mean().item() == pytest.approx(0.1, rel=0.1)
        ulp = torch.exp2(torch.floor(torch.log2(want.abs().clamp_min(1e-30))) - 7)
        assert ((got - want).abs() <= ulp).all()
