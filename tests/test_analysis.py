"""The analysis's math against closed forms: a linear 2-class model (margin, worst case in an Linf ball, loss
variation), explicitly built convolution matrices (operator norms), and the paper's ramp loss and bound."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from harness import registry
from harness.analysis import analyze, bound_first_term, margins, ramp_loss, search_ball, summarize
from harness.plugin import DataSplits, Split, adversary_mode, to_unit
from harness.spectral import layer_norms, matrix_sigma, operator_norm

EPS = 8.0  # 0-255 scale


def linear_setup(n=200, side=4, seed=0):
    """logits = W x + b on flattened 1 x side x side images in [0.25, 0.75]: the eps-ball's corners stay inside
    [0, 1], so the worst case of the margin is exactly M(x) - eps ||w_y - w_j||_1."""
    gen = torch.Generator().manual_seed(seed)
    d = side * side
    model = nn.Sequential(nn.Flatten(), nn.Linear(d, 2))
    x = 0.25 + 0.5 * torch.rand((n, 1, side, side), generator=gen)
    with torch.no_grad():
        model[1].weight.copy_(torch.randn((2, d), generator=gen))
        raw = x.flatten(1) @ (model[1].weight[0] - model[1].weight[1])
        middle = raw.sort().values[n // 2 - 1:n // 2 + 1].mean()  # halfway between two samples: none has M = 0
        model[1].bias.copy_(torch.tensor([-float(middle), 0.0]))  # margins on both sides of 0
        logits = model(x)
    y = logits.argmax(1)
    y[:10] = 1 - y[:10]  # a few misclassified samples
    return model, x, y


def closed_forms(model, x, y, eps):
    w, b = model[1].weight.detach(), model[1].bias.detach()
    sign = (1 - 2 * y).float()  # +1 for y = 0, -1 for y = 1
    diff = sign[:, None] * (w[0] - w[1])  # w_y - w_j per sample
    margin = (x.flatten(1) * diff).sum(1) + sign * (b[0] - b[1])
    worst = margin - eps * diff.abs().sum(1)
    return margin, worst


def test_margin_operator_and_ramp_loss_by_hand():
    logits = torch.tensor([[1.0, 3.0, 2.0], [5.0, -1.0, 5.0], [0.0, 0.0, 4.0]])
    assert margins(logits, torch.tensor([1, 0, 2])).tolist() == [1.0, 0.0, 4.0]
    assert margins(logits, torch.tensor([0, 1, 0])).tolist() == [-2.0, -6.0, -4.0]
    # Definition 5 on r = -M: 1 for M < 0, 1 - M/gamma on [0, gamma], 0 above gamma
    assert ramp_loss(torch.tensor([-3.0, 0.0, 1.0, 2.0, 5.0]), gamma=2.0).tolist() == [1.0, 1.0, 0.5, 0.0, 0.0]
    assert bound_first_term(0.5, 2.0) == pytest.approx(1.5)
    assert bound_first_term(3.0, 2.0) == 0.0
    assert bound_first_term(None, 1.0) is None
    s = summarize(torch.arange(101.0))
    assert (s["n"], s["min"], s["median"], s["q95"], s["max"], s["mean"]) == (101, 0, 50, 95, 100, 50)
    assert summarize(torch.zeros(0))["max"] is None


def test_ball_search_reaches_the_linear_models_worst_case():
    model, x, y = linear_setup()
    eps = to_unit(EPS)
    margin, worst = closed_forms(model, x, y, eps)
    with torch.no_grad():
        assert torch.allclose(margins(model(x), y), margin, atol=1e-5)
    correct = margin > 0
    # sign steps of eps/4 reach the worst corner x - eps sign(w_y - w_j) in 4 of the 10 steps
    u, variation = search_ball(model, x[correct], y[correct], eps, steps=10, step_size=eps / 4)
    assert torch.allclose(u, worst[correct], atol=1e-5)
    robust = worst[correct] > 0
    assert 10 < int(robust.sum()) < int(correct.sum()) - 10, "the setup must hold robust and non-robust samples"
    # 2 classes: CE = softplus(-M). Robust: the worst still-correct point is the corner.
    m0, mw = margin[correct], worst[correct]
    exact = F.softplus(-mw) - F.softplus(-m0)
    assert torch.allclose(variation[robust], exact[robust], atol=1e-5)
    # Not robust: still-correct points have M > 0, so CE < log 2; the search never exceeds that, nor the corner's
    bound = math.log(2) - F.softplus(-m0)
    assert (variation[~robust] <= bound[~robust] + 1e-6).all()
    assert (variation[~robust] >= 0).all() and (variation[~robust] > 0).any()


def test_analyze_on_a_linear_model_matches_closed_forms():
    model, x, y = linear_setup(n=120, seed=1)
    data = DataSplits(train=Split(x, y), test=Split(x[:40], y[:40]), num_classes=2, input_shape=(1, 4, 4))
    gamma = 0.7
    options = {"eps": EPS, "gamma": gamma, "max_train": None, "steps": 10, "step_size": EPS / 4,
               "power_iterations": 50}
    result = analyze(model, data, options, batch_size=50, device=torch.device("cpu"))
    margin, worst = closed_forms(model, x, y, to_unit(EPS))
    correct = margin > 0
    u = worst[correct]
    assert result["correct"] == int(correct.sum()) and result["robust"] == int((u > 0).sum())
    assert result["u_min"] == pytest.approx(float(u[u > 0].min()), abs=1e-5)
    assert result["u_min_all"] == pytest.approx(float(u.min()), abs=1e-5)
    assert result["bound_first_term"] == pytest.approx(max(0.0, 2 * (1 - float(u[u > 0].min()) / gamma)), abs=1e-4)
    assert result["ramp"]["train"] == pytest.approx(float((1 - margin / gamma).clamp(0, 1).mean()), abs=1e-6)
    assert result["ramp"]["ge"] == pytest.approx(result["ramp"]["test"] - result["ramp"]["train"])
    assert result["margins"]["train"]["max"] == pytest.approx(float(margin.max()), abs=1e-5)
    (layer,) = result["spectral"]["layers"]
    sigma = float(torch.linalg.svdvals(model[1].weight.detach().double())[0])
    assert layer["matrix_sigma"] == pytest.approx(sigma) and layer["operator_norm"] == pytest.approx(sigma)
    assert result["spectral"]["product_operator_norm"] == pytest.approx(sigma)


def explicit_matrix(conv: nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    """The convolution's linear part as a matrix: its columns are the conv applied to the basis vectors."""
    n = math.prod(shape[1:])
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *shape[1:])
    with torch.no_grad():
        conv = conv.double()
        columns = conv(basis) - conv(torch.zeros((1, *shape[1:]), dtype=torch.float64))
        conv.float()
    return columns.reshape(n, -1).T


