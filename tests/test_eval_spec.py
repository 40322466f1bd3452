"""Evaluation specs (no `defense`, no `training`): `harness validate` accepts what `harness eval` runs, `harness run`
refuses them with exit 2 pointing to `harness eval`, the report records null defense and training instead of
placeholders, plugins get the documented default root, and dataset.test_subset "first" takes the first N."""

from __future__ import annotations

import json

import torch

from conftest import invoke
from harness import registry
from harness import spec as spec_mod
from harness.report import validate_report
from harness.runner import load_data

EVAL_SPEC = {
    "name": "evalonly", "device": "cpu",
    "dataset": {"name": "digits", "max_train": 32, "max_test": 16},
    "models": [{"name": "lenet", "options": {"spectral_norm": False}}],
    "evaluation": {"batch_size": 64, "attacks": [{"name": "foolbox-fgsm", "eps": 8}], "checks": {"enabled": False}},
}


def test_validate_accepts_what_eval_runs_and_run_refuses_it(write_spec, tmp_path):
    path = write_spec(EVAL_SPEC)
    checked = invoke("validate", path)
    assert checked.exit_code == 0, checked.output
    assert "valid evaluation spec" in checked.output and "harness eval" in checked.output
    refused = invoke("run", path, "--out", tmp_path / "run")
    assert refused.exit_code == 2 and "evaluation spec" in refused.output and "harness eval SPEC --weights" \
        in " ".join(refused.output.split())
    assert not (tmp_path / "run" / "report.json").exists()
    bad = dict(EVAL_SPEC, evaluation={"attacks": [{"name": "foolbox-fgsm", "eps": 900}]})
    refused_too = invoke("validate", write_spec(bad, "bad.json"))
    assert refused_too.exit_code == 2 and "$.evaluation.attacks[0].eps" in refused_too.output

    model = registry.create("model", "lenet", spectral_norm=False).build(10, (1, 8, 8))
    torch.save(model.state_dict(), tmp_path / "w.pt")
    done = invoke("eval", path, "--weights", tmp_path / "w.pt", "--out", tmp_path / "ev", "--data-root", tmp_path)
    assert done.exit_code == 0, done.output
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    validate_report(report)
    assert report["spec"]["defense"] is None and report["spec"]["training"] is None  # no placeholder "none"/epochs 0
    assert report["spec"]["dataset"]["root"] == str(tmp_path)
    shown = invoke("report", tmp_path / "ev", "--no-figures")
    assert shown.exit_code == 0, shown.output
    assert "evaluation of given weights" in " ".join(shown.output.split())


def test_plugins_get_the_default_root_and_first_n(monkeypatch):
    from harness_plugins.digits import Digits

    roots = []
    original = Digits.load

    def recording(self, root, download):
        roots.append(root)
        return original(self, root, download)

    monkeypatch.setattr(Digits, "load", recording)
    spec = spec_mod.validate(dict(EVAL_SPEC, dataset={"name": "digits", "max_test": 10, "test_subset": "first"}),
                             evaluation_only=True)
    first = load_data(spec)
    assert roots == ["data"]  # README: "else ./data"; never None
    full = load_data(spec_mod.validate(dict(EVAL_SPEC, dataset={"name": "digits"}), evaluation_only=True))
    assert torch.equal(first.test.images, full.test.images[:10]) and torch.equal(first.test.labels, full.test.labels[:10])
    random = load_data(spec_mod.validate(dict(EVAL_SPEC, dataset={"name": "digits", "max_test": 10}),
                                         evaluation_only=True))
    assert not torch.equal(random.test.labels, full.test.labels[:10])  # the default stays a seeded random subset
