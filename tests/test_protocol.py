"""The protocol of the paper's appendix A.3/A.4, pinned: each test watches one property act on real tiny data
(scikit-learn digits, LeNet) and fails when a single line of the protocol changes.

The attacks and the defense are observed through `Recorder`, a module wrapped around the network that keeps every
input it is called with (and the mode it was in): the libraries call it for each iterate, so the tests see the
random start, every step and every restart exactly as the library computed them.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from rich.console import Console
from torch.nn.utils.parametrizations import _SpectralNorm

from harness import analysis, evaluate as evaluate_mod, paper, registry, spec as spec_mod
from harness.analysis import analyze, margins, ramp_loss
from harness.evaluate import evaluate
from harness.plugin import AttackPlugin, DataSplits, Split, adversary_mode, to_unit
from harness.runner import run
from harness.spectral import normalized_layers
from harness.train import train

CPU = torch.device("cpu")


@dataclass
class Call:
    x: torch.Tensor
    training: bool
    out: torch.Tensor
    gradient: bool  # the library asked for the gradient with respect to this input: an attack step


class Recorder(nn.Module):
    """Calls the model and keeps each call's input, mode, output (detached copies) and whether the caller takes the
    gradient with respect to the input."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.calls: list[Call] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        self.calls.append(Call(x.detach().clone(), self.training, out.detach().clone(), x.requires_grad))
        return out


def lenet(spectral_norm: bool) -> nn.Module:
    return registry.load("model", "lenet")(spectral_norm=spectral_norm).build(10, (1, 8, 8))


def plain_cfg(**overrides) -> dict:
    cfg = {"epochs": 1, "batch_size": 32, "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0, "nesterov": False,
           "schedule": {"type": "constant"}, "max_batches": None}
    return cfg | overrides


def with_splits(data: DataSplits, train_split: Split, test_split: Split, **fields) -> DataSplits:
    return DataSplits(train=train_split, test=test_split, num_classes=data.num_classes, input_shape=data.input_shape,
                      **fields)


@pytest.fixture(scope="module")
def digits() -> DataSplits:
    """scikit-learn's digits through the `digits` dataset plugin: 1,437 training and 360 test images, 1x8x8."""
    return registry.load("dataset", "digits")().load(None, False)


@pytest.fixture(scope="module")
def trained(digits) -> nn.Module:
    """LeNet trained plainly for 2 epochs, without spectral norm (with it, digits take many more epochs): ~94%
    test accuracy, so there are both correctly and wrongly classified samples. Tests that change it take a copy."""
    torch.manual_seed(0)
    model = lenet(spectral_norm=False)
    train(model, registry.load("defense", "none")(eps=0.0), digits, plain_cfg(epochs=2), CPU, seed=0)
    return model.eval()


def ce_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """d/dx of the summed cross-entropy, the ascent direction of an untargeted Linf PGD."""
    x = x.clone().requires_grad_(True)
    with adversary_mode(model):
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), x)
    return grad


def assert_uniform_start(start: torch.Tensor, x: torch.Tensor, eps: float) -> None:
    """start = clip(x + u, 0, 1) with u uniform in [-eps, eps], drawn independently for every pixel and image."""
    delta = start - x
    assert (delta.abs() <= eps + 1e-6).all(), "the start left the eps-ball"
    assert start.min() >= 0 and start.max() <= 1, "the start left the image domain"
    interior = (x >= eps) & (x <= 1 - eps)  # where clipping to [0, 1] cannot bind
    u = delta[interior] / eps
    assert u.numel() > 500
    quarters = torch.histc(u, bins=4, min=-1.0, max=1.0) / u.numel()
    assert ((quarters - 0.25).abs() < 0.05).all(), f"not uniform on [-eps, eps]: quarters {quarters.tolist()}"
    assert float(u.abs().max()) > 0.97, "the start does not reach the ball's faces"
    assert not torch.allclose(delta[0], delta[1]), "every image must get its own random start"


# ------------------------------------------------------------------------------------------- losses (A.4)


def test_split_loss_is_the_mean_over_samples_not_the_mean_of_batch_means(digits, trained):
    data = with_splits(digits, digits.train.subset(100, 0), digits.test.subset(70, 1))
    metrics = evaluate(trained, data, [], 64, CPU)  # batches of 64 + 36 and 64 + 6 samples
    for split, key in ((data.train, "train_loss"), (data.test, "test_loss")):
        with torch.no_grad():
            per_sample = F.cross_entropy(trained(split.images), split.labels, reduction="none")
        assert metrics[key] == pytest.approx(float(per_sample.mean()), rel=1e-5, abs=1e-7), key
        batch_means = (float(per_sample[:64].mean()) + float(per_sample[64:].mean())) / 2
        assert abs(batch_means - float(per_sample.mean())) > 1e-3, "the uneven last batch must make a difference"


