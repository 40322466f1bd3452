"""The Python API (harness.api; harness.run / harness.evaluate / harness.validate): the same results as the CLI it
underlies, on tiny real digits runs, and bad input raised as BadInput with the JSON path instead of sys.exit."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys

import pytest
import torch

import harness
from harness.errors import BadInput, RunFailure
from harness.runner import load_data
from harness import spec as spec_mod

from conftest import REPO, invoke

# One cell, no analysis: the comparisons below need two runs of it.
RUN_SPEC = {
    "name": "api", "seed": 0, "device": "cpu",
    "dataset": {"name": "digits", "max_train": 128, "max_test": 64},
    "models": [{"name": "lenet", "options": {"spectral_norm": True}}],
    "defense": {"name": "pgd-at", "strengths": [0, 32], "options": {"steps": 2, "step_size": 16}},
    "training": {"epochs": 1, "batch_size": 64, "lr": 0.1},
    "evaluation": {"batch_size": 128, "checks": {"enabled": False},
                   "attacks": [{"name": "foolbox-pgd", "eps": 32, "options": {"steps": 2, "step_size": 16}}]},
    "analysis": {"enabled": False},
}

EVAL_SPEC = {
    "name": "api-eval", "device": "cpu",
    "dataset": {"name": "digits", "max_test": 60, "test_subset": "first"},
    "models": [{"name": "lenet", "options": {"spectral_norm": True}}],
    "evaluation": {"batch_size": 128, "checks": {"enabled": False},
                   "attacks": [{"name": "advertorch-pgd", "eps": 16, "options": {"steps": 3}},
                               {"name": "foolbox-fgsm", "eps": 16}]},
}


def _results(report: dict) -> list[dict]:
    """What a run computed, without wall times."""
    cells = []
    for cell in report["cells"]:
        cell = {k: v for k, v in cell.items() if k not in ("seconds", "timings", "checksum")}
        cell["history"] = [{k: v for k, v in h.items() if k != "seconds"} for h in cell.get("history", [])]
        cell["metrics"] = {k: v for k, v in cell["metrics"].items() if k != "timings"}
        cells.append(cell)
    return cells


def test_run_returns_the_cli_report(tmp_path, write_spec):
    """harness.run on a dict (with overrides as a mapping) gives the cells `harness run` gives on the same spec
    file with the same overrides as --set, and writes the same files."""
    path = write_spec(RUN_SPEC)
    cli = invoke("run", path, "--out", tmp_path / "cli", "--set", "defense.strengths=[32]")
    assert cli.exit_code == 0, cli.output
    cli_report = json.loads((tmp_path / "cli" / "report.json").read_text())

    report = harness.run(copy.deepcopy(RUN_SPEC), out=tmp_path / "api", overrides={"defense.strengths": [32]},
                         quiet=True)
    assert report == json.loads((tmp_path / "api" / "report.json").read_text())  # the document written
    assert [c["id"] for c in report["cells"]] == ["lenet__s32"]
    assert len(report["cells"][0]["history"]) == 1 and report["cells"][0]["status"] == "done"  # trained, evaluated
    assert _results(report) == _results(cli_report)
    assert report["spec"] == cli_report["spec"]
    assert report["overrides"] == cli_report["overrides"] == ["defense.strengths=[32]"]
    assert sorted(p.name for p in (tmp_path / "api").glob("fig*")) == sorted(p.name for p in (tmp_path / "cli").glob("fig*"))
    # the same folder again: the finished cell is kept, as the CLI keeps it
    again = harness.run(copy.deepcopy(RUN_SPEC), out=tmp_path / "api", overrides=["defense.strengths=[32]"],
                        quiet=True)
    assert _results(again) == _results(report)


def _accuracies(report: dict) -> tuple[float, dict]:
    m = report["cells"][0]["metrics"]
    return m["clean_acc"], {label: a["acc"] for label, a in m["attacks"].items()}


def test_evaluate_in_memory_matches_cli_eval_of_the_saved_weights(trained_lenet, tmp_path, write_spec):
    weights, model = trained_lenet
    path = write_spec(EVAL_SPEC)
    cli = invoke("eval", path, "--weights", weights, "--out", tmp_path / "cli")
    assert cli.exit_code == 0, cli.output
    expected = _accuracies(json.loads((tmp_path / "cli" / "report.json").read_text()))
    assert expected[0] > 30 and set(expected[1]) == {"advertorch-pgd@16", "foolbox-fgsm@16"}  # trained (chance: 10)
    assert min(expected[1].values()) < expected[0]  # the attacks do something

    model.train()
    by_spec = harness.evaluate(model, path, quiet=True)
    assert _accuracies(by_spec) == expected
    assert model.training  # the caller's module is given back in its own mode
    assert by_spec["module"]["class"].endswith("Sequential") and len(by_spec["module"]["state_dict_sha256"]) == 64
    assert by_spec["spec"]["models"] == [{"name": by_spec["module"]["class"], "label": "Sequential", "options": {}}]

    # the RobustBench-style one-liner: a dataset name and attacks by name, eps on the 0-255 scale
    one_liner = harness.evaluate(model, "digits", attacks=[{"name": "advertorch-pgd", "options": {"steps": 3}},
                                                           "foolbox-fgsm"],
                                 eps=16, n_examples=60, batch_size=128, checks=False, label="mine", quiet=True,
                                 out=tmp_path / "api")
    assert _accuracies(one_liner) == expected
    assert one_liner["cells"][0]["id"] == "mine__module"
    assert one_liner["overrides"][1:] == ["dataset.max_test=60", 'dataset.test_subset="first"',
                                          "evaluation.batch_size=128", 'evaluation.checks={"enabled": false}']
    assert json.loads((tmp_path / "api" / "report.json").read_text()) == one_liner

    # weights on disk through the API: exactly `harness eval`
    from_file = harness.evaluate(weights, EVAL_SPEC, quiet=True)
    assert _accuracies(from_file) == expected and from_file["checkpoint"]["path"] == str(weights)

    # eps without attacks moves the spec's attacks; n_examples takes the first N test samples, as RobustBench's
    spec = {**EVAL_SPEC, "dataset": {"name": "digits"}}
    small = harness.evaluate(model, spec, eps=0, n_examples=20, quiet=True)
    clean, attacked = _accuracies(small)
    assert small["data"]["test_size"] == 20 and set(attacked) == {"advertorch-pgd@0", "foolbox-fgsm@0"}
    assert all(acc == clean for acc in attacked.values())  # eps 0 leaves every correct sample correct
    test = load_data(spec_mod.validate({**copy.deepcopy(RUN_SPEC), "dataset": {"name": "digits"}})).test
    with torch.no_grad():
        first = (model.eval()(test.images[:20].float()).argmax(1) == test.labels[:20]).float().mean().item()
    model.train()
    assert clean == pytest.approx(100 * first)


def test_bad_input_raises_badinput_with_the_json_path(trained_lenet, tmp_path):
    weights, model = trained_lenet
    bad = copy.deepcopy(RUN_SPEC)
    bad["training"]["lr"] = "fast"
    with pytest.raises(BadInput, match=r"\$\.training\.lr: 'fast' is not of type 'number'"):
        harness.run(bad, out=tmp_path / "o", quiet=True)
    with pytest.raises(BadInput, match=r"\$\.training: unknown key 'epoch' \(did you mean 'epochs'\?\)"):
        harness.run(RUN_SPEC, out=tmp_path / "o", overrides={"training.epoch": 2}, quiet=True)
    with pytest.raises(BadInput, match=r"\$\.models\[0\]\.options\.spectral_norm: 3 is not of type 'boolean'"):
        harness.validate(RUN_SPEC, overrides=["models.0.options.spectral_norm=3"])
    with pytest.raises(BadInput, match="spec file not found"):
        harness.run(tmp_path / "missing.json", quiet=True)
    with pytest.raises(BadInput, match="a spec is the path of a JSON file or a dict"):
        harness.validate(42)
    with pytest.raises(BadInput, match=r"seed must be an integer >= 0"):
        harness.run(RUN_SPEC, out=tmp_path / "o", seed=-1, quiet=True)
    assert not (tmp_path / "o").exists()  # refused before anything ran
    with pytest.raises(BadInput, match=r"attacks\[0\] \('autoattack'\) has no eps"):
        harness.evaluate(model, "digits", attacks=["autoattack"], quiet=True)
    with pytest.raises(BadInput, match=r"\$\.evaluation\.attacks\[0\]\.eps: 300 is greater than the maximum of 255"):
        harness.evaluate(model, "digits", attacks=["foolbox-fgsm"], eps=300, quiet=True)
    with pytest.raises(BadInput, match=r"\$\.dataset\.name: unknown dataset 'digitz'. Did you mean 'digits'\?"):
        harness.evaluate(model, "digitz", attacks=["foolbox-fgsm"], eps=8, quiet=True)
    with pytest.raises(BadInput, match=r"needs a spec naming its model plugin"):
        harness.evaluate(weights, "digits", attacks=["foolbox-fgsm"], eps=8, quiet=True)
    with pytest.raises(BadInput, match=r"the model fails on the dataset's images \(a batch of shape \(2, 1, 8, 8\)"):
        harness.evaluate(torch.nn.Linear(3, 10), "digits", attacks=["foolbox-fgsm"], eps=8, quiet=True)
    with pytest.raises(BadInput, match=r"expected logits of shape \(2, 10\)"):
        harness.evaluate(torch.nn.Flatten(), "digits", attacks=["foolbox-fgsm"], eps=8, quiet=True)
    with pytest.warns(UserWarning, match="0-255 scale"):
        with pytest.raises(BadInput):  # the warning comes before validation refuses the dataset
            harness.evaluate(model, "digitz", attacks=["foolbox-fgsm"], eps=8 / 255, quiet=True)


def test_validate_returns_the_resolved_spec():
    resolved = harness.validate(RUN_SPEC, overrides=["defense.strengths=[0,8]"], download=True)
    assert resolved["defense"]["strengths"] == [0, 8] and resolved["dataset"]["download"] is True
    assert resolved["models"][0]["label"] == "lenet" and resolved["training"]["momentum"] == 0.9  # defaults
    assert RUN_SPEC["defense"]["strengths"] == [0, 32]  # the caller's dict is not changed


def test_a_failed_cell_raises_runfailure_holding_the_report(evil_plugins, tmp_path):
    spec = copy.deepcopy(RUN_SPEC)
    spec["defense"] = {"name": "explode", "strengths": [8]}  # an infinite loss from its 5th batch
    spec["training"].update(epochs=2, batch_size=32)
    with pytest.raises(RunFailure, match=r"1 cell\(s\) failed: lenet__s8") as caught:
        harness.run(spec, out=tmp_path / "o", quiet=True)
    assert caught.value.report["cells"][0]["status"] == "failed"
    assert json.loads((tmp_path / "o" / "report.json").read_text())["cells"][0]["status"] == "failed"


def test_import_harness_stays_light():
    """`import harness` imports neither torch nor the API; the API's names resolve on first use, and
    harness.evaluate stays callable after the harness.evaluate submodule is imported."""
    code = ("import sys, harness; assert 'torch' not in sys.modules and 'harness.api' not in sys.modules; "
            "assert callable(harness.run) and callable(harness.validate) and 'torch' not in sys.modules; "
            "import harness.runner; import harness.evaluate as m; assert harness.evaluate is m and callable(m); "
            "from harness.evaluate import evaluate; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# A test-only dataset (issue 14 §4): digits' test split and no training split, as a held-out corruption set or a
# RobustBench-style test set is shipped. Installed as a real distribution (entry point) on sys.path.
TEST_ONLY_PLUGIN = '''
from harness.plugin import DataSplits, DatasetPlugin
from harness_plugins.digits import Digits


class DigitsTestOnly(DatasetPlugin):
    """digits' test split alone."""

    def load(self, root, download):
        full = Digits().load(root, download)
        return DataSplits(train=None, test=full.test, num_classes=full.num_classes, input_shape=full.input_shape,
                          source="digits test split only")
