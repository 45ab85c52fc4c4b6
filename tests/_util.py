"""Shared helpers for the tests: a small model, twin parameter lists, deterministic gradients,
and a lockstep runner that steps adam_triton and torch.optim on identical inputs and compares
every parameter and every state tensor after each step."""

import torch
from torch import nn

# fp32 tolerance of the fused kernel against torch.optim's single-tensor implementation
FP32_TOL = dict(rtol=2e-5, atol=2e-6)


class SmallModel(nn.Module):
    """Linear + LayerNorm + Linear, plus a 0-d parameter (a learnable output scale)."""

    def __init__(self, n_in=7, hidden=13, n_out=5):
        super().__init__()
        self.fc1 = nn.Linear(n_in, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, n_out)
        self.scale = nn.Parameter(torch.tensor(0.75))

    def forward(self, x):
        return self.fc2(torch.tanh(self.norm(self.fc1(x)))) * self.scale


def make_model(device, dtype=torch.float32, seed=0):
    """A SmallModel with deterministic weights (drawn on the CPU, so every device agrees)."""
    torch.manual_seed(seed)
    return SmallModel().to(device=device, dtype=dtype)


def twin_models(device, dtype=torch.float32, seed=0):
    """Two identical SmallModels: one for adam_triton, one for torch.optim."""
    a = make_model(device, dtype, seed)
    b = make_model(device, dtype, seed)
    return a, b


def clone_params(params):
    """Leaf copies of params (same values, dtype, device, strides, requires_grad)."""
    out = []
    for p in params:
        q = torch.empty_strided(p.shape, p.stride(), dtype=p.dtype, device=p.device)
        q.copy_(p.detach())
        out.append(nn.Parameter(q, requires_grad=p.requires_grad))
    return out


def random_grads(params, step, seed=1234, scale=1.0, skip=()):
    """Deterministic gradients for step `step` (drawn on the CPU in float64, then cast to
    each param's dtype and moved to its device). Indices in `skip`, and params that do not
    require grad, get None."""
    gen = torch.Generator().manual_seed(seed * 1000 + step)
    grads = []
    for i, p in enumerate(params):
        shape = torch.view_as_real(p).shape if p.is_complex() else p.shape
        g = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
        if i in skip or not p.requires_grad:
            grads.append(None)
            continue
        if p.is_complex():
            g = torch.view_as_complex(g.contiguous())
        grads.append(g.to(device=p.device, dtype=p.dtype))
    return grads


def set_grads(params, grads):
    """p.grad = a private copy of g with g's strides (None stays None)."""
    for p, g in zip(params, grads):
        if g is None:
            p.grad = None
            continue
        q = torch.empty_strided(g.shape, g.stride(), dtype=g.dtype, device=g.device)
        p.grad = q.copy_(g)


def assert_state_matches(ours, theirs, params_ours, params_theirs, tol=FP32_TOL, exact=False):
    """Every param and every state tensor of `ours` equals `theirs`'s counterpart: same state
    key sets, same step, tensors close (or bit-identical with exact=True)."""
    for i, (pa, pb) in enumerate(zip(params_ours, params_theirs)):
        _compare(pa.detach(), pb.detach(), f"param {i}", tol, exact)
        sa, sb = ours.state.get(pa, {}), theirs.state.get(pb, {})
        assert set(sa) == set(sb), f"param {i}: state keys {sorted(sa)} != {sorted(sb)}"
        for key in sb:
            if key == "step":
                assert torch.is_tensor(sa["step"]) and sa["step"].dtype == torch.float32
                assert sa["step"].dim() == 0
                assert float(sa["step"]) == float(sb["step"]), f"param {i}: step {float(sa['step'])} != {float(sb['step'])}"
            else:
                _compare(sa[key], sb[key], f"param {i} state {key}", tol, exact)


def step_both(ours, theirs, params_ours, params_theirs, grads):
    """The same grads to both param lists, then one step of each optimizer."""
    set_grads(params_ours, grads)
    set_grads(params_theirs, grads)
    ours.step()
    theirs.step()


