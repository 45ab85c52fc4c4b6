"""Demo: the same seeded MLP trained on the same synthetic regression data twice, once with
adam_triton.Adam and once with torch.optim.Adam. `adam-triton demo` prints the two loss
curves side by side; as a drop-in replacement ours should track torch's to fp32 rounding.
"""

import copy

import torch

D_IN, HIDDEN, N_SAMPLES, BATCH = 16, 64, 1024, 128


def make_data(device, seed=0):
    """Inputs x ~ N(0, 1) and targets y = sin(x w1) w2 + 0.01 noise, fixed by seed."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N_SAMPLES, D_IN, generator=gen)
    w1 = torch.randn(D_IN, 8, generator=gen) / D_IN**0.5
    w2 = torch.randn(8, 1, generator=gen)
    y = torch.sin(x @ w1) @ w2 + 0.01 * torch.randn(N_SAMPLES, 1, generator=gen)
    return x.to(device), y.to(device)


def make_model(device, seed=0):
    """A D_IN -> HIDDEN -> HIDDEN -> 1 tanh MLP, initialised from seed."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(D_IN, HIDDEN), torch.nn.Tanh(),
        torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.Tanh(),
        torch.nn.Linear(HIDDEN, 1),
    ).to(device)


def train(model, optimizer, x, y, steps):
    """steps minibatch MSE steps over x, y in a fixed order; returns each step's loss."""
    losses = []
    for step in range(steps):
        first = (step * BATCH) % N_SAMPLES
        xb, yb = x[first:first + BATCH], y[first:first + BATCH]
        loss = torch.nn.functional.mse_loss(model(xb), yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def train_pair(steps=50, lr=1e-2, device="cpu", seed=0):
    """Train one initial model with adam_triton.Adam and a copy with torch.optim.Adam.

    Returns dict(ours=losses, torch=losses, max_param_diff=max |p_ours - p_torch| at the
    end, shape=a description of the model)."""
    from . import Adam

    x, y = make_data(device, seed)
    ours = make_model(device, seed)
    theirs = copy.deepcopy(ours)
    ours_losses = train(ours, Adam(ours.parameters(), lr=lr), x, y, steps)
    torch_losses = train(theirs, torch.optim.Adam(theirs.parameters(), lr=lr), x, y, steps)
    max_diff = max(
        (a.detach() - b.detach()).abs().max().item() for a, b in zip(ours.parameters(), theirs.parameters())
    )
    return dict(ours=ours_losses, torch=torch_losses, max_param_diff=max_diff,
                shape=f"{D_IN}-{HIDDEN}-{HIDDEN}-1")


if __name__ == "__main__":
    import sys

    from .cli import main

    sys.exit(main(["demo", *sys.argv[1:]]))