@pytest.mark.parametrize("conv, shape", [
    (nn.Conv2d(2, 3, 3, padding=1), (1, 2, 5, 5)),
    (nn.Conv2d(2, 4, 3, stride=2, padding=1), (1, 2, 6, 6)),
    (nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular"), (1, 2, 4, 4)),
])
def test_conv_operator_norm_is_the_largest_singular_value_of_its_matrix(conv, shape):
    torch.manual_seed(0)
    conv.reset_parameters()
    with adversary_mode(conv):
        estimate = operator_norm(conv, shape, iterations=400, tol=1e-9)
    exact = float(torch.linalg.matrix_norm(explicit_matrix(conv, shape), ord=2))
    assert estimate == pytest.approx(exact, rel=1e-3)
    # the reshaped kernel's sigma is a different (smaller) number: mixing them up would fail the line above
    assert matrix_sigma(conv) < 0.95 * exact


def test_lenet_layer_norms_record_shapes_and_bound_the_kernel_sigma():
    torch.manual_seed(0)
    model = registry.load("model", "lenet")(spectral_norm=True).build(10, (1, 8, 8))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        result = layer_norms(model, (1, 8, 8), "cpu", iterations=100)
        assert torch.get_num_threads() == 2  # restored after the single-threaded power iteration
    finally:
        torch.set_num_threads(threads)
    layers = result["layers"]
    assert [layer["input_shape"] for layer in layers] == [[1, 8, 8], [32, 4, 4], [256], [1024]]
    assert all(layer["normalized"] for layer in layers)
    for layer in layers:  # what spectral normalization controls: close to 1 right after its initial iterations
        assert layer["matrix_sigma"] == pytest.approx(1.0, abs=0.05)
        # the map restricted to one full patch is the reshaped kernel, so the operator norm cannot be smaller
        assert layer["operator_norm"] >= layer["matrix_sigma"] * (1 - 1e-3)
    assert layers[0]["operator_norm"] > 1.5  # a 5x5 convolution reuses its kernel: it amplifies despite SN
    assert result["product_operator_norm"] == pytest.approx(math.prod(la["operator_norm"] for la in layers))
    assert all(p.requires_grad for p in model.parameters()) and model.training


def test_spec_analysis_section_defaults_and_errors(tiny_spec):
    from harness import spec as spec_mod
    from harness.analysis import analyze_cell, resolve_options
    from harness.errors import BadInput

    resolved = spec_mod.validate(tiny_spec)
    assert resolved["analysis"] == {"enabled": True, "eps": None, "gamma": 1.0, "max_train": 1000, "steps": 10,
                                    "step_size": None, "power_iterations": 100}
    options = resolve_options(resolved["analysis"], resolved)
    assert options["eps"] == 32 and options["step_size"] == pytest.approx(8.0)  # the first attack's eps; 2.5 eps/steps
    tiny_spec["analysis"] = {"gamma": 0, "stepz": 3}
    with pytest.raises(BadInput) as info:
        spec_mod.validate(tiny_spec)
    assert "$.analysis.gamma" in info.value.message and "did you mean 'steps'" in info.value.message
    tiny_spec["analysis"] = {"enabled": False}
    model, x, y = linear_setup(n=8)
    data = DataSplits(train=Split(x, y), test=Split(x, y), num_classes=2, input_shape=(1, 4, 4))
    assert analyze_cell(model, data, spec_mod.validate(tiny_spec), torch.device("cpu")) is None
