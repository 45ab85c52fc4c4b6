"""adam_triton.Adam / AdamW against torch.optim (foreach=False) in lockstep on a small model:
every flag combination, missing grads, frozen layers, param groups, schedulers, tensor lr,
closures, hooks and zero_grad."""

import itertools

import pytest
import torch
from _util import (
    FP32_TOL,
    Lockstep,
    assert_state_matches,
    clone_params,
    make_model,
    random_grads,
    set_grads,
    torch_adam,
    torch_adamw,
    twin_models,
)

import adam_triton

N_STEPS = 8

FLAGS = list(itertools.product([False, True], [False, True], [0.0, 0.1], [False, True]))


@pytest.mark.parametrize(
    "amsgrad,maximize,weight_decay,decoupled", FLAGS,
    ids=[f"ams{int(a)}-max{int(m)}-wd{w}-dec{int(d)}" for a, m, w, d in FLAGS],
)
def test_adam_all_flags(device, amsgrad, maximize, weight_decay, decoupled):
    kw = dict(lr=1e-2, betas=(0.8, 0.95), amsgrad=amsgrad, maximize=maximize,
              weight_decay=weight_decay, decoupled_weight_decay=decoupled)
    params = list(make_model(device).parameters())
    run = Lockstep(params, lambda ps: adam_triton.Adam(ps, **kw), lambda ps: torch_adam(ps, **kw))
    run.run(N_STEPS)
    # the optimizer really moved the params (the comparison is not between two no-ops)
    assert not torch.allclose(run.params_ours[0], params[0])
    expected_keys = {"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if amsgrad else set())
    assert set(run.ours.state[run.params_ours[0]]) == expected_keys


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adamw_class_default_weight_decay(device, amsgrad):
    params = list(make_model(device).parameters())
    run = Lockstep(
        params,
        lambda ps: adam_triton.AdamW(ps, lr=5e-2, amsgrad=amsgrad),
        lambda ps: torch_adamw(ps, lr=5e-2, amsgrad=amsgrad),
    )
    assert run.ours.defaults["weight_decay"] == 0.01
    assert run.ours.param_groups[0]["decoupled_weight_decay"] is True
    run.run(N_STEPS)


def test_adamw_differs_from_l2(device):
    """Decoupled and L2 weight decay give different params (so the flag reaches the kernel)."""
    params = list(make_model(device).parameters())
    a = clone_params(params)
    b = clone_params(params)
    oa = adam_triton.Adam(a, lr=1e-2, weight_decay=0.5)
    ob = adam_triton.AdamW(b, lr=1e-2, weight_decay=0.5)
    for s in range(3):
        grads = random_grads(params, s)
        set_grads(a, grads)
        set_grads(b, grads)
        oa.step()
        ob.step()
    assert (a[0] - b[0]).abs().max() > 1e-4


def test_missing_grads_and_frozen_layer(device):
    model = make_model(device)
    model.norm.requires_grad_(False)  # frozen LayerNorm: in the optimizer, never a grad
    params = list(model.parameters())
    frozen = [i for i, p in enumerate(params) if not p.requires_grad]
    assert len(frozen) == 2
    never = 0  # fc1.weight gets its first grad only at step 3
    skip_at = {0: {never, 5}, 1: {never}, 2: {never}, 4: {1, 5}, 5: {1}}
    kw = dict(lr=1e-2, amsgrad=True, weight_decay=0.1)
    run = Lockstep(params, lambda ps: adam_triton.Adam(ps, **kw), lambda ps: torch_adam(ps, **kw))
    for s in range(N_STEPS):
        before = [p.detach().clone() for p in run.params_ours]
        states_before = {
            i: {k: v.clone() for k, v in run.ours.state[p].items()}
            for i, p in enumerate(run.params_ours) if p in run.ours.state
        }
        skipped = skip_at.get(s, set())
        run.step(skip=skipped)
        for i in set(skipped) | set(frozen):
            p = run.params_ours[i]
            assert torch.equal(p, before[i]), f"param {i} changed without a grad at step {s}"
            if i in states_before:
                for k, v in states_before[i].items():
                    assert torch.equal(run.ours.state[p][k], v), f"state {k} of param {i} changed"
            else:
                assert p not in run.ours.state or len(run.ours.state[p]) == 0
        if s < 3:
            assert len(run.ours.state.get(run.params_ours[never], {})) == 0
    for i in frozen:
        assert len(run.ours.state.get(run.params_ours[i], {})) == 0
    # fc1.weight had 5 grads; param 1 (fc1.bias) had 6
    assert float(run.ours.state[run.params_ours[never]]["step"]) == N_STEPS - 3
    assert float(run.ours.state[run.params_ours[1]]["step"]) == N_STEPS - 2


def _two_groups(cls, torch_cls):
    def ours(ps):
        return cls([{"params": ps[:2]}, {"params": ps[2:], "lr": 3e-2, "betas": (0.5, 0.9)}],
                   lr=1e-2, weight_decay=0.05)

    def theirs(ps):
        return torch_cls([{"params": ps[:2]}, {"params": ps[2:], "lr": 3e-2, "betas": (0.5, 0.9)}],
                         lr=1e-2, weight_decay=0.05)

    return ours, theirs


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_two_param_groups(device, name):
    ours, theirs = _two_groups(getattr(adam_triton, name), torch_adam if name == "Adam" else torch_adamw)
    run = Lockstep(list(make_model(device).parameters()), ours, theirs)
    run.run(N_STEPS)


def test_two_groups_use_their_own_hyperparameters(device):
    """Same grads, same params: the group with the larger lr moves further."""
    base = torch.zeros(64, device=device)
    a, b = clone_params([base, base])
    opt = adam_triton.Adam([{"params": [a]}, {"params": [b], "lr": 1e-1}], lr=1e-2)
    g = torch.ones(64, device=device)
    a.grad, b.grad = g.clone(), g.clone()
    opt.step()
    # first Adam step moves each element by lr * g / (|g| + eps/...) ~ lr
    torch.testing.assert_close(a, torch.full_like(a, -1e-2), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(b, torch.full_like(b, -1e-1), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("sched", ["steplr", "onecycle"])
def test_lr_scheduler(device, sched):
    def attach(opt):
        if sched == "steplr":
            return torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=5e-2, total_steps=N_STEPS + 2)

    ours, theirs = _two_groups(adam_triton.Adam, torch_adam)
    run = Lockstep(list(make_model(device).parameters()), ours, theirs)
    s_ours, s_torch = attach(run.ours), attach(run.torch)
    lrs = set()
    for _ in range(N_STEPS):
        run.step()
        s_ours.step()
        s_torch.step()
        assert [g["lr"] for g in run.ours.param_groups] == [g["lr"] for g in run.torch.param_groups]
        lrs.add(run.ours.param_groups[0]["lr"])
    assert len(lrs) >= 3  # the scheduler really changed lr


def test_add_param_group_mid_run(device):
    params = list(make_model(device).parameters())
    extra = [torch.randn(5, 3, device=device).requires_grad_(), torch.randn(11, device=device).requires_grad_()]
    kw = dict(lr=1e-2, amsgrad=True)
    run = Lockstep(params, lambda ps: adam_triton.Adam(ps[:3], **kw), lambda ps: torch_adam(ps[:3], **kw))
    ours_extra = clone_params(extra)
    torch_extra = clone_params(extra)
    run.params_ours += ours_extra
    run.params_torch += torch_extra
    for s in range(N_STEPS):
        if s == 3:
            run.ours.add_param_group({"params": run.params_ours[3:], "lr": 2e-2, "betas": (0.7, 0.99)})
            run.torch.add_param_group({"params": run.params_torch[3:], "lr": 2e-2, "betas": (0.7, 0.99)})
        if s < 3:
            # params not yet in either optimizer get grads too: they must not move
            run.step(check=False)
            for i in range(3, len(params) + len(extra)):
                assert run.params_ours[i] not in run.ours.state
            pa = run.params_ours[:3] + run.params_ours[len(params):]
            pb = run.params_torch[:3] + run.params_torch[len(params):]
            assert_state_matches(run.ours, run.torch, pa, pb)
        else:
            run.step()
    assert len(run.ours.param_groups) == 2
    assert float(run.ours.state[ours_extra[0]]["step"]) == N_STEPS - 3


def test_tensor_lr_matches_float_lr(device):
    params = list(make_model(device).parameters())
    a = clone_params(params)
    b = clone_params(params)
    c = clone_params(params)
    lr_t = torch.tensor(1e-3, device=device)
    oa = adam_triton.Adam(a, lr=lr_t, weight_decay=0.1, decoupled_weight_decay=True)
    ob = adam_triton.Adam(b, lr=1e-3, weight_decay=0.1, decoupled_weight_decay=True)
    oc = torch_adam(c, lr=1e-3, weight_decay=0.1, decoupled_weight_decay=True)
    for s in range(N_STEPS):
        grads = random_grads(params, s)
        for ps, opt in ((a, oa), (b, ob), (c, oc)):
            set_grads(ps, grads)
            opt.step()
        # tensor lr is an fp32 value: the same numbers as float lr up to fp32 rounding
        assert_state_matches(oa, ob, a, b, tol=dict(rtol=1e-6, atol=1e-7))
        assert_state_matches(oa, oc, a, c)
    assert oa.param_groups[0]["lr"] is lr_t


def test_tensor_lr_changed_in_place_is_read_each_step(device):
    """The kernel reads a tensor lr on the device: updating it in place changes the step."""
    base = torch.zeros(32, device=device)
    (a,) = clone_params([base])
    lr_t = torch.tensor(1e-2, device=device)
    opt = adam_triton.Adam([a], lr=lr_t, betas=(0.0, 0.0), eps=1e-30)
    a.grad = torch.ones(32, device=device)
    opt.step()  # beta=0, eps~0: each element moves by exactly lr
    lr_t.fill_(0.25)
    opt.step()
    torch.testing.assert_close(a, torch.full_like(a, -0.26), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_zero_grads_on_fresh_state_are_noop(device, weight_decay):
    params = list(make_model(device).parameters())
    ours = clone_params(params)
    theirs = clone_params(params)
    oa = adam_triton.Adam(ours, lr=1e-2, weight_decay=weight_decay, decoupled_weight_decay=True)
    ob = torch_adam(theirs, lr=1e-2, weight_decay=weight_decay, decoupled_weight_decay=True)
    for ps in (ours, theirs):
        for p in ps:
            p.grad = torch.zeros_like(p)
    oa.step()
    ob.step()
    if weight_decay == 0:
        for p, q in zip(ours, params):
            assert torch.equal(p, q)
        for p in ours:
            assert float(oa.state[p]["step"]) == 1
            assert torch.equal(oa.state[p]["exp_avg"], torch.zeros_like(p))
            assert torch.equal(oa.state[p]["exp_avg_sq"], torch.zeros_like(p))
    else:
        # decoupled decay alone still shrinks params: p * (1 - lr wd)
        for p, q in zip(ours, params):
            torch.testing.assert_close(p, q * (1 - 1e-2 * 0.1), **FP32_TOL)
    assert_state_matches(oa, ob, ours, theirs)


def test_step_closure_returns_loss(device):
    a, b = twin_models(device)
    oa = adam_triton.Adam(a.parameters(), lr=1e-2, amsgrad=True)
    ob = torch_adam(b.parameters(), lr=1e-2, amsgrad=True)
    x = torch.randn(16, 7, generator=torch.Generator().manual_seed(7)).to(device)
    y = torch.randn(16, 5, generator=torch.Generator().manual_seed(8)).to(device)

    def closure_for(model, opt):
        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss
        return closure

    losses = []
    for _ in range(6):
        la = oa.step(closure_for(a, oa))
        lb = ob.step(closure_for(b, ob))
        assert torch.is_tensor(la) and la.dim() == 0
        torch.testing.assert_close(la.detach(), lb.detach(), **FP32_TOL)
        losses.append(float(la.detach()))
        assert_state_matches(oa, ob, list(a.parameters()), list(b.parameters()))
    assert losses[-1] < losses[0]  # training on a fixed batch reduces the loss
    assert oa.step() is None  # no closure: None, like torch


def test_step_hooks_fire(device):
    params = list(make_model(device).parameters())
    ours = clone_params(params)
    theirs = clone_params(params)
    oa = adam_triton.Adam(ours, lr=1e-2)
    ob = torch_adam(theirs, lr=1e-2)
    seen = []

    def pre(opt, args, kwargs):
        assert opt is oa
        seen.append(("pre", ours[0].detach().clone()))

    def post(opt, args, kwargs):
        assert opt is oa
        seen.append(("post", ours[0].detach().clone()))

    h_pre = oa.register_step_pre_hook(pre)
    h_post = oa.register_step_post_hook(post)
    for s in range(2):
        grads = random_grads(params, s)
        set_grads(ours, grads)
        set_grads(theirs, grads)
        p0 = ours[0].detach().clone()
        oa.step()
        ob.step()
        assert [k for k, _ in seen[-2:]] == ["pre", "post"]
        assert torch.equal(seen[-2][1], p0)  # pre hook saw the params before the update
        assert torch.equal(seen[-1][1], ours[0])  # post hook saw them after
        torch.testing.assert_close(seen[-1][1], theirs[0].detach(), **FP32_TOL)
    assert len(seen) == 4
    h_pre.remove()
    h_post.remove()
    set_grads(ours, random_grads(params, 2))
    oa.step()
    assert len(seen) == 4  # removed hooks no longer fire


def test_zero_grad(device):
    params = list(make_model(device).parameters())
    kw = dict(lr=1e-2)
    run = Lockstep(params, lambda ps: adam_triton.Adam(ps, **kw), lambda ps: torch_adam(ps, **kw))
    run.run(2)
    # set_to_none=False: zero grads, and the step still moves params through momentum
    run.ours.zero_grad(set_to_none=False)
    run.torch.zero_grad(set_to_none=False)
    for p in run.params_ours:
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p))
    before = [p.detach().clone() for p in run.params_ours]
    run.ours.step()
    run.torch.step()
    run.check()
    assert not torch.equal(before[0], run.params_ours[0])
    # default set_to_none=True: no grads, the step changes nothing at all
    run.ours.zero_grad()
    run.torch.zero_grad()
    assert all(p.grad is None for p in run.params_ours)
    before = [p.detach().clone() for p in run.params_ours]
    steps = [float(run.ours.state[p]["step"]) for p in run.params_ours]
    run.ours.step()
    run.torch.step()
    assert all(torch.equal(p, q) for p, q in zip(run.params_ours, before))
    assert steps == [float(run.ours.state[p]["step"]) for p in run.params_ours] == [3.0] * len(before)
    run.check()


def test_numpy_scalar_lr(device):
    """lr as a numpy.float32 (from a config, or a LambdaLR whose lambda returns numpy
    float32: NumPy 2 keeps float * np.float32 in float32). torch.optim accepts any real
    number as lr; so must we."""
    np = pytest.importorskip("numpy")
    params = list(make_model(device).parameters())
    kw = dict(lr=np.float32(1e-2))
    run = Lockstep(params, lambda ps: adam_triton.Adam(ps, **kw), lambda ps: torch_adam(ps, **kw))
    run.run(3)