def test_training_objective_is_the_mean_over_samples_not_the_mean_of_batch_means(digits):
    torch.manual_seed(0)
    model = lenet(spectral_norm=False)  # no power iteration: with lr 0 the network is the same at every step
    data = with_splits(digits, digits.train.subset(100, 0), digits.test.subset(8, 1))
    history = train(model, registry.load("defense", "none")(eps=0.0), data, plain_cfg(batch_size=64, lr=0.0,
                                                                                     momentum=0.0), CPU, seed=0)
    with torch.no_grad():
        per_sample = F.cross_entropy(model(data.train.images), data.train.labels, reduction="none")
    assert history[0]["train_objective"] == pytest.approx(float(per_sample.mean()), rel=1e-5)


class ModeProbe(nn.Module):
    """Identity that notes the mode of every forward pass."""

    def __init__(self):
        super().__init__()
        self.modes: list[bool] = []

    def forward(self, x):
        self.modes.append(self.training)
        return x


class CountingTransform:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, x, generator=None):
        self.calls += 1
        return self.fn(x)


class RecordingIdentityAttack(AttackPlugin):
    """Returns the images it is given, and keeps them."""

    def __init__(self, eps):
        super().__init__(eps)
        self.seen: list[torch.Tensor] = []

    def perturb(self, model, x, y):
        self.seen.append(x.clone())
        return x.clone()


@pytest.fixture
def probed(digits, trained):
    """A network whose train mode differs (dropout on the input), a probe of its modes, and data whose training
    augmentation (inverting the images) differs from its evaluation view (a left-right flip)."""
    probe = ModeProbe()
    model = nn.Sequential(probe, nn.Dropout(0.5), copy.deepcopy(trained)).train()  # as training leaves it
    data = with_splits(digits, digits.train.subset(96, 0), digits.test.subset(64, 1),
                       augment=CountingTransform(lambda x: 1 - x),
                       eval_transform=CountingTransform(lambda x: x.flip(-1)))
    return model, probe, data


def test_losses_accuracy_and_attacked_images_are_eval_mode_without_augmentation(probed):
    model, probe, data = probed
    attack = RecordingIdentityAttack(eps=to_unit(8))
    metrics = evaluate(model, data, [({"name": "identity", "label": "id", "eps": 8}, attack)], 40, CPU)
    assert probe.modes and not any(probe.modes), "a forward pass of the evaluation ran in training mode"
    assert data.augment.calls == 0 and data.eval_transform.calls > 0
    model.eval()
    with torch.no_grad():
        train_logits = model(data.train.images.flip(-1))
        test_logits = model(data.test.images.flip(-1))
    assert metrics["train_loss"] == pytest.approx(float(F.cross_entropy(train_logits, data.train.labels)), rel=1e-5)
    assert metrics["test_loss"] == pytest.approx(float(F.cross_entropy(test_logits, data.test.labels)), rel=1e-5)
    correct = test_logits.argmax(1) == data.test.labels
    assert metrics["clean_acc"] == pytest.approx(100.0 * float(correct.sum()) / len(correct))
    # the attack receives the evaluation view of exactly the correctly classified test images
    assert torch.equal(torch.cat(attack.seen), data.test.images.flip(-1)[correct])


def test_margins_and_ramp_loss_are_eval_mode_without_augmentation(probed):
    model, probe, data = probed
    options = {"eps": 8, "gamma": 2.0, "max_train": 4, "steps": 1, "step_size": 4, "power_iterations": 2}
    result = analyze(model, data, options, 40, CPU)
    assert probe.modes and not any(probe.modes), "a forward pass of the analysis ran in training mode"
    assert data.augment.calls == 0
    model.eval()
    for split, name in ((data.train, "train"), (data.test, "test")):
        with torch.no_grad():
            m = margins(model(split.images.flip(-1)), split.labels)
        got = result["margins"][name]
        assert (got["n"], got["mean"], got["min"], got["max"]) == (len(m), pytest.approx(float(m.mean()), rel=1e-5),
                                                                     pytest.approx(float(m.min()), rel=1e-5),
                                                                     pytest.approx(float(m.max()), rel=1e-5))
        assert result["ramp"][name] == pytest.approx(float(ramp_loss(m, 2.0).mean()), rel=1e-5)


def test_training_batches_are_augmented_before_the_defense_sees_them(digits):
    """A.1: the augmentation is of training; every training step's batch goes through it (and evaluation never
    does, above)."""
    torch.manual_seed(0)
    recorder = Recorder(lenet(spectral_norm=False))
    augment = CountingTransform(lambda x: x.flip(-1))
    data = with_splits(digits, digits.train.subset(64, 0), digits.test.subset(8, 1), augment=augment)
    train(recorder, registry.load("defense", "none")(eps=0.0), data, plain_cfg(batch_size=16), CPU, seed=0)
    assert augment.calls == 4 and len(recorder.calls) == 4
    flipped = {tuple(x.flatten().tolist()) for x in data.train.images.flip(-1)}
    assert all(tuple(x.flatten().tolist()) in flipped for call in recorder.calls for x in call.x)


# ------------------------------------------------------------------------------------------- PGD (A.3, A.4)