def continue_lockstep(ours, theirs, params_ours, params_theirs, steps, grads_from, tol=FP32_TOL, exact=False):
    """For each s in steps: step_both with random grads drawn for grads_from at step s, then
    assert_state_matches (for optimizers built elsewhere, e.g. from a loaded state_dict)."""
    for s in steps:
        step_both(ours, theirs, params_ours, params_theirs, random_grads(grads_from, s))
        assert_state_matches(ours, theirs, params_ours, params_theirs, tol, exact)


def _compare(a, b, what, tol, exact):
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} != {b.dtype}"
    assert a.shape == b.shape, f"{what}: shape {a.shape} != {b.shape}"
    b = b.to(a.device)
    if exact:
        assert torch.equal(a, b), f"{what}: not bit-identical (max diff {(a - b).abs().max()})"
    else:
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{what}: {m}")


class Lockstep:
    """adam_triton and torch.optim side by side on twin parameter lists.

    make_ours / make_torch take a list of params and return an optimizer; they must build
    the same param-group structure. step(grads) gives both optimizers identical grads, steps
    them, and (unless check=False) compares everything."""

    def __init__(self, params, make_ours, make_torch, tol=FP32_TOL):
        self.params_ours = clone_params(params)
        self.params_torch = clone_params(params)
        self.ours = make_ours(self.params_ours)
        self.torch = make_torch(self.params_torch)
        self.tol = tol
        self.steps = 0

    def step(self, grads=None, skip=(), check=True):
        if grads is None:
            grads = random_grads(self.params_ours, self.steps, skip=skip)
        step_both(self.ours, self.torch, self.params_ours, self.params_torch, grads)
        self.steps += 1
        if check:
            self.check()

    def check(self):
        assert_state_matches(self.ours, self.torch, self.params_ours, self.params_torch, self.tol)

    def run(self, n_steps, skip_at=None):
        """n_steps lockstep steps, comparing after each; skip_at maps step -> indices whose
        grad is None at that step."""
        skip_at = skip_at or {}
        for _ in range(n_steps):
            self.step(skip=skip_at.get(self.steps, ()))


def torch_adam(params, **kw):
    """torch.optim.Adam's single-tensor implementation (the reference we match)."""
    return torch.optim.Adam(params, foreach=False, **kw)


def torch_adamw(params, **kw):
    return torch.optim.AdamW(params, foreach=False, **kw)


def run_in_child(module, function, *args, timeout=300):
    """Run tests/<module>.py's `function(*args)` (string args) in a fresh Python process, so
    that a crash (segfault, abort) fails one test instead of the whole run. The child gets
    the test set-up of conftest (interpreter, device). Fails with the child's output when it
    exits non-zero or dies on a signal."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    tests_dir = Path(__file__).resolve().parent
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]); import conftest; "
        f"import {module} as m; m.{function}(*sys.argv[2:])"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tests_dir), *map(str, args)],
        cwd=tests_dir.parent, env=dict(os.environ), capture_output=True, text=True, timeout=timeout,
    )
    if proc.returncode != 0:
        how = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
        raise AssertionError(f"child {module}.{function}{tuple(args)}: {how}\n"
                             f"{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}")
    return proc.stdout


def run_spawned(worker, kind, tmp_path, world, deadline_s):
    """Run worker(rank, kind, rendezvous file, out dir) in `world` spawned processes (e.g. gloo
    ranks with a file rendezvous), within deadline_s seconds; each rank writes
    <kind>-<rank>.json into tmp_path, and the list of those results is returned."""
    import json
    import time

    import pytest
    import torch.multiprocessing as mp

    ctx = mp.start_processes(worker, args=(kind, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=world,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + deadline_s
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"{kind}: workers did not finish within {deadline_s} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [json.load(open(tmp_path / f"{kind}-{rank}.json")) for rank in range(world)]


def first_error(*actions):
    """Run actions in order; the first exception raised (None if none)."""
    for action in actions:
        try:
            action()
        except Exception as exc:  # noqa: BLE001 - any exception is the result under test
            return exc
    return None
