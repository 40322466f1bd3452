"""Operator-norm products only where they bound something (issue 11, section 5): harness.spectral.lipschitz_bound
composes an L2 Lipschitz bound over the network's graph. For a plain chain (LeNet) it is the product of the layers'
norms; for a residual network with batch norm it adds the branches of every sum and counts batch norm's scale; and
it is "not computed", with the reason, where it has no rule. Every computed bound is checked against the measured
growth of the network: ||f(x + d) - f(x)|| / ||d|| over random pairs and the local Jacobian norm ||J(x)||."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from harness import registry
from harness.plugin import adversary_mode
from harness.spectral import apply_spectral_norm, layer_norms, lipschitz_bound


def digits_batch(shape, n=16):
    data = registry.load("dataset", "digits")().load(None, False)
    x = data.train.images[:n].float()
    x = x / 255.0 if data.train.images.dtype == torch.uint8 else x
    if x.shape[1:] != shape:
        x = torch.nn.functional.interpolate(x, size=shape[1:], mode="bilinear").repeat(1, shape[0], 1, 1)
    return x


def measured_growth(model, x, pairs=8, jacobian_iterations=30):
    """The largest ||f(x + d) - f(x)|| / ||d|| over random pairs around the samples, and the largest local
    Jacobian norm ||J(x)|| found by power iteration (a lower estimate of the Lipschitz constant: the bound must
    exceed both)."""
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    with torch.no_grad():
        for scale in (1e-3, 0.1, 1.0):
            for _ in range(pairs):
                d = torch.randn(x.shape, generator=g) * scale
                ratio = (model(x + d) - model(x)).flatten(1).norm(dim=1) / d.flatten(1).norm(dim=1)
                worst = max(worst, float(ratio.max()))
    jac = 0.0
    for sample in x[:4]:
        v = torch.randn(sample[None].shape, generator=g)
        for _ in range(jacobian_iterations):
            v = v / v.norm()
            _, jv = torch.autograd.functional.jvp(model, sample[None], v)
            _, jtjv = torch.autograd.functional.vjp(model, sample[None], jv)
            v = jtjv
        jac = max(jac, float(jv.norm()))
    return worst, jac


def test_plain_chain_bound_is_the_product_and_holds():
    torch.manual_seed(0)
    shape = (1, 8, 8)
    model = registry.load("model", "lenet")(spectral_norm=True).build(10, shape)
    result = layer_norms(model, shape, "cpu", iterations=300)
    lipschitz = result["lipschitz"]
    assert lipschitz["structure"] == "chain"
    assert lipschitz["bound"] == pytest.approx(result["product_operator_norm"], rel=1e-12)
    model.eval()
    ratio, jacobian = measured_growth(model, digits_batch(shape))
    assert 0 < ratio <= lipschitz["bound"] and jacobian <= lipschitz["bound"]


class Block(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)), the shortcut a strided 1x1 conv + BN or the identity."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def small_resnet():
    torch.manual_seed(0)
    model = apply_spectral_norm(nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        Block(8, 8, 1), Block(8, 16, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)))
    for m in model.modules():  # running statistics and scales far from 1, as after training
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.05, 2.0)
            nn.init.uniform_(m.weight, -2, 2)
    return model


def test_residual_network_gets_a_composed_bound_that_holds():
    model = small_resnet()
    shape = (1, 8, 8)
    result = layer_norms(model, shape, "cpu", iterations=300)
    lipschitz = result["lipschitz"]
    assert lipschitz["structure"] == "branching" and lipschitz["bound"] is not None
    model.eval()
    ratio, jacobian = measured_growth(model, digits_batch(shape))
    assert 0 < ratio <= lipschitz["bound"] and jacobian <= lipschitz["bound"]

    # by hand: each block x -> relu(F(x) + S(x)) contributes ||F|| + ||S|| (||S|| = 1 for the identity)
    norms = {la["name"]: la["operator_norm"] for la in result["layers"]}

    def scale(bn):
        return float((bn.weight.detach().double().abs() / torch.sqrt(bn.running_var.double() + bn.eps)).max())

    expected = norms["0"] * scale(model[1])
    for i in (3, 4):
        b = model[i]
        branch = norms[f"{i}.conv1"] * scale(b.bn1) * norms[f"{i}.conv2"] * scale(b.bn2)
        short = 1.0 if isinstance(b.shortcut, nn.Identity) else norms[f"{i}.shortcut.0"] * scale(b.shortcut[1])
        expected *= branch + short
    expected *= 1 / 4 * norms["7"]  # the average over a 4x4 map has norm 1/sqrt(16)
    assert lipschitz["bound"] == pytest.approx(expected, rel=1e-9)


def test_the_bare_product_bounds_nothing_for_a_residual_block():
    """x -> relu(x + F(x)) with a weak branch F: the product of the layer norms is tiny, the network's growth is not
    (the skip carries the input through). The composed bound (1 + ||F||) holds."""
    torch.manual_seed(0)
    model = nn.Sequential(Block(1, 1, 1), nn.Flatten()).eval()
    with torch.no_grad():
        for conv in (model[0].conv1, model[0].conv2):
            conv.weight.mul_(0.01)
    result = layer_norms(model, (1, 8, 8), "cpu", iterations=300)
    ratio, jacobian = measured_growth(model, digits_batch((1, 8, 8)))
    assert result["product_operator_norm"] < 0.01 * ratio  # not a bound
    assert result["lipschitz"]["structure"] == "branching"
    assert max(ratio, jacobian) <= result["lipschitz"]["bound"] <= 1.01


def test_timm_resnet_is_recognised_as_branching():
    """The harness's own residual models (timm ResNets, the WRN-50-2 family) are never treated as chains."""
    model = registry.load("model", "timm:resnet18")(spectral_norm=True).build(10, (3, 16, 16))
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with adversary_mode(model):
        lipschitz = lipschitz_bound(model, (3, 16, 16), "cpu", {n: 1.0 for n in names})
    assert lipschitz["structure"] == "branching"
    assert lipschitz["bound"] > 1.0  # unit layer norms: a chain would give 1 x the BN scales; sums add up


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.a(x) * self.b(x)  # a product of two branches: no Lipschitz rule (it is not globally Lipschitz)


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x):
        return self.a(x) if x.sum() > 0 else -self.a(x)  # data-dependent control flow: cannot be traced


