"""Two processes over gloo on the CPU: FSDP2 (fully_shard), DDP and ZeroRedundancyOptimizer
train the same small model with adam_triton and with torch.optim, and the full params must
agree. Rendezvous through a file in a temp dir; every run has a deadline."""

import json
import os

import pytest
import torch
import torch.distributed as dist

from _util import run_spawned
from conftest import DEVICE

WORLD = 2
DEADLINE_S = 240
pytestmark = pytest.mark.skipif(
    DEVICE != "cpu" or not dist.is_available(), reason="gloo on CPU tensors (the CI set-up)"
)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(5, 17), torch.nn.Tanh(), torch.nn.Linear(17, 9), torch.nn.Tanh(), torch.nn.Linear(9, 3)
    )


def _train(models_and_opts, rank, steps, clip=None):
    """Identical data to both (model, optimizer) pairs; torch's side clips with
    clip_grad_norm_ when clip is set (ours clips inside step). Returns torch's norms."""
    gen = torch.Generator().manual_seed(100 + rank)
    norms = []
    for _ in range(steps):
        x = torch.randn(8, 5, generator=gen)
        for model, opt in models_and_opts:
            opt.zero_grad()
            model(x).pow(2).sum().backward()
        if clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(list(models_and_opts[1][0].parameters()), clip)
            norms.append(float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm))
        for _, opt in models_and_opts:
            opt.step()
    return norms


def _worker(rank, kind, rdv, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{rdv}", rank=rank, world_size=WORLD)
    import adam_triton

    result = {}
    if kind in ("fsdp2", "fsdp2_clip"):
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import DTensor

        ours, theirs = _model(), _model()
        for m in (ours, theirs):
            for layer in m:
                if isinstance(layer, torch.nn.Linear):
                    fully_shard(layer)
            fully_shard(m)
        clip = 0.5 if kind == "fsdp2_clip" else None
        oo = adam_triton.AdamW(ours.parameters(), lr=1e-2, max_grad_norm=clip)
        ot = torch.optim.AdamW(theirs.parameters(), lr=1e-2, foreach=False)
        norms = _train([(ours, oo), (theirs, ot)], rank, steps=5, clip=clip)
        full = [(a.full_tensor(), b.full_tensor()) for a, b in zip(ours.parameters(), theirs.parameters())]
        p0 = next(ours.parameters())
        result["state_is_dtensor"] = all(isinstance(v, DTensor) for k, v in oo.state[p0].items() if k != "step")
        result["state_placements_match"] = all(
            v.placements == p0.placements for k, v in oo.state[p0].items() if k != "step"
        )
        if clip is not None:
            result["our_norm"] = float(oo.last_grad_norm.full_tensor() if isinstance(oo.last_grad_norm, DTensor) else oo.last_grad_norm)
            result["torch_norm"] = norms[-1]
    else:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ours, theirs = DDP(_model()), DDP(_model())
        if kind == "zero":
            from torch.distributed.optim import ZeroRedundancyOptimizer

            oo = ZeroRedundancyOptimizer(ours.parameters(), optimizer_class=adam_triton.Adam, lr=1e-2, amsgrad=True)
            ot = ZeroRedundancyOptimizer(
                theirs.parameters(), optimizer_class=torch.optim.Adam, lr=1e-2, amsgrad=True, foreach=False
            )
        else:
            oo = adam_triton.Adam(ours.parameters(), lr=1e-2)
            ot = torch.optim.Adam(theirs.parameters(), lr=1e-2, foreach=False)
        _train([(ours, oo), (theirs, ot)], rank, steps=5)
        full = list(zip(ours.parameters(), theirs.parameters()))
    result["max_diff"] = max((a.detach() - b.detach()).abs().max().item() for a, b in full)
    result["moved"] = max((a.detach() - b0).abs().max().item() for (a, _), b0 in zip(full, _model().parameters()))
    with open(os.path.join(out_dir, f"{kind}-{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    # gloo's threads can abort the interpreter at exit: leave without that teardown
    os._exit(0)


def _run(kind, tmp_path):
    return run_spawned(_worker, kind, tmp_path, WORLD, DEADLINE_S)


@pytest.mark.parametrize("kind", ["fsdp2", "fsdp2_clip"])
def test_fsdp2_matches_torch(kind, tmp_path):
    for r in _run(kind, tmp_path):
        assert r["moved"] > 1e-3  # training really changed the params
        assert r["max_diff"] <= 1e-6
        assert r["state_is_dtensor"] and r["state_placements_match"]
        if kind == "fsdp2_clip":
            assert r["our_norm"] == pytest.approx(r["torch_norm"], rel=1e-5)
            assert r["torch_norm"] > 0.5  # the clip was active


@pytest.mark.parametrize("kind", ["ddp", "zero"])
def test_ddp_and_zero_match_torch(kind, tmp_path):
    results = _run(kind, tmp_path)
    for r in results:
        assert r["moved"] > 1e-3
        assert r["max_diff"] <= 1e-6