PGD_PLUGINS = [("defense", "pgd-at"), ("attack", "foolbox-pgd"), ("attack", "advertorch-pgd")]


def run_plugin(kind: str, name: str, model: nn.Module, x, y, eps: float, **options) -> tuple[torch.Tensor, list[Call]]:
    """The adversary of a defense (its `adversary`) or an attack (`perturb`, in adversary_mode as the harness calls
    it) for eps on the 0-255 scale, and the calls the library made to the network."""
    recorder = Recorder(model)
    plugin = registry.load(kind, name)(eps=to_unit(eps), **options)
    if kind == "defense":
        x_adv = plugin.adversary(recorder, x, y)
    else:
        with adversary_mode(recorder):
            x_adv = plugin.perturb(recorder, x, y)
    return x_adv, recorder.calls


@pytest.mark.parametrize("kind, name", PGD_PLUGINS)
def test_pgd_starts_uniformly_in_the_ball_with_random_start_and_at_the_image_without(kind, name, digits, trained):
    torch.manual_seed(0)
    x, y = digits.train.images[:128], digits.train.labels[:128]
    _, calls = run_plugin(kind, name, trained, x, y, 32, steps=1, step_size=8, random_start=False)
    assert torch.equal(calls[0].x, x)
    _, calls = run_plugin(kind, name, trained, x, y, 32, steps=1, step_size=8, random_start=True)
    assert_uniform_start(calls[0].x, x, to_unit(32))


@pytest.mark.parametrize("kind, name", PGD_PLUGINS)
def test_pgd_takes_the_declared_number_of_steps(kind, name, digits, trained):
    x, y = digits.test.images[:16], digits.test.labels[:16]
    for steps in (1, 5):
        calls = run_plugin(kind, name, trained, x, y, 16, steps=steps, step_size=4, random_start=False)[1]
        assert sum(c.gradient for c in calls) == steps  # one gradient with respect to the input per step


@pytest.mark.parametrize("kind, name", PGD_PLUGINS)
def test_pgd_steps_are_the_declared_size_up_the_cross_entropy(kind, name, digits, trained):
    """Untargeted: the first step from the image is step_size * sign of the cross-entropy's gradient; no step moves
    a pixel by more than step_size; the result is in the ball."""
    x, y = digits.test.images[:64], digits.test.labels[:64]
    step = to_unit(4)
    x_adv, calls = run_plugin(kind, name, trained, x, y, 16, steps=3, step_size=4, random_start=False)
    grad = ce_gradient(trained, x, y)
    clear = grad.abs() > 1e-6 * grad.abs().max()  # a sign that float rounding cannot flip
    expected = (x + step * grad.sign()).clamp(0, 1)
    assert torch.allclose(calls[1].x[clear], expected[clear], atol=1e-6)
    moves = [float((b.x - a.x).abs().max()) for a, b in zip(calls, calls[1:])]
    assert moves[0] == pytest.approx(step, abs=1e-6) and max(moves) <= step + 1e-6
    assert float((x_adv - x).abs().max()) <= to_unit(16) + 1e-6


def test_advertorch_restarts_attack_again_only_the_samples_still_unbroken(digits, trained):
    torch.manual_seed(0)
    x, y = digits.test.images[:64], digits.test.labels[:64]
    with torch.no_grad():
        predicted = trained(x).argmax(1)
    options = {"steps": 2, "step_size": 0.1, "random_start": True}
    # at 0.1/255 no correctly classified sample breaks, so every restart runs on all of them: the same work again
    one = run_plugin("attack", "advertorch-pgd", trained, x, predicted, 0.1, restarts=1, **options)[1]
    three = run_plugin("attack", "advertorch-pgd", trained, x, predicted, 0.1, restarts=3, **options)[1]
    assert len(three) == 3 * len(one) and all(len(c.x) == 64 for c in three)
    # at 8/255 some break: the second run attacks exactly those the first left correct
    x_adv, calls = run_plugin("attack", "advertorch-pgd", trained, x, y, 8, restarts=2, steps=2, step_size=4,
                              random_start=True)
    first_run = calls[:3]  # 2 steps, then the check of its result
    unbroken = first_run[-1].out.argmax(1) == y
    assert 0 < int(unbroken.sum()) < 64
    assert [len(c.x) for c in calls[3:]] == [int(unbroken.sum())] * 3
    # a sample counts as broken if any run broke it: the first run's adversaries are kept for those it broke
    assert torch.equal(x_adv[~unbroken], first_run[-1].x[~unbroken])
    assert torch.equal(x_adv[unbroken], calls[-1].x)


@pytest.mark.parametrize("random_start", [False, True])
def test_fgsm_is_one_step_of_eps_from_its_declared_start(random_start, digits, trained):
    torch.manual_seed(0)
    x, y = digits.train.images[:128], digits.train.labels[:128]
    eps = to_unit(16)
    x_adv, calls = run_plugin("attack", "foolbox-fgsm", trained, x, y, 16, random_start=random_start)
    start = calls[0].x
    if random_start:
        assert_uniform_start(start, x, eps)
    else:
        assert torch.equal(start, x)
    grad = ce_gradient(trained, start, y)
    clear = grad.abs() > 1e-6 * grad.abs().max()
    expected = (x + (start + eps * grad.sign() - x).clamp(-eps, eps)).clamp(0, 1)
    assert torch.allclose(x_adv[clear], expected[clear], atol=1e-6)


