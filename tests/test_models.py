"""Every registered model, in the style of timm's tests/test_models.py: a tiny batch, finite outputs, gradients
reaching every parameter, and spectral normalization that really bounds each weight's largest singular value.
Plus the architecture details of the paper's appendix A.2 and the `timm:<arch>` variant names."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from harness import registry, spec as spec_mod
from harness.errors import BadInput
from harness.spectral import normalized_layers

# Per model: options and a small input shape (None: the defaults and 3x32x32). Models registered by other
# installed packages are tested with their defaults.
CASES = {
    "lenet": ({}, (1, 28, 28)),
    "wrn50-2": ({}, (3, 16, 16)),  # any size works (no fixed pooling); 16x16 keeps the 69M-parameter net quick
    # timm's ResNets zero each block's last batch-norm scale by default, which blocks gradients at step one
    "timm": ({"arch": "resnet10t", "kwargs": {"zero_init_last": False}}, (3, 32, 32)),
}
EXTRA = {  # variant names, which discovery cannot list: one CNN, one transformer (only Linear layers)
    "timm:resnet10t": ({"kwargs": {"zero_init_last": False}}, (3, 32, 32)),
    "timm:vit_tiny_patch16_224": ({"kwargs": {"img_size": 32}}, (3, 32, 32)),
}
MODELS = sorted(registry.discover("model")) + sorted(EXTRA)
NUM_CLASSES = 7


def case(name):
    return {**CASES, **EXTRA}.get(name, ({}, (3, 32, 32)))


def largest_singular_value(w: torch.Tensor) -> float:
    """torch.linalg.matrix_norm(w, ord=2), computed through the eigenvalues of the smaller Gram matrix in float64
    (the same number, several times faster for WRN-50-2's 4608-wide matrices)."""
    w = w.double()
    gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    return float(torch.linalg.eigvalsh(gram)[-1].clamp(min=0).sqrt())


def build(name, spectral_norm=True):
    options, shape = case(name)
    torch.manual_seed(0)
    return registry.load("model", name)(**options, spectral_norm=spectral_norm).build(NUM_CLASSES, shape), shape


@pytest.fixture(scope="module", params=MODELS)
def built(request):
    """Each model built once (spectrally normalized) for the tests below; pytest groups the tests by it."""
    return build(request.param)


def test_forward_finite_and_gradients_reach_every_parameter(built):
    model, shape = built
    model.train()
    x = torch.rand(2, *shape)
    out = model(x)
    assert out.shape == (2, NUM_CLASSES)
    assert torch.isfinite(out).all()
    F.cross_entropy(out, torch.tensor([0, 3])).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not missing, f"no gradient reached: {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    model.zero_grad(set_to_none=True)


def test_spectral_norm_bounds_every_weight(built):
    model, shape = built
    layers = normalized_layers(model)
    convs_and_linears = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert layers and len(layers) == len(convs_and_linears), "every convolution and linear layer is normalized"
    model.train()
    with torch.no_grad():
        for _ in range(5):  # one power iteration per training forward (plus the 15 torch runs at registration)
            model(torch.rand(2, *shape))
    model.eval()
    with torch.no_grad():
        for layer_name, module in layers:
            w = module.weight
            sigma = largest_singular_value(w.reshape(w.shape[0], -1))
            # power iteration under-estimates sigma, so the normalized norm approaches 1 from above
            assert 1 - 1e-3 < sigma < 1.06, f"{layer_name}: largest singular value {sigma:.4f}"


@pytest.mark.parametrize("name", [n for n in MODELS if n != "timm:vit_tiny_patch16_224"])
def test_without_spectral_norm_nothing_is_normalized(name):
    model, shape = build(name, spectral_norm=False)
    assert normalized_layers(model) == []
    assert torch.isfinite(model(torch.rand(2, *shape))).all()


@pytest.mark.parametrize("name, convs", [("vgg16", 13), ("vgg19", 16)])
def test_vgg_as_in_appendix_a2(name, convs):
    torch.manual_seed(0)
    model = registry.load("model", name)(spectral_norm=False).build(100, (3, 32, 32))
    modules = list(model.modules())
    assert sum(isinstance(m, nn.Conv2d) for m in modules) == convs
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.Dropout)) for m in modules)
    linears = [m for m in modules if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 512), (512, 512), (512, 100)]
    for m in modules:  # orthogonal initialization: W W^T = I (rows orthonormal, as out <= in*k*k here)
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            w = m.weight.detach().reshape(m.weight.shape[0], -1)
            rows = min(w.shape)
            gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
            assert torch.allclose(gram, torch.eye(rows), atol=1e-4)


def test_wrn50_2_as_in_appendix_a2():
    model = registry.load("model", "wrn50-2")(spectral_norm=False).build(200, (3, 56, 56))
    assert (model.conv1.kernel_size, model.conv1.stride, model.conv1.padding) == ((3, 3), (1, 1), (1, 1))
    assert isinstance(model.maxpool, nn.Identity)
    assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]
    # widen factor 2: the 3x3 convolutions of the bottlenecks have [64, 128, 256, 512] x 2 channels
    assert [getattr(model, f"layer{i}")[0].conv2.out_channels for i in range(1, 5)] == [128, 256, 512, 1024]
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert not any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules())
    # Xavier uniform: bound sqrt(6 / (fan_in + fan_out)) and a variance near bound^2 / 3
    w = model.layer3[0].conv2.weight.detach()
    fan_in, fan_out = w.shape[1] * 9, w.shape[0] * 9
    bound = (6 / (fan_in + fan_out)) ** 0.5
    assert float(w.abs().max()) <= bound * (1 + 1e-6)
    assert float(w.var()) == pytest.approx(bound ** 2 / 3, rel=0.05)
    assert model(torch.rand(1, 3, 56, 56)).shape == (1, 200)


