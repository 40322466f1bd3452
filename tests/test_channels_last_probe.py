"""channels_last is probed per model: a third-party model written for NCHW (advertorch's LeNet5 calls
`out.view(n, -1)` after its last convolution, which fails on an NHWC tensor) trains in NCHW, says so and records it,
instead of exiting 1 with a traceback (issue 14)."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from torch import nn

from conftest import invoke
from harness import registry
from harness.performance import Performance, channels_last_failure

CPU = torch.device("cpu")
FORCED = {"precision": "fp32", "channels_last": True}

# A third party's model plugin whose network is advertorch's own LeNet5 (28x28 inputs, 10 classes), unchanged.
PLUGIN = '''
from harness.plugin import ModelPlugin


class AdvertorchLeNet5(ModelPlugin):
    options_schema = {"type": "object", "additionalProperties": False, "properties": {}}

    def __init__(self):
        pass

    def build(self, num_classes, input_shape):
        from harness.compat import import_advertorch

        import_advertorch()  # advertorch 0.2.3 imports a function torch removed; the harness's shim restores it
        from advertorch.test_utils import LeNet5

        return LeNet5()


class BracketNet(ModelPlugin):
    """Fails on an NHWC activation with a message full of square brackets (rich markup, if printed as such)."""

    options_schema = {"type": "object", "additionalProperties": False, "properties": {}}

    def __init__(self):
        pass

    def build(self, num_classes, input_shape):
        import torch
        from torch import nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv, self.fc = nn.Conv2d(input_shape[0], 4, 3, padding=1), nn.Linear(4, num_classes)

            def forward(self, x):
                h = torch.relu(self.conv(x))
                if not h.is_contiguous():
                    raise RuntimeError("expected [N, C, H, W] in [bold]NCHW[/bold], got strides [/x]")
                return self.fc(h.mean((2, 3)))

        return Net()
'''


@pytest.fixture
def lenet5_plugin(tmp_path, monkeypatch):
    site = tmp_path / "site"
    (site / "lenet5_plugin-0.1.dist-info").mkdir(parents=True)
    (site / "lenet5_plugin.py").write_text(PLUGIN)
    (site / "lenet5_plugin-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: lenet5-plugin\n"
                                                                  "Version: 0.1\n")
    (site / "lenet5_plugin-0.1.dist-info" / "entry_points.txt").write_text(
        "[harness.models]\nadvertorch-lenet5 = lenet5_plugin:AdvertorchLeNet5\nbracket-net = lenet5_plugin:BracketNet\n")
    monkeypatch.syspath_prepend(str(site))
    yield site
    sys.modules.pop("lenet5_plugin", None)


class FlattensByView(nn.Module):
    """The pattern that breaks: `.view` on a convolution's output (NHWC strides after channels_last)."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        return self.fc(h.view(h.size(0), -1))


class BrokenInAnyLayout(FlattensByView):
    def forward(self, x):
        raise ValueError("this model is broken whatever the layout")


def test_a_model_that_fails_in_channels_last_falls_back_to_nchw_and_says_why():
    model = FlattensByView().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    expected_draw = torch.rand(4)
    torch.manual_seed(0)
    resolved = Performance.from_spec(FORCED, CPU).for_model(model, (1, 8, 8))
    assert torch.equal(torch.rand(4), expected_draw)  # the probe drew nothing from the cell's RNG stream
    assert not resolved.channels_last and resolved.precision == "fp32"
    assert "NCHW, not channels_last" in resolved.note and "view size is not compatible" in resolved.note
    assert resolved.describe()["channels_last"] is False and resolved.describe()["note"] == resolved.note
    # the model itself is untouched: same values, NCHW parameters, no gradients, still in training mode
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model.conv.weight.is_contiguous() and model.conv.weight.grad is None and model.training


def test_models_that_run_in_channels_last_keep_it_and_broken_models_are_not_blamed_on_the_layout():
    lenet = registry.load("model", "lenet")(spectral_norm=True).build(10, (1, 8, 8))
    forced = Performance.from_spec(FORCED, CPU)
    assert channels_last_failure(lenet, (1, 8, 8), forced) is None
    assert forced.for_model(lenet, (1, 8, 8)) is forced
    # fails in NCHW too: not a layout problem, so nothing changes and training reports the model's own error
    assert forced.for_model(BrokenInAnyLayout(), (1, 8, 8)) is forced
    # NCHW asked for: no probe, nothing to change
    nchw = Performance.from_spec({"precision": "fp32", "channels_last": False}, CPU)
    assert nchw.for_model(FlattensByView(), (1, 8, 8)) is nchw


def test_advertorch_lenet5_forced_to_channels_last_runs_in_nchw_and_the_cell_records_it(lenet5_plugin, write_spec,
                                                                                          tmp_path):
    spec = {
        "name": "lenet5_nhwc", "seed": 0, "device": "cpu",
        "dataset": {"name": "digits", "options": {"resize": 28}, "max_train": 64, "max_test": 32},
        "models": [{"name": "advertorch-lenet5"}],
        "defense": {"name": "pgd-at", "strengths": [16], "options": {"steps": 1, "step_size": 16}},
        "training": {"epochs": 1, "batch_size": 32, "lr": 0.05},
        "evaluation": {"batch_size": 32,
                       "attacks": [{"name": "foolbox-pgd", "eps": 16, "options": {"steps": 1, "step_size": 16}}]},
        "performance": FORCED,
    }
    out = tmp_path / "out"
    result = invoke("run", write_spec(spec), "--out", out)
    assert result.exit_code == 0, result.output
    assert "NCHW, not channels_last" in result.output  # said in the terminal
    cell = json.loads((out / "report.json").read_text())["cells"][0]
    assert cell["status"] == "done"
    assert cell["performance"]["channels_last"] is False
    assert "view size is not compatible" in cell["performance"]["note"]


def test_the_note_is_printed_as_text_whatever_the_models_error_says(lenet5_plugin, write_spec, tiny_spec, tmp_path):
    tiny_spec["models"] = [{"name": "bracket-net"}]
    tiny_spec["defense"]["strengths"] = [0]
    tiny_spec["performance"] = FORCED
    tiny_spec["evaluation"]["checks"] = {"enabled": False}
    result = invoke("run", write_spec(tiny_spec), "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    printed = " ".join(result.output.split())  # the console wraps long lines
    assert "expected [N, C, H, W] in [bold]NCHW[/bold], got strides [/x]" in printed