# ------------------------------------------------------------------------------------------- other attacks' options


class LinearModel(nn.Module):
    """logits = W x + b on 1x4x4 images: the minimal Linf distance to class j's boundary is
    (z_y - z_j) / ||w_y - w_j||_1."""

    def __init__(self, classes: int = 5):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.lin = nn.Linear(16, classes)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(classes, 16, generator=gen))
            self.lin.bias.copy_(-self.lin.weight.sum(1) * 0.5)

    def forward(self, x):
        return self.lin(x.flatten(1))

    def distances(self, x: torch.Tensor) -> torch.Tensor:
        """(N, classes): the Linf distance to each class's boundary (inf for the predicted class)."""
        with torch.no_grad():
            z = self(x)
            y = z.argmax(1)
            w = self.lin.weight
            d = (z.gather(1, y[:, None]) - z) / (w[y][:, None, :] - w[None]).abs().sum(2)
            d[torch.arange(len(y)), y] = float("inf")
            return d


@pytest.fixture
def linear_data():
    model = LinearModel()
    x = 0.3 + 0.4 * torch.rand((200, 1, 4, 4), generator=torch.Generator().manual_seed(1))
    d = model.distances(x)
    keep = d.min(1).values < 0.15  # the overshot example stays inside [0, 1]: no clipping
    with torch.no_grad():
        return model, x[keep][:48], model(x[keep][:48]).argmax(1), d[keep][:48]


def deepfool_distances(model, x, y, **options) -> tuple[torch.Tensor, int]:
    recorder = Recorder(model)
    attack = registry.load("attack", "foolbox-deepfool")(eps=to_unit(8), **options)
    with adversary_mode(recorder):
        x_adv = attack.minimal_perturb(recorder, x, y)
    with torch.no_grad():
        fooled = model(x_adv).argmax(1) != y
    d = (x_adv - x).flatten(1).abs().amax(1)
    return torch.where(fooled, d, torch.full_like(d, float("inf"))), len(recorder.calls)


@pytest.mark.parametrize("overshoot", [0.02, 0.5])
def test_deepfool_overshoots_the_closest_boundary_by_the_declared_factor(overshoot, linear_data):
    model, x, y, d = linear_data
    found, _ = deepfool_distances(model, x, y, candidates=5, overshoot=overshoot)
    # one linearized step is exact on a linear model; foolbox adds 1e-4 to the distance for stability
    assert torch.allclose(found, (1 + overshoot) * (d.min(1).values + 1e-4), rtol=1e-4, atol=1e-6)


def test_deepfool_candidates_limit_the_classes_it_considers(linear_data):
    model, x, y, d = linear_data
    with torch.no_grad():
        runner_up = model(x).argsort(1, descending=True)[:, 1]
    to_runner_up = d.gather(1, runner_up[:, None]).squeeze(1)
    assert (to_runner_up > 1.05 * d.min(1).values).any(), "the closest boundary must not always be the runner-up's"
    found, _ = deepfool_distances(model, x, y, candidates=2, overshoot=0.0)
    assert torch.allclose(found, to_runner_up + 1e-4, rtol=1e-4, atol=1e-6)


def test_deepfool_stops_after_the_declared_steps(digits, trained):
    x, y = digits.test.images[:32], digits.test.labels[:32]
    runs = {steps: deepfool_distances(trained, x, y, steps=steps, candidates=3, overshoot=0.0)
            for steps in (1, 2, 3, 50)}
    # each step evaluates the candidates - 1 = 2 other classes; a LeNet needs several steps for some samples
    assert runs[2][1] - runs[1][1] == 2 and runs[3][1] - runs[2][1] == 2
    assert int(torch.isinf(runs[1][0]).sum()) > int(torch.isinf(runs[50][0]).sum())


def square_calls(model, x, y, eps=0.5, **options) -> list[Call]:
    return run_plugin("attack", "square", model, x, y, eps, **options)[1]


def test_square_spends_the_declared_queries_per_restart(digits, trained):
    x = digits.test.images[:16]
    with torch.no_grad():
        y = trained(x).argmax(1)  # all classified "correctly"; at 0.5/255 none breaks, so every query is spent
    calls = {(q, r): len(square_calls(trained, x, y, n_queries=q, restarts=r)) for q, r in
             [(10, 1), (20, 1), (10, 2), (10, 3)]}
    assert calls[(20, 1)] - calls[(10, 1)] == 10
    per_restart = calls[(10, 2)] - calls[(10, 1)]
    assert per_restart >= 10 and calls[(10, 3)] - calls[(10, 1)] == 2 * per_restart


