"""`harness eval`: existing weights evaluated with the same attacks, checks and report; bad checkpoints exit 2."""

import json

import pytest
import torch
from click.testing import CliRunner

from harness import registry, spec as spec_mod
from harness.cli import cli
from harness.evaluate import evaluate
from harness.report import validate_report
from harness.runner import load_data

EVAL_SPEC = {
    "name": "ckpt",
    "device": "cpu",
    "dataset": {"name": "digits", "max_train": 256, "max_test": 48},
    "models": [{"name": "lenet", "options": {"spectral_norm": True}}],
    "evaluation": {
        "batch_size": 128,
        "attacks": [{"name": "foolbox-pgd", "eps": 16, "options": {"steps": 3, "step_size": 8}},
                    {"name": "foolbox-fgsm", "eps": 16},
                    {"name": "foolbox-deepfool", "eps": 16, "options": {"steps": 5}, "curve": [0, 8, 16, 32]}],
        "checks": {"max_samples": 16, "attacks": ["foolbox-pgd@16"], "gradient_free": {"name": "square", "options": {"n_queries": 50}}},
    },
}


@pytest.fixture
def trained(trained_lenet):
    """conftest's trained LeNet (its weights file, a model holding them) and the data EVAL_SPEC names."""
    path, model = trained_lenet
    return path, model, load_data(spec_mod.validate(json.loads(json.dumps(EVAL_SPEC)), evaluation_only=True))


def invoke(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_eval_loads_the_weights_and_reports_every_attack(trained, tmp_path):
    path, model, data = trained
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(EVAL_SPEC))  # no training, no defense
    out = tmp_path / "out"
    result = invoke("eval", str(spec_path), "--weights", str(path), "--out", str(out))
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    validate_report(report)
    assert report["checkpoint"]["path"] == str(path) and len(report["checkpoint"]["sha256"]) == 64
    m = report["cells"][0]["metrics"]
    direct = evaluate(model, data, [], 128, torch.device("cpu"))
    assert m["clean_acc"] == pytest.approx(direct["clean_acc"]) and m["clean_acc"] > 25  # the trained weights (chance: 10%)
    assert set(m["attacks"]) == {"foolbox-pgd@16", "foolbox-fgsm@16", "foolbox-deepfool@16"}
    assert m["robust_acc"] == m["worst_case"]["16"]["acc"] <= min(a["acc"] for a in m["attacks"].values())
    assert m["attacks"]["foolbox-deepfool@16"]["curve"]["eps"] == [0, 8, 16, 32]
    assert set(m["checks"]["flags"]) >= {"eps_zero_is_clean", "no_gradient_masking", "eval_deterministic"}
    assert "attacks (accuracy in %" in result.output


def _expect_bad_input(tmp_path, weights, *needles):
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(EVAL_SPEC))
    result = invoke("eval", str(spec_path), "--weights", str(weights), "--out", str(tmp_path / "o"))
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in result.output, result.output
    return result


def test_checkpoint_of_another_model_names_the_keys(trained, tmp_path):
    path, model, _ = trained
    plain = registry.load("model", "lenet")(spectral_norm=False).build(10, (1, 8, 8))
    torch.save(plain.state_dict(), tmp_path / "plain.pt")
    _expect_bad_input(tmp_path, tmp_path / "plain.pt", "does not fit the model", "missing keys",
                      "0.parametrizations.weight.original", "unexpected keys", "0.weight")
    state = dict(model.state_dict())
    state["9.bias"] = torch.zeros(3)
    torch.save(state, tmp_path / "shape.pt")
    _expect_bad_input(tmp_path, tmp_path / "shape.pt", "shape mismatches (1): 9.bias (3,) vs model (10,)")


class Payload:
    pass


def test_checkpoints_that_are_not_state_dicts_exit_2(tmp_path):
    torch.save({"net": Payload()}, tmp_path / "pickle.pt")
    _expect_bad_input(tmp_path, tmp_path / "pickle.pt", "weights_only=True")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    _expect_bad_input(tmp_path, tmp_path / "junk.pt", "cannot load checkpoint")
    torch.save({"epoch": 3}, tmp_path / "nostate.pt")
    _expect_bad_input(tmp_path, tmp_path / "nostate.pt", "holds no state_dict")
    _expect_bad_input(tmp_path, tmp_path / "missing.pt", "checkpoint not found")
