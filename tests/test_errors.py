"""Errors: invalid hyperparameters raise torch's ValueErrors word for word; sparse grads are
refused before anything changes; torch flags that cannot be honoured are refused, the ones
that can are accepted."""

import pytest
import torch
from _util import Lockstep, make_model, random_grads, set_grads, torch_adam

import adam_triton


def _param(device):
    return [torch.zeros(3, device=device, requires_grad=True)]


BAD_HYPER = {
    "lr_negative": dict(lr=-1),
    "lr_negative_float": dict(lr=-0.5),
    "lr_nan": dict(lr=float("nan")),
    "eps_nan": dict(eps=float("nan")),
    "eps_negative": dict(eps=-1),
    "beta0_is_1": dict(betas=(1.0, 0.999)),
    "beta1_negative": dict(betas=(0.9, -0.1)),
    "beta1_is_1": dict(betas=(0.9, 1.0)),
    "weight_decay_negative": dict(weight_decay=-1),
    "betas_mixed_float_tensor": dict(betas=(0.9, torch.tensor(0.999))),
    "betas_mixed_tensor_float": dict(betas=(torch.tensor(0.9), 0.999)),
    "betas_int": dict(betas=(0, 0.999)),
}


def _torch_message(cls, params, kw):
    with pytest.raises(ValueError) as exc:
        cls(params, **kw)
    return str(exc.value)


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
@pytest.mark.parametrize("case", list(BAD_HYPER))
def test_invalid_hyperparameters_match_torch(device, name, case):
    kw = BAD_HYPER[case]
    expected = _torch_message(getattr(torch.optim, name), _param(device), kw)
    with pytest.raises(ValueError) as exc:
        getattr(adam_triton, name)(_param(device), **kw)
    assert str(exc.value) == expected


def test_tensor_lr_with_two_elements(device):
    kw = dict(lr=torch.tensor([1e-3, 1e-3], device=device))
    expected = _torch_message(torch.optim.Adam, _param(device), kw)
    assert expected == "Tensor lr must be 1-element"
    with pytest.raises(ValueError) as exc:
        adam_triton.Adam(_param(device), **kw)
    assert str(exc.value) == expected


def test_error_messages_are_the_documented_ones(device):
    """The texts themselves (so a change in torch's wording shows up here too)."""
    cases = [
        (dict(lr=-1), "Invalid learning rate: -1"),
        (dict(eps=-1), "Invalid epsilon value: -1"),
        (dict(betas=(1.0, 0.999)), "Invalid beta parameter at index 0: 1.0"),
        (dict(betas=(0.9, -0.1)), "Invalid beta parameter at index 1: -0.1"),
        (dict(weight_decay=-1), "Invalid weight_decay value: -1"),
        (dict(betas=(0.9, torch.tensor(0.999))), "betas must be either both floats or both Tensors"),
    ]
    for kw, message in cases:
        with pytest.raises(ValueError) as exc:
            adam_triton.Adam(_param(device), **kw)
        assert str(exc.value) == message


def _two_group_setup(device, sparse_group):
    model = make_model(device)
    dense = list(model.parameters())
    emb = torch.nn.Parameter(torch.randn(10, 4, generator=torch.Generator().manual_seed(0)).to(device))
    other = torch.nn.Parameter(torch.randn(6, device=device))
    groups = [{"params": dense}, {"params": [other, emb], "lr": 3e-2}]
    if sparse_group == 0:
        groups = [{"params": [other, emb], "lr": 3e-2}, {"params": dense}]
    return dense, other, emb, groups


def _sparse_grad(device):
    idx = torch.tensor([[1, 3, 3]])
    vals = torch.randn(3, 4)
    return torch.sparse_coo_tensor(idx, vals, (10, 4), check_invariants=True).to(device)


@pytest.mark.parametrize("sparse_group", [0, 1])
@pytest.mark.parametrize("warm", [False, True])
def test_sparse_grad_refused_and_nothing_changes(device, sparse_group, warm):
    dense, other, emb, groups = _two_group_setup(device, sparse_group)
    opt = adam_triton.Adam(groups, lr=1e-2, amsgrad=True)
    all_params = dense + [other, emb]
    if warm:  # state exists already: it must not change either
        set_grads(all_params, random_grads(all_params, 0))
        opt.step()
    params_before = [p.detach().clone() for p in all_params]
    state_before = {i: {k: v.clone() for k, v in opt.state[p].items()}
                    for i, p in enumerate(all_params) if len(opt.state.get(p, {}))}
    set_grads(all_params, random_grads(all_params, 1))
    emb.grad = _sparse_grad(device)

    with pytest.raises(RuntimeError) as exc:
        opt.step()
    assert "sparse gradients" in str(exc.value)
    # torch's own text
    t_emb = torch.nn.Parameter(emb.detach().clone())
    t_emb.grad = _sparse_grad(device)
    with pytest.raises(RuntimeError) as texc:
        torch.optim.Adam([t_emb], foreach=False).step()
    assert str(exc.value) == str(texc.value)

    for i, p in enumerate(all_params):
        assert torch.equal(p, params_before[i]), f"param {i} changed"
        if i in state_before:
            assert set(opt.state[p]) == set(state_before[i])
            for k, v in state_before[i].items():
                assert torch.equal(opt.state[p][k], v), f"state {k} of param {i} changed"
        else:
            assert len(opt.state.get(p, {})) == 0, f"state created for param {i}"
    # the optimizer still works once the sparse grad is gone
    emb.grad = torch.randn(10, 4, device=device)
    opt.step()
    assert not torch.equal(dense[0], params_before[0])
    assert not torch.equal(emb, params_before[-1])


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_fused_false_takes_the_pytorch_path(device, name, monkeypatch):
    """fused=False asks for an unfused step: the group runs the plain-PyTorch reference (no
    kernel launch) and matches torch.optim."""
    import adam_triton._base as base

    def no_kernel(*args, **kwargs):
        raise AssertionError("a kernel ran for a fused=False group")

    monkeypatch.setattr(base.FusedOptimizer, "_kernel_bucket", no_kernel)
    kw = dict(lr=1e-2, weight_decay=0.1)
    params = list(make_model(device).parameters())
    torch_cls = torch.optim.Adam if name == "Adam" else torch.optim.AdamW
    run = Lockstep(
        params,
        lambda ps: getattr(adam_triton, name)(ps, fused=False, **kw),
        lambda ps: torch_cls(ps, foreach=False, **kw),
    )
    run.run(3)


def test_fused_and_foreach_true_refused_as_torch(device):
    with pytest.raises(RuntimeError, match="`fused` and `foreach` cannot be `True` together."):
        adam_triton.Adam(_param(device), fused=True, foreach=True)


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_differentiable_refused(device, name):
    with pytest.raises(RuntimeError, match="differentiable"):
        getattr(adam_triton, name)(_param(device), differentiable=True)


@pytest.mark.parametrize("foreach,fused", [(None, None), (True, None), (False, None), (None, True), (False, True)])
def test_foreach_and_fused_true_accepted_same_numbers(device, foreach, fused):
    kw = dict(lr=1e-2, amsgrad=True)
    params = list(make_model(device).parameters())
    run = Lockstep(
        params,
        lambda ps: adam_triton.Adam(ps, foreach=foreach, fused=fused, **kw),
        lambda ps: torch_adam(ps, **kw),
    )
    run.run(3)
    assert run.ours.param_groups[0]["foreach"] is foreach