@pytest.mark.parametrize("p_init", [0.1, 0.8])
def test_square_first_square_has_the_side_p_init_gives(p_init, digits, trained):
    """Square's first update changes one s x s window, s = round(sqrt(p_init * H * W)), shared by the batch (each
    image's own stripes decide which of its pixels flip; over 48 images the window is covered)."""
    x = digits.test.images[:48]
    with torch.no_grad():
        y = trained(x).argmax(1)
    calls = square_calls(trained, x, y, eps=4, n_queries=2, p_init=p_init)
    init, first = calls[1], calls[2]  # [clean check, the striped start, the first square update, ...]
    still = init.out.argmax(1) == y  # Square updates only the samples its start did not break
    changed = (first.x != init.x[still]).any(0)[0]  # (8, 8): pixels some image changed
    rows, cols = torch.nonzero(changed, as_tuple=True)
    side = max(round((p_init * 64) ** 0.5), 1)
    assert int(changed.sum()) == side * side
    assert (int(rows.max() - rows.min()) + 1, int(cols.max() - cols.min()) + 1) == (side, side)


def test_square_seed_decides_its_random_choices(digits, trained):
    x = digits.test.images[:8]
    with torch.no_grad():
        y = trained(x).argmax(1)
    a, b, c = (square_calls(trained, x, y, n_queries=5, seed=s) for s in (0, 0, 1))
    assert all(torch.equal(p.x, q.x) for p, q in zip(a, b))
    assert not torch.equal(a[1].x, c[1].x)


def test_autoattack_seed_decides_its_random_start(digits, trained):
    """At 128/255 APGD-CE (the first attack) breaks every image, so no later attack runs; its random start is the
    first perturbed input it evaluates."""
    x = digits.test.images[:2]
    with torch.no_grad():
        y = trained(x).argmax(1)

    def first_perturbed(seed):
        calls = run_plugin("attack", "autoattack", trained, x, y, 128, seed=seed)[1]
        return next(c.x for c in calls if len(c.x) == len(x) and not torch.equal(c.x, x))

    assert torch.equal(first_perturbed(0), first_perturbed(0))
    assert not torch.equal(first_perturbed(0), first_perturbed(1))


# Every option a built-in attack declares, and the test above that watches it act. A new option fails
# test_every_attack_option_is_watched until a test that fails without it is added here.
WATCHED = {
    "foolbox-pgd": {"steps": "test_pgd_takes_the_declared_number_of_steps",
                    "step_size": "test_pgd_steps_are_the_declared_size_up_the_cross_entropy",
                    "random_start": "test_pgd_starts_uniformly_in_the_ball_with_random_start_and_at_the_image_without"},
    "foolbox-fgsm": {"random_start": "test_fgsm_is_one_step_of_eps_from_its_declared_start"},
    "foolbox-deepfool": {"steps": "test_deepfool_stops_after_the_declared_steps",
                         "candidates": "test_deepfool_candidates_limit_the_classes_it_considers",
                         "overshoot": "test_deepfool_overshoots_the_closest_boundary_by_the_declared_factor"},
    "square": {"n_queries": "test_square_spends_the_declared_queries_per_restart",
               "restarts": "test_square_spends_the_declared_queries_per_restart",
               "p_init": "test_square_first_square_has_the_side_p_init_gives",
               "seed": "test_square_seed_decides_its_random_choices"},
    "autoattack": {"seed": "test_autoattack_seed_decides_its_random_start",
                   # the components each version runs, each with the reference's settings
                   "version": "test_autoattack.py::test_every_component_runs_with_the_reference_settings_in_order"},
}
WATCHED["advertorch-pgd"] = dict(WATCHED["foolbox-pgd"],
                                 restarts="test_advertorch_restarts_attack_again_only_the_samples_still_unbroken")


def test_every_attack_option_is_watched():
    builtin = {name for name, infos in registry.discover("attack").items()
               if any(i.target.startswith("harness_plugins.") for i in infos)}
    assert builtin == set(WATCHED)
    for name in builtin:
        declared = set(registry.load("attack", name).options_schema.get("properties", {}))
        assert declared == set(WATCHED[name]), f"{name}: options without a test: {declared - set(WATCHED[name])}"
        for test in WATCHED[name].values():
            module, _, function = test.rpartition("::")
            source = (Path(__file__).parent / module).read_text() if module else ""
            assert f"def {function}(" in source if module else callable(globals().get(function)), test


# ------------------------------------------------------------------------------------------- PGD adversarial training


