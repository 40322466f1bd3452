"""Defenses trades and fgsm-rs: their adversaries, their losses, and real training steps."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from harness import registry
from harness.evaluate import check_adversary
from harness.plugin import DataSplits, Split, adversary_mode, to_unit
from harness.runner import seed_everything
from harness.train import train


class BinaryLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        f = (x.flatten(1) - 0.5) @ self.w
        return torch.stack([-f / 2, f / 2], 1)


@pytest.fixture
def batch():
    model = BinaryLinear()
    x = 0.3 + 0.4 * torch.rand((32, 1, 4, 4), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


def test_fgsm_rs_takes_one_step_of_1_25_eps_from_a_random_start(batch):
    """Every coordinate of start + 1.25 eps * sign(g), with |start| <= eps, has the sign of the gradient and at
    least 0.25 eps of size; the projection keeps it in the ball (Wong et al. 2020, Algorithm 3)."""
    model, x, y = batch
    eps = to_unit(8)
    defense = registry.load("defense", "fgsm-rs")(eps=eps)
    torch.manual_seed(0)
    x_adv = defense.adversary(model, x, y)
    check_adversary("fgsm-rs", x, x_adv, eps)
    toward = torch.where(y == 1, -1.0, 1.0)[:, None] * torch.sign(model.w.detach())[None]  # sign of the CE gradient
    delta = (x_adv - x).flatten(1) * toward
    assert (delta >= 0.25 * eps - 1e-6).all()
    assert not torch.allclose(delta, torch.full_like(delta, eps)), "no random start: every coordinate at eps"
    torch.manual_seed(1)
    assert not torch.equal(defense.adversary(model, x, y), x_adv), "the start must be random"
    assert all(p.grad is None for p in model.parameters())


def test_trades_adversary_raises_the_kl_and_the_loss_adds_beta_kl(batch):
    model, x, y = batch
    eps = to_unit(16)
    defense = registry.load("defense", "trades")(eps=eps, beta=6.0, steps=10, step_size=4.0)
    torch.manual_seed(0)
    x_adv = defense.adversary(model, x)
    check_adversary("trades", x, x_adv, eps)
    with torch.no_grad():
        p = F.softmax(model(x), 1)
        kl_adv = F.kl_div(F.log_softmax(model(x_adv), 1), p, reduction="batchmean")
        start = (x + 0.001 * torch.randn_like(x)).clamp(0, 1)
        kl_start = F.kl_div(F.log_softmax(model(start), 1), p, reduction="batchmean")
    assert kl_adv > 100 * kl_start
    torch.manual_seed(0)
    loss = defense.loss(model, x, y)
    ce = F.cross_entropy(model(x), y)
    assert float(loss.detach()) == pytest.approx(float((ce + 6.0 * kl_adv).detach()), rel=1e-4)
    loss.backward()
    assert model.w.grad is not None and model.w.grad.abs().sum() > 0  # gradient through both terms
    no_beta = registry.load("defense", "trades")(eps=eps, beta=0.0)
    assert float(no_beta.loss(model, x, y).detach()) == pytest.approx(float(ce.detach()))


@pytest.mark.parametrize("name,options", [("trades", {"beta": 1.0, "steps": 3, "step_size": 8.0}),
                                          ("fgsm-rs", {})])
def test_training_with_the_defense_lowers_its_objective(name, options):
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images[:256], dtype=torch.float32).div(16).unsqueeze(1)
    y = torch.tensor(bunch.target[:256])
    data = DataSplits(train=Split(x, y), test=Split(x[:64], y[:64]), num_classes=10, input_shape=(1, 8, 8))
    seed_everything(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))  # a small, fast learner
    defense = registry.load("defense", name)(eps=to_unit(16), **options)
    cfg = {"epochs": 5, "batch_size": 32, "lr": 0.1, "momentum": 0.9, "weight_decay": 0, "nesterov": False,
           "schedule": {"type": "constant"}, "max_batches": None}
    history = train(model, defense, data, cfg, torch.device("cpu"), seed=0)
    assert history[-1]["train_objective"] < 0.8 * history[0]["train_objective"], history
    with torch.no_grad(), adversary_mode(model):
        assert (model(x).argmax(1) == y).float().mean() > 0.3  # chance: 0.1
