"""Real training steps, real attacks: the properties the paper's protocol depends on."""

import copy
import re

import pytest
import torch
import torch.nn.functional as F

from harness import registry, spec as spec_mod
from harness.evaluate import AttackContractError, check_adversary, evaluate
from harness.plugin import DefensePlugin, adversary_mode, to_unit
from harness.runner import load_data, seed_everything
from harness.spectral import normalized_layers
from harness.train import NonFiniteLoss, train


@pytest.fixture
def digits_setup(tiny_spec):
    spec = spec_mod.validate(tiny_spec)
    data = load_data(spec)
    seed_everything(0)
    model = registry.load("model", "lenet")(spectral_norm=True).build(data.num_classes, data.input_shape)
    return spec, data, model


def test_training_lowers_the_loss(digits_setup):
    spec, data, model = digits_setup
    cfg = dict(spec["training"], epochs=5, batch_size=16)
    history = train(model, registry.load("defense", "none")(eps=0.0), data, cfg, torch.device("cpu"), seed=0)
    losses = [h["train_objective"] for h in history]
    assert len(losses) == 5
    assert losses[-1] < 0.75 * losses[0], losses  # a step that does nothing stays at ln(10) = 2.30
    metrics = evaluate(model, data, [], 128, torch.device("cpu"))
    assert metrics["clean_acc"] > 50.0  # 10 classes: chance is 10%


def test_pgd_adversary_leaves_the_model_untouched(digits_setup):
    """While the adversary is computed: no .grad, no power-iteration step, modes and flags restored."""
    _, data, model = digits_setup
    defense = registry.load("defense", "pgd-at")(eps=to_unit(32), steps=5, step_size=8.0)
    x, y = data.train.images[:32].float(), data.train.labels[:32]
    model.train()
    u_before = [m.parametrizations.weight[0]._u.clone() for _, m in normalized_layers(model)]
    x_adv = defense.adversary(model, x, y)
    assert all(p.grad is None for p in model.parameters()), "the attack filled parameter gradients"
    assert all(p.requires_grad for p in model.parameters())
    assert model.training
    u_after = [m.parametrizations.weight[0]._u for _, m in normalized_layers(model)]
    assert all(torch.equal(a, b) for a, b in zip(u_before, u_after)), "power iteration advanced during the attack"
    # a real adversary: inside the ball and the domain, and worse for the model than the clean batch
    check_adversary("pgd-at", x, x_adv, to_unit(32))
    assert (x_adv - x).abs().max() > to_unit(16)
    with torch.no_grad(), adversary_mode(model):
        assert F.cross_entropy(model(x_adv), y) > F.cross_entropy(model(x), y)


def test_adversarial_accuracy_counts_misclassified_as_wrong(digits_setup):
    _, data, model = digits_setup  # untrained: most samples misclassified
    attack = registry.load("attack", "foolbox-pgd")(eps=to_unit(32), steps=3, step_size=16.0)
    entry = {"label": "pgd", "name": "foolbox-pgd", "eps": 32}
    metrics = evaluate(model, data, [(entry, attack)], 64, torch.device("cpu"))
    assert metrics["pgd_acc"] <= metrics["clean_acc"]
    zero = registry.load("attack", "foolbox-pgd")(eps=0.0, steps=1, step_size=1.0)
    at_zero = evaluate(model, data, [(entry, zero)], 64, torch.device("cpu"))
    assert at_zero["pgd_acc"] == pytest.approx(at_zero["clean_acc"]), "an attack at eps 0 must not change accuracy"
    assert metrics["ge"] == pytest.approx(metrics["test_loss"] - metrics["train_loss"])


def test_check_adversary_rejects_contract_breaches():
    x = torch.full((2, 1, 4, 4), 0.5)
    eps = to_unit(8)
    check_adversary("ok", x, x + eps, eps)
    for bad, what in [(x + 2 * eps, "outside its eps-ball"), (x * 3, "outside [0, 1]"),
                      (x * float("nan"), "non-finite"), (x[:1], "expected a tensor of shape")]:
        with pytest.raises(AttackContractError, match=re.escape(what)):
            check_adversary("evil", x, bad, eps)


def test_non_finite_loss_names_epoch_and_step(digits_setup):
    spec, data, model = digits_setup

    class Exploding(DefensePlugin):
        def loss(self, model, x, y):
            return F.cross_entropy(model(x), y) * float("inf")

    with pytest.raises(NonFiniteLoss, match="at epoch 1, step 1"):
        train(model, Exploding(eps=0.0), data, dict(spec["training"]), torch.device("cpu"), seed=0)


def test_same_seed_same_result(digits_setup, tiny_spec):
    spec, data, _ = digits_setup
    params = []
    for _ in range(2):
        seed_everything(0)
        model = registry.load("model", "lenet")(spectral_norm=True).build(data.num_classes, data.input_shape)
        train(model, registry.load("defense", "pgd-at")(eps=to_unit(16), steps=2, step_size=8.0), data,
              dict(spec["training"], max_batches=2), torch.device("cpu"), seed=0)
        params.append(copy.deepcopy(model.state_dict()))
    assert all(torch.equal(params[0][k], params[1][k]) for k in params[0])
