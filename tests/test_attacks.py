"""Attacks against ground truth: a linear classifier, whose minimal Linf distance to the decision boundary is known
in closed form, and a cross-check of two independent PGD implementations (advertorch and foolbox)."""

import pytest
import torch
from torch import nn

from harness import registry
from harness.compat import import_advertorch, import_foolbox
from harness.evaluate import check_adversary, evaluate, minimal_distances, worst_case
from harness.plugin import DataSplits, Split, adversary_mode, to_unit

DIM = 16


class Linear(nn.Module):
    """z = W x + b on flattened 1x4x4 images."""

    def __init__(self, classes: int, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.lin = nn.Linear(DIM, classes)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(classes, DIM, generator=gen))
            self.lin.bias.copy_(-self.lin.weight.sum(1) * 0.5)  # boundaries through the image centre

    def forward(self, x):
        return self.lin(x.flatten(1))

    def min_distance(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Labels (the model's own predictions) and the exact minimal Linf distance to another class:
        min over j != y of (z_y - z_j) / ||w_y - w_j||_1 (Hoelder's inequality, attained at a sign vector)."""
        with torch.no_grad():
            z = self(x)
            y = z.argmax(1)
            w = self.lin.weight
            gaps = (z.gather(1, y[:, None]) - z) / (w[y][:, None, :] - w[None]).abs().sum(2).clamp_min(1e-12)
            gaps[torch.arange(len(y)), y] = float("inf")
            return y, gaps.min(1).values


def _linear_setup(classes):
    model = Linear(classes)
    x = 0.3 + 0.4 * torch.rand((200, 1, 4, 4), generator=torch.Generator().manual_seed(1))
    y, dist = model.min_distance(x)
    keep = dist < 0.25  # the optimal perturbation stays inside [0, 1]: x in [0.3, 0.7], so [0, 1] never binds
    return model, x[keep][:64], y[keep][:64], dist[keep][:64]


@pytest.fixture
def linear_setup():
    """Two classes: f(x) = z_1 - z_0 = w.x + b, minimal distance |f(x)| / ||w||_1, and the sign of the
    cross-entropy gradient is exactly the optimal direction, so PGD and FGSM must reach the boundary."""
    return _linear_setup(2)


@pytest.fixture
def linear5_setup():
    """Five classes (APGD-T's targeted DLR loss needs at least 4): minimal distance over the other classes."""
    return _linear_setup(5)


def _make(name, eps, **options):
    return registry.load("attack", name)(eps=eps, **options)


@pytest.mark.parametrize("name,options", [
    ("advertorch-pgd", {"steps": 12, "random_start": True}),
    ("advertorch-pgd", {"steps": 12, "random_start": False}),
    ("foolbox-pgd", {"steps": 12, "random_start": True}),
    ("foolbox-pgd", {"steps": 12, "random_start": False}),
    ("foolbox-fgsm", {}),
])
def test_pgd_succeeds_above_the_minimal_distance_and_never_below(linear_setup, name, options):
    model, x, y, dist = linear_setup
    for eps in (0.01, 0.025, 0.05):
        if "steps" in options:
            options = dict(options, step_size=eps * 255 / 4)  # 12 steps of eps/4 cross the ball 1.5 times
        attack = _make(name, eps, **options)
        with adversary_mode(model):
            x_adv = attack.perturb(model, x, y)
        check_adversary(name, x, x_adv, eps)
        with torch.no_grad():
            fooled = model(x_adv).argmax(1) != y
        below, above = dist > eps * (1 + 1e-4), dist < eps * 0.97
        assert below.any() and above.any(), "the grid must test both sides of the boundary"
        assert not fooled[below].any(), f"{name} broke a sample whose minimal distance exceeds eps={eps}"
        assert fooled[above].all(), f"{name} missed {int((~fooled[above]).sum())} samples within eps={eps}"


def test_deepfool_distances_match_the_closed_form(linear5_setup):
    model, x, y, dist = linear5_setup
    attack = _make("foolbox-deepfool", 0.05, overshoot=0.02)
    data = DataSplits(train=Split(x, y), test=Split(x, y), num_classes=5, input_shape=(1, 4, 4))
    found = minimal_distances(model, attack, "deepfool", data.test, torch.ones(len(y), dtype=torch.bool), data, 32,
                              torch.device("cpu"))
    assert torch.isfinite(found).all()
    assert (found >= dist * (1 - 1e-4)).all(), "an adversarial example closer than the provable minimum"
    assert (found <= dist * 1.03 + 1e-4).all(), "DeepFool is exact on a linear model up to its 2% overshoot"
    # the reported curve is the fraction of samples farther than each eps
    metrics = evaluate(model, data, [({"name": "foolbox-deepfool", "label": "df", "eps": 0.05 * 255,
                                       "curve": [0, 5, 10, 20]}, attack)], 32, torch.device("cpu"))
    entry = metrics["attacks"]["df"]
    assert entry["kind"] == "minimal-norm" and entry["curve"]["eps"] == [0, 5, 10, 20]
    assert entry["curve"]["acc"][0] == pytest.approx(100.0)
    expected = [100.0 * float((found > e / 255).sum()) / len(y) for e in (0, 5, 10, 20)]
    assert entry["curve"]["acc"] == pytest.approx(expected)
    assert entry["curve"]["acc"] == sorted(entry["curve"]["acc"], reverse=True)
    assert entry["acc"] == pytest.approx(100.0 * float((found > 0.05).sum()) / len(y))


def test_autoattack_standard_on_the_linear_model(linear5_setup):
    """The standard version (APGD-CE, APGD-T, FAB-T, Square): its targeted attacks find the nearest class."""
    model, x, y, dist = linear5_setup
    eps = 0.06
    pick = torch.cat([torch.nonzero(dist < eps * 0.97).squeeze(1)[:3], torch.nonzero(dist > eps * 1.01).squeeze(1)[:2]])
    xs, ys, ds = x[pick], y[pick], dist[pick]
    attack = _make("autoattack", eps)
    with adversary_mode(model):
        x_adv = attack.perturb(model, xs, ys)
    check_adversary("autoattack", xs, x_adv, eps)
    with torch.no_grad():
        fooled = model(x_adv).argmax(1) != ys
    assert torch.equal(fooled, ds < eps)


def test_worst_case_is_per_sample_not_the_minimum_of_accuracies():
    a = torch.tensor([True, True, False, False])
    b = torch.tensor([False, True, True, False])
    entries = [{"label": "a", "eps": 8}, {"label": "b", "eps": 8}, {"label": "c", "eps": 16}]
    out = worst_case(entries, {"a": a, "b": b, "c": a}, 4)
    assert out["8"] == {"attacks": ["a", "b"], "acc": 25.0}  # min of accuracies would say 50
    assert out["16"]["acc"] == 50.0


# ------------------------------------------------------------------------------------------- cross-check

# The stated tolerance: at least 95% of the samples get adversarial examples within 1e-5 (Linf) of each other and
# the same prediction (measured on CPU: 100%). Both libraries take the same signed step of the same summed
# cross-entropy, project onto the ball and clip to [0, 1]; only float rounding can differ, and a gradient
# component that is exactly zero in one library and tiny in the other flips a sign and lets the paths diverge.
CROSS_TOLERANCE = 1e-5


@pytest.fixture
def lenet_batch():
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    model = registry.load("model", "lenet")(spectral_norm=False).build(10, (1, 8, 8)).eval()
    bunch = load_digits()
    x = torch.tensor(bunch.images[:48], dtype=torch.float32).div(16).unsqueeze(1)
    y = torch.tensor(bunch.target[:48])
    return model, x, y


def _agreement(model, a, b, y):
    diff = (a - b).flatten(1).abs().amax(1)
    with torch.no_grad():
        same_pred = model(a).argmax(1) == model(b).argmax(1)
    return float((diff <= CROSS_TOLERANCE).float().mean()), float(same_pred.float().mean())


def test_advertorch_and_foolbox_pgd_agree_without_random_start(lenet_batch):
    """From the same start (the clean image) both take the same signed steps: same examples, same verdicts."""
    model, x, y = lenet_batch
    eps, opts = to_unit(32), {"steps": 10, "step_size": 4.0, "random_start": False}
    with adversary_mode(model):
        a = _make("advertorch-pgd", eps, **opts).perturb(model, x, y)
        b = _make("foolbox-pgd", eps, **opts).perturb(model, x, y)
    close, same = _agreement(model, a, b, y)
    assert (a - x).abs().max() > to_unit(16), "the attack must actually move the images"
    assert close >= 0.95 and same >= 0.95, (close, same)


def test_advertorch_and_foolbox_pgd_agree_from_the_same_random_start(lenet_batch):
    """A random start injected into both libraries: advertorch's perturb_iterative(delta_init) and foolbox's LinfPGD
    with get_random_start returning the same point."""
    model, x, y = lenet_batch
    eps, step, steps = to_unit(32), to_unit(4), 10
    gen = torch.Generator().manual_seed(3)
    start = (x + (torch.rand(x.shape, generator=gen) * 2 - 1) * eps).clamp(0, 1)  # both libraries clip the start
    import_advertorch()
    from advertorch.attacks.iterative_projected_gradient import perturb_iterative

    fb = import_foolbox()
    import eagerpy as ep  # foolbox's tensor layer

    class FixedStart(fb.attacks.LinfPGD):
        def get_random_start(self, x0, epsilon):
            return ep.astensor(start)

    with adversary_mode(model):
        a = perturb_iterative(x, y, model, nb_iter=steps, eps=eps, eps_iter=step,
                              loss_fn=nn.CrossEntropyLoss(reduction="sum"), delta_init=(start - x).clone(),
                              clip_min=0.0, clip_max=1.0).detach()
        fmodel = fb.PyTorchModel(model, bounds=(0.0, 1.0))
        _, b, _ = FixedStart(abs_stepsize=step, steps=steps, random_start=True)(fmodel, x, y, epsilons=eps)
    close, same = _agreement(model, a, b, y)
    assert close >= 0.95 and same >= 0.95, (close, same)
    # and a different start gives visibly different examples: the injection is what made them agree
    with adversary_mode(model):
        c = _make("foolbox-pgd", eps, steps=steps, step_size=4.0, random_start=True).perturb(model, x, y)
    assert _agreement(model, a, c, y)[0] < 0.5
