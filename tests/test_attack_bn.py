"""Batch norm while training adversaries are crafted (issue 11, section 4): the defenses' `attack_bn` option.

"eval" (default) crafts against the running statistics, "train" against the batch's own statistics; in both
modes crafting updates no running statistic, counts no batch and advances no spectral-norm power iteration, and
the model comes back in exactly the modes it had. Checked on a small spectrally normalized conv net with batch
norm, trained a few real steps on digits so that its running statistics differ from any batch's."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from harness import registry, spec as spec_mod
from harness.compat import import_advertorch
from harness.errors import BadInput
from harness.plugin import ADVERSARY_POLICY, adversary_mode, to_unit
from harness.spectral import apply_spectral_norm

EPS, STEPS, STEP = to_unit(32), 3, to_unit(12)


@pytest.fixture(scope="module")
def digits():
    data = registry.load("dataset", "digits")().load(None, False)
    x = data.train.images[:64].float() / 255.0 if data.train.images.dtype == torch.uint8 else data.train.images[:64]
    return x.float(), data.train.labels[:64]


@pytest.fixture
def model(digits):
    """Conv + BN + ReLU twice, then a linear layer, spectrally normalized, after 5 real SGD steps (train mode)."""
    torch.manual_seed(0)
    net = apply_spectral_norm(nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 10)))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x, y = digits
    net.train()
    for i in range(5):
        opt.zero_grad()
        F.cross_entropy(net(x[i * 8:(i + 1) * 8] * 0.5 + 0.25), y[i * 8:(i + 1) * 8]).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return net


def state(net):
    return {k: v.clone() for k, v in net.state_dict().items()}


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:  # running_mean / running_var / num_batches_tracked and the power iteration's _u / _v included
        assert torch.equal(a[key], b[key]), key


def reference_pgd(net, x, y):
    """advertorch's LinfPGDAttack (no random start) on `net` as it is: what the defense should compute."""
    attacks = import_advertorch()
    pgd = attacks.LinfPGDAttack(net, eps=EPS, nb_iter=STEPS, eps_iter=STEP, rand_init=False, clip_min=0.0,
                                clip_max=1.0)
    return pgd.perturb(x, y).detach()


def defense(name, attack_bn, **extra):
    options = {"pgd-at": {"steps": STEPS, "step_size": 12, "random_start": False},
               "trades": {"steps": STEPS, "step_size": 12}, "fgsm-rs": {}}[name]
    return registry.load("defense", name)(eps=EPS, attack_bn=attack_bn, **options, **extra)


def running_statistics_copy(net):
    """A copy in eval mode: batch norm with its running statistics, no power iteration."""
    return copy.deepcopy(net).eval()


def batch_statistics_copy(net):
    """A copy in eval mode whose batch norms have no running statistics, so they normalize with the batch's own
    (torch's documented eval-mode behaviour without buffers): the reference for attack_bn "train"."""
    ref = copy.deepcopy(net).eval()
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean, m.running_var, m.track_running_stats = None, None, False
    return ref


def test_eval_mode_crafts_against_the_running_statistics(model, digits):
    x, y = digits
    expected = reference_pgd(running_statistics_copy(model), x, y)
    got = defense("pgd-at", "eval").adversary(model, x, y)
    assert torch.equal(got, expected)
    assert model.training


def test_train_mode_crafts_against_the_batch_statistics(model, digits):
    x, y = digits
    expected = reference_pgd(batch_statistics_copy(model), x, y)
    got = defense("pgd-at", "train").adversary(model, x, y)
    assert torch.allclose(got, expected, atol=1e-6)
    assert (got - defense("pgd-at", "eval").adversary(model, x, y)).abs().max() > 1e-3  # the choice matters here
    with adversary_mode(model, "train"):  # the forward the adversary saw: batch statistics, not running ones
        logits = model(x)
    assert torch.allclose(logits, batch_statistics_copy(model)(x), atol=1e-5)
    assert not torch.allclose(logits, running_statistics_copy(model)(x), atol=1e-3)


def craft(name, attack_bn, net, x, y, seed=1):
    torch.manual_seed(seed)  # TRADES and FGSM-RS draw their starting points from torch's generator
    plugin = defense(name, attack_bn)
    return plugin.adversary(net, x) if name == "trades" else plugin.adversary(net, x, y)


@pytest.mark.parametrize("name", ["pgd-at", "trades", "fgsm-rs"])
def test_every_defense_honours_the_option(model, digits, name):
    """Each defense's "train" adversary is the one its "eval" adversary would be on a network normalizing with
    batch statistics, and differs from the running-statistics one."""
    x, y = digits
    train = craft(name, "train", model, x, y)
    assert torch.allclose(train, craft(name, "eval", batch_statistics_copy(model), x, y), atol=1e-6)
    assert (train - craft(name, "eval", model, x, y)).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["pgd-at", "trades", "fgsm-rs"])
@pytest.mark.parametrize("attack_bn", ["eval", "train"])
def test_crafting_updates_no_statistics_and_no_power_iteration(model, digits, name, attack_bn):
    x, y = digits
    model[1].eval()  # a mixed mode (a frozen batch norm) must come back as it was, module by module
    modes = [m.training for m in model.modules()]
    before = state(model)
    x_adv = craft(name, attack_bn, model, x, y)
    assert_same_state(before, state(model))
    assert [m.training for m in model.modules()] == modes
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert all(m.track_running_stats for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert float((x_adv - x).abs().max()) <= EPS + 1e-6


@pytest.mark.parametrize("attack_bn", ["eval", "train"])
def test_a_training_step_counts_one_batch_and_one_power_iteration(model, digits, attack_bn):
    """Crafting adds nothing: after a PGD-AT loss, batch norm has seen exactly one batch (the adversarial one) and
    the power iteration advanced exactly once, as after one plain training forward."""
    x, y = digits
    plain = copy.deepcopy(model)
    x_adv = defense("pgd-at", attack_bn).adversary(copy.deepcopy(model), x, y)
    plain(x_adv)  # one training forward of the same adversarial batch
    defense("pgd-at", attack_bn).loss(model, x, y)
    assert_same_state(state(plain), state(model))


def test_the_option_is_validated_defaulted_and_recorded(tiny_spec):
    resolved = spec_mod.validate(tiny_spec)
    assert resolved["defense"]["options"]["attack_bn"] == "eval"  # the resolved spec (in every report) records it
    tiny_spec["defense"]["options"]["attack_bn"] = "train"
    assert spec_mod.validate(tiny_spec)["defense"]["options"]["attack_bn"] == "train"
    tiny_spec["defense"]["options"]["attack_bn"] = "batch"
    with pytest.raises(BadInput, match="attack_bn"):
        spec_mod.validate(tiny_spec)
    for name in ("trades", "fgsm-rs"):
        assert registry.load("defense", name).options_schema["properties"]["attack_bn"]["default"] == "eval"
    assert "attack_bn" in ADVERSARY_POLICY
    with pytest.raises(ValueError, match="batch_norm"):
        with adversary_mode(nn.Linear(2, 2), "batch"):
            pass