@pytest.mark.parametrize("model, reason", [(Gated(), "no Lipschitz rule for the operation mul"),
                                           (Branchy(), "could not be traced"),
                                           (nn.Sequential(nn.Linear(4, 4), nn.PReLU()), "no Lipschitz rule for "
                                                                                        "layer 1 (PReLU)")])
def test_not_computed_says_why(model, reason):
    with adversary_mode(model):
        result = lipschitz_bound(model, (4,), "cpu", {"a": 1.0, "b": 1.0, "0": 1.0})
    assert result["bound"] is None and result["structure"] is None
    assert result["detail"].startswith("not computed") and reason in result["detail"]


def test_max_pool_overlap_and_average_pool_factors():
    """Overlapping max pools may count an input in several windows (3x3 windows at stride 2: up to 4, so a factor
    of 2); average pooling with stride 1 is a contraction; non-overlapping max pooling is 1-Lipschitz."""
    for pool, shape, factor in [(nn.MaxPool2d(3, 2, padding=1), (2, 9, 9), 2.0),
                                (nn.AvgPool2d(3, 1, padding=1), (2, 6, 6), 1.0), (nn.MaxPool2d(2), (2, 8, 8), 1.0)]:
        model = nn.Sequential(nn.Conv2d(2, 2, 1, bias=False), pool, nn.Flatten())
        conv = float(torch.linalg.matrix_norm(model[0].weight.detach().reshape(2, 2), ord=2))
        with adversary_mode(model):
            result = lipschitz_bound(model, shape, "cpu", {"0": conv})
        assert result["bound"] == pytest.approx(conv * factor, rel=1e-9)
        x = torch.randn(64, *shape, generator=torch.Generator().manual_seed(1))
        d = torch.randn(64, *shape, generator=torch.Generator().manual_seed(2)) * 0.05
        with torch.no_grad():
            ratio = float(((model(x + d) - model(x)).flatten(1).norm(dim=1) / d.flatten(1).norm(dim=1)).max())
        assert ratio <= result["bound"]


def test_the_analysis_table_shows_the_bound_never_the_bare_product():
    from io import StringIO

    from rich.console import Console

    from harness.analysis import render_analysis_table

    model = nn.Sequential(Block(1, 1, 1), nn.Flatten())
    with torch.no_grad():
        for conv in (model[0].conv1, model[0].conv2):
            conv.weight.mul_(0.01)
    spectral = layer_norms(model, (1, 8, 8), "cpu", iterations=100)
    summary = {"n": 1, "mean": 0.5, "min": 0.5, "q05": 0.5, "q25": 0.5, "median": 0.5, "q75": 0.5, "q95": 0.5,
               "max": 0.5}
    analysis = {"eps": 8, "gamma": 1.0, "loss_variation": summary, "margin_in_ball": summary, "robust": 1,
                "correct": 1, "u_min": 0.5, "bound_first_term": 1.0, "ramp": {"ge": 0.0}, "spectral": spectral}
    unbounded = dict(analysis, spectral=dict(spectral, lipschitz={"bound": None, "structure": None,
                                                                  "detail": "not computed: a reason"}))
    report = {"cells": [{"status": "done", "model": "res", "strength": 0, "analysis": analysis},
                        {"status": "done", "model": "res", "strength": 8, "analysis": unbounded}]}
    out = StringIO()
    render_analysis_table(report, Console(file=out, width=200))
    text = out.getvalue()
    row = next(line for line in text.splitlines() if "L2 Lip. bound" in line)
    assert f"{spectral['lipschitz']['bound']:.3g}" in row and "—" in row
    assert f"{spectral['product_operator_norm']:.3g}" not in text
    assert "L2 Lip. bound of res: not computed: a reason" in text
