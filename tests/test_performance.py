"""The fast path's options: resolution per device, bf16 autocast (exercised on CPU, the same code path as CUDA),
channels_last, and the soundness check of bf16: its adversaries fool the model as often as fp32 ones."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from harness import registry, spec as spec_mod
from harness.performance import BF16_ASR_TOLERANCE_PP, Performance, Runtime
from harness.plugin import DefensePlugin, to_unit
from harness.runner import load_data, seed_everything
from harness.train import train

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU


@pytest.mark.parametrize("native", [False, True])
def test_auto_resolves_to_the_fastest_sound_setting_per_device(monkeypatch, native):
    """bf16 (and with it channels_last) wherever the device computes bf16 natively; fp32 NCHW on a CPU without."""
    monkeypatch.setattr("harness.performance.native_bf16", lambda device: native)
    cpu = Performance.from_spec({}, CPU)
    expected = ("bf16", True) if native else ("fp32", False)
    assert (cpu.precision, cpu.channels_last, cpu.data_on_device, cpu.compile) == (*expected, False, False)
    assert cpu.autocast_dtype is (torch.bfloat16 if native else None)
    gpu = Performance.from_spec({}, CUDA)
    assert (gpu.precision, gpu.channels_last, gpu.data_on_device, gpu.tf32) == (expected[0], True, True, True)
    forced = Performance.from_spec({"precision": "bf16", "channels_last": True, "data_on_device": True}, CPU)
    assert forced.precision == "bf16" and forced.channels_last
    assert not forced.data_on_device  # the data is already where the CPU computes
    pinned = Performance.from_spec({"precision": "fp32"}, CPU)
    assert (pinned.precision, pinned.channels_last) == ("fp32", False)  # NCHW follows fp32 on CPU
    assert Performance.from_spec({"precision": "fp32", "channels_last": False}, CUDA).describe()["precision"] == "fp32"


def test_bf16_falls_back_to_fp32_on_cpu_for_convolutions_striding_past_their_input():
    """oneDNN's bf16 weight gradient is garbage when a conv's stride exceeds its input (harness.performance)."""
    from torch import nn

    from harness.performance import cpu_bf16_conv_hazards

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.MaxPool2d(4),  # 4x4 -> 1x1
                          nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.Flatten(), nn.Linear(8, 2))
    assert cpu_bf16_conv_hazards(model, (3, 4, 4)) == ["2 (stride 2x2 on 1x1)"]
    assert cpu_bf16_conv_hazards(model, (3, 8, 8)) == []  # 2x2 maps: stride 2 does not exceed them
    model.train()
    bf16 = Performance.from_spec({"precision": "bf16", "channels_last": True}, CPU)
    safe = bf16.for_model(model, (3, 4, 4))
    assert (safe.precision, safe.channels_last) == ("fp32", False) and "2 (stride 2x2 on 1x1)" in safe.note
    assert safe.describe()["note"] == safe.note and model.training  # the probe left the mode as it was
    assert bf16.for_model(model, (3, 8, 8)) is bf16
    assert Performance.from_spec({"precision": "bf16"}, CUDA).for_model(model, (3, 4, 4)).precision == "bf16"


@pytest.mark.parametrize("name, shape", [("lenet", (1, 28, 28)), ("lenet", (1, 8, 8)), ("vgg16", (3, 32, 32)),
                                         ("vgg19", (3, 32, 32)), ("wrn50-2", (3, 64, 64))])
def test_the_papers_models_keep_bf16(name, shape):
    from harness.performance import cpu_bf16_conv_hazards

    model = registry.load("model", name)(spectral_norm=True).build(10, shape)
    assert cpu_bf16_conv_hazards(model, shape) == []


def test_spec_section_is_validated_and_defaulted(tiny_spec):
    resolved = spec_mod.validate(tiny_spec)
    assert resolved["performance"] == {"precision": "auto", "channels_last": "auto", "data_on_device": "auto",
                                       "compile": False, "tf32": True, "eval_tf32": False}
    tiny_spec["performance"] = {"precision": "fp16"}
    with pytest.raises(Exception, match=r"\$\.performance\.precision"):
        spec_mod.validate(tiny_spec)


class _Recorder(DefensePlugin):
    """Plain cross-entropy that records the dtype the model computed in."""

    def loss(self, model, x, y):
        logits = model(x)
        self.dtypes.append(logits.dtype)
        return F.cross_entropy(logits, y)


@pytest.fixture
def digits(tiny_spec):
    tiny_spec["dataset"]["max_train"] = 512
    tiny_spec["dataset"]["max_test"] = 200
    spec = spec_mod.validate(tiny_spec)
    return spec, load_data(spec)


def _model(data, seed=0):
    seed_everything(seed)
    return registry.load("model", "lenet")(spectral_norm=True).build(data.num_classes, data.input_shape)


def test_bf16_training_runs_in_bf16_keeps_fp32_weights_and_learns(digits):
    spec, data = digits
    model, defense = _model(data), _Recorder(eps=0.0)
    defense.dtypes = []
    runtime = Runtime(Performance.from_spec({"precision": "bf16", "channels_last": True}, CPU))
    runtime.performance.prepare_model(model)
    cfg = dict(spec["training"], epochs=3, batch_size=32)
    history = train(model, defense, data, cfg, CPU, seed=0, runtime=runtime)
    assert set(defense.dtypes) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert history[-1]["train_objective"] < 0.8 * history[0]["train_objective"]


def test_channels_last_changes_layout_not_results(digits):
    spec, data = digits
    cfg = dict(spec["training"], epochs=1, batch_size=64, max_batches=3)
    defense = registry.load("defense", "pgd-at")(eps=to_unit(16), steps=2, step_size=8.0, random_start=False)
    plain, nhwc = _model(data), _model(data)
    runtime = Runtime(Performance.from_spec({"precision": "fp32", "channels_last": True}, CPU))
    runtime.performance.prepare_model(nhwc)
    assert nhwc[0].parametrizations.weight.original.is_contiguous(memory_format=torch.channels_last)
    train(plain, defense, data, cfg, CPU, seed=0)
    train(nhwc, defense, data, cfg, CPU, seed=0, runtime=runtime)
    for a, b in zip(plain.parameters(), nhwc.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_bf16_adversaries_succeed_as_often_as_fp32(digits):
    """The soundness condition for bf16 as a default: the attack success rate stays within the stated tolerance."""
    spec, data = digits
    model = _model(data)
    train(model, registry.load("defense", "none")(eps=0.0), data, dict(spec["training"], epochs=4, batch_size=32),
          CPU, seed=0)
    model.eval()
    x, y = data.test.images, data.test.labels
    with torch.no_grad():
        ok = model(x).argmax(1) == y
    assert ok.sum() >= 100, "the model must classify enough samples to attack"
    attack = registry.load("defense", "pgd-at")(eps=to_unit(32), steps=10, step_size=8.0, random_start=False)
    rates, fooled = {}, {}
    for precision in ("fp32", "bf16"):
        with Performance.from_spec({"precision": precision}, CPU).autocast():
            x_adv = attack.adversary(model, x[ok], y[ok])
        with torch.no_grad():  # judged in fp32 either way, as evaluation is
            fooled[precision] = model(x_adv).argmax(1) != y[ok]
        rates[precision] = 100.0 * float(fooled[precision].float().mean())
    assert 10.0 < rates["fp32"] < 95.0, rates  # a real attack, not a trivial 0% or 100%
    assert abs(rates["bf16"] - rates["fp32"]) <= BF16_ASR_TOLERANCE_PP, rates
    assert float((fooled["bf16"] == fooled["fp32"]).float().mean()) >= 0.95
