"""A torch.compile'd training step with opt.step() inside (issue 13, item 5): it runs, its
numbers equal the same step run eagerly (and torch.optim's within fp32 tolerance), and a
learning rate that changes every step, as a float from a scheduler or as a 0-d tensor,
does not recompile every step.

Compiles are counted by a counting backend: one call per graph compiled, recompiles
included. The backend, aot_eager, runs the captured graphs through AOTAutograd (so an
optimizer op in the graph must survive functionalization) but without Inductor, which
keeps these tests fast on the CPU; the forward/backward numbers are then the eager ones
exactly."""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from _util import FP32_TOL, assert_state_matches, make_model

import adam_triton

STEPS = 6
CASES = {
    "Adam": (adam_triton.Adam, torch.optim.Adam, dict(amsgrad=True, weight_decay=0.05)),
    "AdamW": (adam_triton.AdamW, torch.optim.AdamW, dict(weight_decay=0.1)),
    "RMSprop": (adam_triton.RMSprop, torch.optim.RMSprop, dict(momentum=0.9, centered=True)),
}


def _data(device):
    gen = torch.Generator().manual_seed(7)
    return [(torch.randn(8, 7, generator=gen).to(device), torch.randn(8, 5, generator=gen).to(device))
            for _ in range(STEPS)]


def _factor(s):
    return 0.7 ** s + 0.1 * (s % 3)


class _ManualSchedule:
    """What a training loop without a scheduler does: set the lr of every group by hand,
    assigning a float or filling the 0-d lr tensor in place."""

    def __init__(self, opt):
        self.opt, self.steps = opt, 0

    def step(self):
        self.steps += 1
        for group in self.opt.param_groups:
            if torch.is_tensor(group["lr"]):
                group["lr"].fill_(1e-2 * _factor(self.steps))
            else:
                group["lr"] = 1e-2 * _factor(self.steps)


def _setup(cls, device, lr_kind, schedule, kw, **extra):
    model = make_model(device)
    lr = torch.tensor(1e-2) if lr_kind == "tensor" else 1e-2
    opt = cls(model.parameters(), lr=lr, **kw, **extra)
    if schedule == "scheduler":  # LambdaLR: step() is then wrapped by the scheduler
        return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, _factor)
    return model, opt, _ManualSchedule(opt)


def _train_step(model, opt):
    def step(x, y):
        opt.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        opt.step()
        return loss
    return step


@pytest.mark.parametrize("lr_kind", ["float", "tensor"])
@pytest.mark.parametrize("name, schedule", [
    ("Adam", "scheduler"), ("AdamW", "scheduler"), ("RMSprop", "scheduler"),
    ("Adam", "manual"), ("RMSprop", "manual"),
])
def test_compiled_train_step_matches_eager(device, name, schedule, lr_kind):
    """The lr of every group changes every step, through an LR scheduler or set by hand."""
    ours_cls, torch_cls, kw = CASES[name]
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled_model, compiled_opt, compiled_sched = _setup(ours_cls, device, lr_kind, schedule, kw)
    compiled = torch.compile(_train_step(compiled_model, compiled_opt), backend=counter)
    eager_model, eager_opt, eager_sched = _setup(ours_cls, device, lr_kind, schedule, kw)
    eager = _train_step(eager_model, eager_opt)
    torch_model, torch_opt, torch_sched = _setup(torch_cls, device, lr_kind, schedule, kw, foreach=False)
    reference = _train_step(torch_model, torch_opt)

    frames = []
    lrs = []
    for s, (x, y) in enumerate(_data(device)):
        loss_c = compiled(x, y)
        loss_e = eager(x, y)
        reference(x, y)
        for sched in (compiled_sched, eager_sched, torch_sched):
            sched.step()
        frames.append(counter.frame_count)
        lrs.append(float(compiled_opt.param_groups[0]["lr"]))
        assert torch.equal(loss_c, loss_e), f"step {s}: loss"
        params_c, params_e = list(compiled_model.parameters()), list(eager_model.parameters())
        assert_state_matches(compiled_opt, eager_opt, params_c, params_e, exact=True)
        assert_state_matches(compiled_opt, torch_opt, params_c, list(torch_model.parameters()), FP32_TOL)
    assert len(set(lrs)) == STEPS, lrs  # the lr really changed every step
    assert frames[0] >= 1, "nothing was compiled"
    # compiling may settle in the first two steps (e.g. a float becoming dynamic); after
    # that, no step may compile anything again
    assert frames[-1] == frames[1], f"graphs compiled so far, step by step: {frames}"