'''


@pytest.fixture
def test_only_dataset(tmp_path, monkeypatch):
    site = tmp_path / "site"
    info = site / "test_only_data-0.1.dist-info"
    info.mkdir(parents=True)
    (site / "test_only_data.py").write_text(TEST_ONLY_PLUGIN)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: test-only-data\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[harness.datasets]\ndigits-test-only = test_only_data:DigitsTestOnly\n")
    monkeypatch.syspath_prepend(str(site))
    yield "digits-test-only"
    sys.modules.pop("test_only_data", None)


def test_a_test_only_dataset_evaluates_and_refuses_training(trained_lenet, test_only_dataset, tmp_path,
                                                            write_spec):
    """A dataset plugin without a training split: `harness eval` and harness.evaluate give the accuracies of the
    same test split evaluated beside a training split, with train loss and GE null and the reason recorded (shown
    as n/a with a footnote, also by `harness report`); `harness run` refuses it before training (exit 2)."""
    weights, model = trained_lenet
    with_train = invoke("eval", write_spec(EVAL_SPEC), "--weights", weights, "--out", tmp_path / "with-train")
    assert with_train.exit_code == 0, with_train.output
    expected = json.loads((tmp_path / "with-train" / "report.json").read_text())

    spec = {**EVAL_SPEC, "dataset": {**EVAL_SPEC["dataset"], "name": test_only_dataset}}
    done = invoke("eval", write_spec(spec, "test-only.json"), "--weights", weights, "--out", tmp_path / "test-only")
    assert done.exit_code == 0, done.output
    report = json.loads((tmp_path / "test-only" / "report.json").read_text())
    m, e = report["cells"][0]["metrics"], expected["cells"][0]["metrics"]
    assert _accuracies(report) == _accuracies(expected) and m["test_loss"] == e["test_loss"]
    assert min(_accuracies(report)[1].values()) < m["clean_acc"]  # the attacks ran on the test split
    assert m["worst_case"] == e["worst_case"] and m["robust_acc"] == e["robust_acc"]
    assert e["ge"] is not None and m["ge"] is None and m["train_loss"] is None  # never a made-up number
    assert "no training split" in m["unavailable"]["ge"] and "no training split" in m["unavailable"]["train_loss"]
    assert report["data"]["train_size"] is None and report["data"]["test_size"] == expected["data"]["test_size"]
    text = " ".join(done.output.split())
    assert "GE n/a*" in text and "* GE n/a: the dataset plugin returned no training split" in text
    shown = invoke("report", tmp_path / "test-only", "--no-figures")
    assert shown.exit_code == 0, shown.output
    shown_text = " ".join(shown.output.split())
    assert re.search(r"GE\s+│\s+n/a\*", shown.output)  # the table's GE cell, and its footnote under the table
    assert any(line.startswith("* GE n/a: the dataset plugin returned no training split")
               for line in shown.output.splitlines())
    assert f"{m['clean_acc']:.2f}" in shown_text

    # the report schema allows the nulls only with their reason
    from harness.report import validate_report

    validate_report(report)
    del m["unavailable"]["ge"]
    with pytest.raises(ValueError, match=r"\$\.cells\[0\]\.metrics\.unavailable: 'ge' is a required property"):
        validate_report(report)
    m["unavailable"] = {"ge": "no training split"}
    with pytest.raises(ValueError, match=r"unavailable: 'train_loss' is a required property"):
        validate_report(report)
    del m["unavailable"]
    with pytest.raises(ValueError, match=r"metrics: 'unavailable' is a required property"):
        validate_report(report)

    # the Python API on the in-memory module: the same numbers, the same nulls
    by_api = harness.evaluate(model, spec, quiet=True)
    assert _accuracies(by_api) == _accuracies(expected)
    assert by_api["cells"][0]["metrics"]["ge"] is None and "ge" in by_api["cells"][0]["metrics"]["unavailable"]

    # training needs a training split: exit 2 naming the plugin, before anything is trained or written
    train_spec = {**copy.deepcopy(RUN_SPEC), "dataset": {"name": test_only_dataset, "max_test": 60}}
    refused = invoke("run", write_spec(train_spec, "run.json"), "--out", tmp_path / "run")
    assert refused.exit_code == 2, refused.output
    said = " ".join(refused.output.split())
    assert "dataset plugin 'digits-test-only'" in said and "test-only-data" in said  # the plugin, its distribution
    assert "training needs one" in said and "harness eval" in said
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "report.json").exists()
    with pytest.raises(BadInput, match=r"dataset plugin 'digits-test-only' .* returned no training split"):
        harness.run(train_spec, out=tmp_path / "api-run", quiet=True)
    benched = invoke("bench", tmp_path / "run.json")  # it times training steps: refused the same way
    assert benched.exit_code == 2 and "`harness bench` trains, and training needs one" in " ".join(benched.output.split())