def test_pgd_at_trains_on_the_adversaries_alone(digits, trained):
    """A.3: every clean training image is replaced by its adversary; the loss is the adversarial cross-entropy
    alone, from one forward pass in training mode. Strength 0 (the tables' first column) is plain training."""
    model = copy.deepcopy(trained).train()
    x, y = digits.train.images[:32], digits.train.labels[:32]
    defense = registry.load("defense", "pgd-at")(eps=to_unit(16), steps=3, step_size=8, random_start=False)
    recorder = Recorder(model)
    loss = defense.loss(recorder, x, y)
    training = [c for c in recorder.calls if c.training]
    assert len(training) == 1, "one forward pass in training mode: no clean term"
    assert torch.equal(training[0].x, defense.adversary(model, x, y))  # deterministic without a random start
    assert (((training[0].x - x).flatten(1).abs().amax(1)) > 0).all(), "every image replaced by its adversary"
    assert float(loss.detach()) == pytest.approx(float(F.cross_entropy(training[0].out, y)), rel=1e-6)

    recorder = Recorder(model)
    loss = registry.load("defense", "pgd-at")(eps=0.0).loss(recorder, x, y)
    (call,) = recorder.calls
    assert call.training and torch.equal(call.x, x)
    assert float(loss.detach()) == pytest.approx(float(F.cross_entropy(call.out, y)), rel=1e-6)


