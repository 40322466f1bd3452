"""`harness selftest`: the whole command on CPU passes and writes its JSON; a real breakage of the component a check
guards makes that check fail and the command exit 1; --device cuda without CUDA is bad input."""

from __future__ import annotations

import json

import pytest
import torch

from harness import checkpoint, selftest
from harness.performance import BF16_ASR_TOLERANCE_PP, Performance
from conftest import invoke

NAMES = [name for name, _ in selftest.CHECKS]


def test_selftest_passes_on_cpu_and_writes_json(tmp_path):
    result = invoke("selftest", "--device", "cpu", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "selftest.json").read_text())
    assert doc["passed"] is True and doc["device"] == "cpu"
    checks = {c["name"]: c for c in doc["checks"]}
    assert list(checks) == NAMES == ["training", "pgd-agreement", "bf16-attack", "data-path", "in-ball", "resume",
                                     "speed"]
    assert {n: c["status"] for n, c in checks.items()} == {**{n: "pass" for n in NAMES}, "speed": "info"}
    for name in NAMES:  # the table shows every check with its result
        assert name in result.output
    env = doc["environment"]
    assert env["torch"] == torch.__version__ and env["cpu_model"] and env["gpu_name"] is None
    assert env["performance"]["precision"] == Performance.from_spec(None, torch.device("cpu")).precision

    # the measured values behind each verdict
    training = checks["training"]["details"]
    assert training["losses"][-1] <= selftest.LOSS_DROP * training["losses"][0]
    assert training["performance"]["precision"] == env["performance"]["precision"]  # trained as `auto` resolves here
    agreement = checks["pgd-agreement"]
    assert agreement["value"] >= selftest.AGREEMENT_MIN and agreement["details"]["attacked"] >= 200
    assert 0 < agreement["details"]["success_pct"]["advertorch"] < 100  # a real attack, not a trivial one
    bf16 = checks["bf16-attack"]["details"]
    assert abs(bf16["bf16_pct"] - bf16["fp32_pct"]) <= BF16_ASR_TOLERANCE_PP
    assert checks["data-path"]["details"]["batches"] == 23  # 1,437 digits in batches of 64: one whole epoch
    assert checks["in-ball"]["details"]["adversaries"] >= 6 * 200 and checks["in-ball"]["value"] <= 1 + 1e-4
    assert checks["resume"]["details"]["differ"] == [] and checks["resume"]["details"]["tensors"] >= 10
    assert checks["speed"]["value"] > 0


def _only(monkeypatch, *names):
    """Run only these checks (each computes what it needs: `in-ball` trains the model it attacks)."""
    monkeypatch.setattr(selftest, "CHECKS", [c for c in selftest.CHECKS if c[0] in names])


def _break_rng_restore(monkeypatch):
    # a resume that loads the weights, optimizer and scheduler but not the random-number generators: the second
    # epoch's random starts then differ from the uninterrupted run's
    monkeypatch.setattr(checkpoint, "restore_global_rng", lambda rng: None)


def _freeze_training(monkeypatch):
    # an optimizer that never moves the weights (lr 0): the loss cannot fall
    import harness.train

    real = harness.train.make_optimizer
    monkeypatch.setattr(harness.train, "make_optimizer", lambda model, cfg: real(model, dict(cfg, lr=0.0)))


def _overshoot_foolbox(monkeypatch):
    # an attack whose projection is broken: its perturbation 1.5 times what foolbox returned
    from harness_plugins.foolbox_attacks import FoolboxLinfPGD

    real = FoolboxLinfPGD.perturb
    monkeypatch.setattr(FoolboxLinfPGD, "perturb",
                        lambda self, model, x, y: (x + 1.5 * (real(self, model, x, y) - x)).clamp(0, 1))


def _halve_foolbox_step(monkeypatch):
    # an adapter that hands foolbox half the step size it was given (a unit slip): 10 steps then reach 20/255 of
    # the 32/255 ball, a weaker attack than advertorch's
    from harness_plugins.foolbox_attacks import FoolboxLinfPGD

    real = FoolboxLinfPGD.__init__

    def init(self, eps, steps=10, step_size=2.0, random_start=True):
        real(self, eps, steps, step_size / 2, random_start)

    monkeypatch.setattr(FoolboxLinfPGD, "__init__", init)


def _shift_device_data(monkeypatch):
    # a device-resident copy of the data that is off by one sample (the batches drawn from it then differ)
    real = Performance.prepare_data

    def shifted(self, data):
        data = real(self, data)
        data.train.images = data.train.images.roll(1, 0)
        return data

    monkeypatch.setattr(Performance, "prepare_data", shifted)


@pytest.mark.parametrize("breakage, checks, failing", [
    (_break_rng_restore, ("training", "resume"), "resume"),
    (_freeze_training, ("training",), "training"),
    (_overshoot_foolbox, ("in-ball",), "in-ball"),
    (_halve_foolbox_step, ("pgd-agreement",), "pgd-agreement"),
    (_shift_device_data, ("data-path",), "data-path"),
], ids=["resume-without-rng", "frozen-training", "attack-leaving-its-ball", "foolbox-half-step",
                         "device-data-off-by-one"])
def test_a_real_breakage_fails_its_check_and_the_command_exits_1(tmp_path, monkeypatch, breakage, checks, failing):
    _only(monkeypatch, *checks)
    breakage(monkeypatch)
    result = invoke("selftest", "--device", "cpu", "--out", tmp_path)
    assert result.exit_code == 1, result.output
    assert f"selftest check(s) failed: {failing}" in result.output
    doc = json.loads((tmp_path / "selftest.json").read_text())
    status = {c["name"]: c["status"] for c in doc["checks"]}
    assert doc["passed"] is False and status[failing] == "fail"
    assert all(s == "pass" for name, s in status.items() if name != failing), status


def test_cuda_without_a_gpu_is_bad_input(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = invoke("selftest", "--device", "cuda", "--out", tmp_path)
    assert result.exit_code == 2
    assert "--device cuda, but torch sees no CUDA device" in result.output and "fix:" in result.output
    assert not (tmp_path / "selftest.json").exists()