def test_timm_variant_fixes_arch_and_is_validated(tiny_spec):
    plugin = registry.load("model", "timm:resnet10t")
    w = torch.randn(30, 70)
    assert largest_singular_value(w) == pytest.approx(float(torch.linalg.matrix_norm(w, ord=2)), rel=1e-5)
    assert "arch" not in plugin.options_schema["properties"]
    assert plugin().arch == "resnet10t"
    info = registry.resolve("model", "timm:resnet10t")
    assert (info.name, info.distribution, info.target) == ("timm:resnet10t", "harness",
                                                          "harness_plugins.timm_models:TimmModel")
    tiny_spec["models"] = [{"name": "timm:resnet10t", "options": {"spectral_norm": True}}]
    resolved = spec_mod.validate(tiny_spec)
    assert resolved["models"][0]["options"] == {"spectral_norm": True, "kwargs": {}}
    tiny_spec["models"] = [{"name": "timm:resnet10t", "options": {"arch": "resnet18"}}]
    with pytest.raises(BadInput, match=r"\$\.models\[0\]\.options: unknown key 'arch'"):
        spec_mod.validate(tiny_spec)


def test_unknown_timm_arch_and_variant_of_a_plain_plugin():
    with pytest.raises(BadInput, match="timm has no architecture 'resnet181'. Did you mean 'resnet18"):
        registry.load("model", "timm:resnet181")
    with pytest.raises(BadInput, match="model 'lenet' has no variants"):
        registry.load("model", "lenet:big")
    with pytest.raises(BadInput, match="unknown model 'nosuch:thing'"):
        registry.load("model", "nosuch:thing")
    with pytest.raises(BadInput, match="timm has no architecture 'nope'"):
        registry.load("model", "timm")(arch="nope").build(10, (3, 32, 32))


@pytest.mark.parametrize("model, problem", [
    ({"name": "timm", "options": {"arch": "nope"}}, "timm has no architecture 'nope'"),
    ({"name": "timm:resnet10t", "options": {"kwargs": {"bogus": 1}}},
     "timm.create_model('resnet10t') rejected the options: ResNet.__init__() got an unexpected keyword argument 'bogus'"),
    ({"name": "timm:resnet10t", "options": {"kwargs": {"num_classes": 5}}},  # the harness passes the dataset's
     "kwargs num_classes: the harness sets this itself"),
    ({"name": "timm:vit_tiny_patch16_224", "options": {"kwargs": {"embed_dim": 100}}},  # 3 heads
     "timm.create_model('vit_tiny_patch16_224', **kwargs) fails: AssertionError: dim should be divisible by num_heads"),
    ({"name": "timm:vit_tiny_patch16_224", "options": {"kwargs": {"embed_dim": 96000}}},
     "timm's vit_tiny_patch16_224 with these kwargs has 1,327,212,960,010 parameters, over the 2,000,000,000"),
])
def test_validate_refuses_timm_options_that_run_could_not_build(write_spec, tiny_spec, model, problem):
    """validate builds the timm model on the meta device (no memory): what timm refuses, or a model too large to
    train, is refused at the model's options path, exit 2, instead of failing once the run builds it."""
    from conftest import invoke

    tiny_spec["models"] = [{"name": "lenet"}, model]
    result = invoke("validate", write_spec(tiny_spec))
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "$.models[1].options: " + problem in " ".join(result.output.split()), result.output


def test_timm_variant_runs_through_a_spec(tmp_path):
    from rich.console import Console

    from harness.report import validate_report
    from harness.runner import run

    spec = spec_mod.validate({
        "name": "timm-variant", "device": "cpu",
        "dataset": {"name": "synthetic", "options": {"shape": [3, 16, 16], "num_classes": 4, "train_size": 16,
                                                     "test_size": 8}},
        "models": [{"name": "timm:resnet10t"}],  # no label: the default must be a safe file name
        "defense": {"name": "pgd-at", "strengths": [8], "options": {"steps": 1}},
        "training": {"epochs": 1, "batch_size": 8, "lr": 0.01},
        "evaluation": {"batch_size": 8, "attacks": [{"name": "foolbox-pgd", "eps": 8, "options": {"steps": 1}}]},
        # bf16 on CPU: layer4's stride-2 conv sees a 1x1 map here, where oneDNN's bf16 weight gradient is
        # garbage (it made this test fail with NaN losses about every other run); the cell must fall back to fp32
        "performance": {"precision": "bf16"},
    })
    report = run(spec, tmp_path, Console(quiet=True))
    validate_report(report)
    assert report["cells"][0]["status"] == "done" and "paper" not in report["cells"][0], report["cells"][0].get("error")
    performance = report["cells"][0]["performance"]
    assert performance["precision"] == "fp32" and "layer4.0.conv1 (stride 2x2 on 1x1)" in performance["note"]
    assert report["cells"][0]["id"] == "timm-resnet10t__s8" and (tmp_path / "cells" / "timm-resnet10t__s8.json").exists()
    provenance = {(p["kind"], p["name"]): p["target"] for p in report["environment"]["plugins"]}
    assert provenance[("model", "timm:resnet10t")] == "harness_plugins.timm_models:TimmModel"