@pytest.mark.parametrize("momentum, weight_decay", [(0.9, 0.0), (0.5, 0.01)])
def test_sgd_steps_with_the_configured_rate_momentum_and_weight_decay(momentum, weight_decay, digits):
    """Two steps of training against heavy-ball SGD by hand (PyTorch's convention: buf = momentum * buf + g,
    g = gradient + weight_decay * p, p -= lr * buf); A.2's values are momentum 0.9 and no weight decay."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    by_hand = copy.deepcopy(model)
    data = with_splits(digits, digits.train.subset(48, 0), digits.test.subset(8, 1))
    cfg = plain_cfg(epochs=2, batch_size=48, lr=0.1, momentum=momentum, weight_decay=weight_decay)
    train(model, registry.load("defense", "none")(eps=0.0), data, cfg, CPU, seed=0)
    buffers = None
    for _ in range(2):
        params = list(by_hand.parameters())
        grads = torch.autograd.grad(F.cross_entropy(by_hand(data.train.images), data.train.labels), params)
        grads = [g + weight_decay * p.detach() for g, p in zip(grads, params)]
        buffers = grads if buffers is None else [momentum * b + g for b, g in zip(buffers, grads)]
        with torch.no_grad():
            for p, b in zip(params, buffers):
                p -= 0.1 * b
    for ours, theirs in zip(model.parameters(), by_hand.parameters()):
        assert torch.allclose(ours, theirs, atol=1e-6)


# ------------------------------------------------------------------------------------------- spectral norm


def test_one_power_iteration_per_training_step_and_none_in_attacks_or_evaluation(digits, monkeypatch):
    torch.manual_seed(0)
    model = lenet(spectral_norm=True)
    layers = [m.parametrizations.weight[0] for _, m in normalized_layers(model)]
    counts: Counter = Counter()
    power_method = _SpectralNorm._power_method

    def counting(self, weight_mat, n_power_iterations):
        counts[id(self)] += n_power_iterations
        return power_method(self, weight_mat, n_power_iterations)

    monkeypatch.setattr(_SpectralNorm, "_power_method", counting)
    data = with_splits(digits, digits.train.subset(96, 0), digits.test.subset(48, 1))
    defense = registry.load("defense", "pgd-at")(eps=to_unit(16), steps=2, step_size=8)
    train(model, defense, data, plain_cfg(batch_size=32), CPU, seed=0)  # 3 steps, each with a 2-step adversary
    assert [counts[id(layer)] for layer in layers] == [3] * len(layers)

    u = [layer._u.clone() for layer in layers]
    counts.clear()
    model.train()  # as training leaves it
    attacks = [({"name": name, "label": name, "eps": 16, **({"curve": [0, 16]} if name == "foolbox-deepfool" else {})},
                registry.load("attack", name)(eps=to_unit(16), **options))
               for name, options in [("foolbox-pgd", {"steps": 2}), ("advertorch-pgd", {"steps": 2}),
                                     ("foolbox-fgsm", {}), ("foolbox-deepfool", {"steps": 2}),
                                     ("square", {"n_queries": 3})]]
    evaluate(model, data, attacks, 32, CPU, checks={"max_samples": 8, "convergence": False})
    model.train()
    analyze(model, data, {"eps": 8, "gamma": 1.0, "max_train": 8, "steps": 2, "step_size": 4, "power_iterations": 2},
            32, CPU)
    assert sum(counts.values()) == 0, "the power iteration advanced outside a training step"
    assert all(torch.equal(a, layer._u) for a, layer in zip(u, layers))


# ------------------------------------------------------------------------------------------- the 0-255 scale


def test_every_perturbation_size_reaches_its_plugin_divided_by_255(tmp_path, monkeypatch):
    """Through a whole run: the defense's adversaries, every attack, the checks' eps grid and gradient-free attack,
    and the analysis's ball all move images by exactly the spec's size / 255 (each PGD here has enough steps to
    reach the ball's face), with step sizes / 255."""
    seen = {"defense": [], "attacks": [], "analysis": []}
    defense_cls = registry.load("defense", "pgd-at")
    adversary = defense_cls.adversary

    def spy_adversary(self, model, x, y, *args, **kwargs):
        x_adv = adversary(self, model, x, y, *args, **kwargs)
        seen["defense"].append((self.eps, self.step_size, float((x_adv - x).abs().max())))
        return x_adv

    check = evaluate_mod.check_adversary

    def spy_check(label, x, x_adv, eps):
        check(label, x, x_adv, eps)
        seen["attacks"].append((label, eps, float((x_adv - x).abs().max())))

    search = analysis.search_ball

    def spy_search(model, x, y, eps, steps, step_size):
        recorder = Recorder(model)
        out = search(recorder, x, y, eps, steps, step_size)
        seen["analysis"].append((eps, step_size, max(float((c.x - x).abs().max()) for c in recorder.calls)))
        return out

    monkeypatch.setattr(defense_cls, "adversary", spy_adversary)
    monkeypatch.setattr(evaluate_mod, "check_adversary", spy_check)
    monkeypatch.setattr(analysis, "search_ball", spy_search)
    pgd = {"steps": 3, "step_size": 10, "random_start": False}
    spec = spec_mod.validate({
        "name": "scale", "seed": 0, "device": "cpu",
        "dataset": {"name": "digits", "max_train": 256, "max_test": 48},
        "models": [{"name": "lenet", "options": {"spectral_norm": False}}],
        "defense": {"name": "pgd-at", "strengths": [24],
                    "options": {"steps": 2, "step_size": 12, "random_start": False}},
        "training": {"epochs": 2, "batch_size": 32, "lr": 0.05},
        "evaluation": {"batch_size": 48, "attacks": [
            {"name": "foolbox-pgd", "label": "fb", "eps": 20, "options": dict(pgd)},
            {"name": "advertorch-pgd", "label": "at", "eps": 20, "options": dict(pgd)},
            {"name": "foolbox-fgsm", "label": "fgsm", "eps": 20}],
            "checks": {"max_samples": 16, "eps_grid": [6, 30], "attacks": ["fb"], "convergence": False,
                       "gradient_free": {"name": "square", "options": {"n_queries": 3}}}},
        "analysis": {"enabled": True, "eps": 16, "steps": 2, "step_size": 8, "max_train": 16, "power_iterations": 2},
    })
    report = run(spec, tmp_path, Console(quiet=True))
    (cell,) = report["cells"]
    assert cell["status"] == "done", cell.get("error")

    assert seen["defense"]
    for eps, step, moved in seen["defense"]:
        assert (eps, step) == (pytest.approx(24 / 255), pytest.approx(12 / 255))
        assert moved == pytest.approx(24 / 255, abs=1e-6)

    by_attack: dict[tuple[str, float], float] = {}
    for label, eps, moved in seen["attacks"]:
        key = (label, round(eps * 255, 6))
        by_attack[key] = max(by_attack.get(key, 0.0), moved)
    assert set(by_attack) == {("fb", 20), ("at", 20), ("fgsm", 20), ("fb", 0), ("fb", 6), ("fb", 30), ("square", 20)}
    for (label, eps), moved in by_attack.items():
        if label == "square":  # it returns only the examples it broke, each moved to the ball's face
            assert moved in (0.0, pytest.approx(eps / 255, abs=1e-6)), (label, eps)
        else:
            assert moved == pytest.approx(eps / 255, abs=1e-6), (label, eps)

    assert seen["analysis"]
    for eps, step, moved in seen["analysis"]:
        assert (eps, step) == (pytest.approx(16 / 255), pytest.approx(8 / 255))
        assert moved == pytest.approx(16 / 255, abs=1e-6)
    assert cell["analysis"]["eps"] == 16 and set(cell["metrics"]["worst_case"]) == {"20"}


class ConstantThreshold(nn.Module):
    """Two classes: 1 when the image's mean exceeds 0.5."""

    def forward(self, x):
        m = x.flatten(1).mean(1, keepdim=True) - 0.5
        return torch.cat([-m, m], 1) * 100


class ToTheThreshold(AttackPlugin):
    """A minimal-norm attack on ConstantThreshold: every (constant) image raised to just past 0.5."""

    def minimal_perturb(self, model, x, y):
        return torch.full_like(x, 0.5 + 1e-5)


def test_robustness_curve_counts_a_sample_robust_at_eps_when_its_distance_exceeds_eps_over_255():
    """Distances placed 3e-5 on either side of 4/255, 8/255 and 16/255 (eps / 256 lies 6e-5 to 2.5e-4 below)."""
    delta = 3e-5
    d = torch.tensor([e / 255 + s * delta for e in (4, 8, 16) for s in (-1, 1)])
    x = (0.5 + 1e-5 - d)[:, None, None, None].expand(-1, 1, 2, 2).contiguous()  # distance to 0.5 + 1e-5 is d
    y = torch.zeros(len(d), dtype=torch.int64)
    data = DataSplits(train=Split(x, y), test=Split(x, y), num_classes=2, input_shape=(1, 2, 2))
    entry = {"name": "threshold", "label": "t", "eps": 8, "curve": [0, 4, 8, 16]}
    metrics = evaluate(ConstantThreshold(), data, [(entry, ToTheThreshold(eps=to_unit(8)))], 8, CPU)
    result = metrics["attacks"]["t"]
    assert metrics["clean_acc"] == 100.0
    assert result["curve"] == {"eps": [0, 4, 8, 16], "acc": pytest.approx([100.0, 500 / 6, 50.0, 100 / 6])}
    assert result["acc"] == pytest.approx(50.0)
    assert result["median_distance"] == pytest.approx(8 - 255 * delta, abs=1e-4)  # reported on the 0-255 scale


# ------------------------------------------------------------------------------------------- A.4's metrics


def test_ge_is_test_loss_minus_train_loss_with_its_sign(digits, trained):
    normal = evaluate(trained, digits, [], 500, CPU)
    assert normal["ge"] == normal["test_loss"] - normal["train_loss"] > 0  # trained on the train split
    swapped = evaluate(trained, with_splits(digits, digits.test, digits.train), [], 500, CPU)
    assert swapped["ge"] == pytest.approx(-normal["ge"]) and swapped["ge"] < 0  # signed, never an absolute gap
    assert paper.compare("mnist_lenet", 0, swapped)["diff"]["ge"] == pytest.approx(swapped["ge"] - 0.0154)


def pgd_attack(eps, **options):
    return registry.load("attack", "foolbox-pgd")(eps=to_unit(eps), **{"steps": 3, "step_size": 4,
                                                                        "random_start": False, **options})


def robust_by_hand(model, attack, x, y) -> torch.Tensor:
    """Per sample: classified correctly when clean and still after the attack on the correct ones."""
    with torch.no_grad():
        robust = model(x).argmax(1) == y
    with adversary_mode(model):
        x_adv = attack.perturb(model, x[robust], y[robust])
    with torch.no_grad():
        robust[robust.clone()] = model(x_adv).argmax(1) == y[robust]
    return robust


def test_adversarial_accuracy_attacks_the_correct_samples_and_counts_all_of_them(digits, trained):
    """A.4: misclassified samples are not attacked and count as wrong; the accuracy is over every test sample."""
    x, y = digits.test.images, digits.test.labels
    with torch.no_grad():
        correct = trained(x).argmax(1) == y
    assert 0 < int((~correct).sum()), "the test needs misclassified samples"
    seen = []

    class Spy(type(pgd_attack(16))):
        def perturb(self, model, xs, ys):
            seen.append(xs.clone())
            return super().perturb(model, xs, ys)

    metrics = evaluate(trained, digits, [({"name": "pgd", "label": "pgd", "eps": 16},
                                          Spy(eps=to_unit(16), steps=3, step_size=4, random_start=False))], 500, CPU)
    assert torch.equal(torch.cat(seen), x[correct])
    robust = robust_by_hand(trained, pgd_attack(16), x, y)
    assert metrics["attacks"]["pgd"]["acc"] == pytest.approx(100.0 * float(robust.sum()) / len(y))
    assert metrics["pgd_acc"] == metrics["attacks"]["pgd"]["acc"]


class FGSMOnHalf(AttackPlugin):
    """FGSM on every other image of the batch (parity `half`), the others returned clean: two of these break
    disjoint sets of samples, so their per-sample worst case differs from the weaker one's accuracy."""

    def __init__(self, eps, half):
        super().__init__(eps)
        self.fgsm, self.half = registry.load("attack", "foolbox-fgsm")(eps=eps), half

    def perturb(self, model, x, y):
        on = (torch.arange(len(x)) % 2 == self.half)[:, None, None, None]
        return torch.where(on, self.fgsm.perturb(model, x, y), x)


def test_pgd_acc_is_the_first_attack_and_robust_acc_the_per_sample_worst_case_at_its_eps(digits, trained):
    x, y = digits.test.images, digits.test.labels
    plugins = {"even": FGSMOnHalf(to_unit(16), 0), "odd": FGSMOnHalf(to_unit(16), 1), "pgd24": pgd_attack(24)}
    entries = [{"name": "even", "label": "even", "eps": 16}, {"name": "odd", "label": "odd", "eps": 16},
               {"name": "foolbox-pgd", "label": "pgd24", "eps": 24}]
    metrics = evaluate(trained, digits, [(e, plugins[e["label"]]) for e in entries], 500, CPU)
    robust = {label: robust_by_hand(trained, plugin, x, y) for label, plugin in plugins.items()}
    both = robust["even"] & robust["odd"]
    assert int(both.sum()) < min(int(robust["even"].sum()), int(robust["odd"].sum()))
    acc = {label: pytest.approx(100.0 * float(r.sum()) / len(y)) for label, r in robust.items()}
    assert metrics["pgd_acc"] == metrics["attacks"]["even"]["acc"] == acc["even"]
    assert metrics["worst_case"] == {
        "16": {"attacks": ["even", "odd"], "acc": pytest.approx(100.0 * float(both.sum()) / len(y))},
        "24": {"attacks": ["pgd24"], "acc": acc["pgd24"]}}
    assert metrics["robust_acc"] == metrics["worst_case"]["16"]["acc"]
