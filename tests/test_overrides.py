"""`--set PATH=VALUE` and `--download` on every command that reads a spec (harness.spec.apply_overrides): applied
before validation, refused with the JSON path (exit 2), recorded in the report, and reaching the dataset plugin."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import harness
from harness import registry, submit
from harness import spec as spec_mod
from harness.errors import BadInput, DatasetNotFound

from conftest import TINY_SPEC, invoke

SPEC = copy.deepcopy(TINY_SPEC)
SPEC["dataset"].update(max_train=128, max_test=32)
SPEC["evaluation"]["checks"] = {"enabled": False}
SPEC["analysis"] = {"enabled": False}


def test_values_are_json_else_strings_and_paths_reach_into_lists():
    spec = copy.deepcopy(SPEC)
    out = spec_mod.apply_overrides(spec, [
        "training.lr=0.05", "defense.strengths=[0,8]", "models.0.options.spectral_norm=false",
        "dataset.name=mnist", 'name="123"', "description=a=b", "analysis.margins={\"enabled\": true}",
        "$.evaluation.attacks[0].eps=8", "training.schedule.type=constant", "dataset.root=null"])
    assert out["training"]["lr"] == 0.05 and out["defense"]["strengths"] == [0, 8]
    assert out["models"][0]["options"]["spectral_norm"] is False
    assert out["dataset"]["name"] == "mnist" and out["name"] == "123" and out["description"] == "a=b"
    assert out["analysis"] == {"enabled": False, "margins": {"enabled": True}}  # into an existing object
    assert out["evaluation"]["attacks"][0]["eps"] == 8  # the JSON-path spelling of error messages
    assert out["training"]["schedule"] == {"type": "constant"}  # a missing object is created
    assert out["dataset"]["root"] is None
    assert spec == SPEC  # the caller's spec is untouched


@pytest.mark.parametrize("override, message", [
    ("training", "expected PATH=VALUE"),
    ("=3", "expected PATH=VALUE"),
    ("training..lr=3", "expected PATH=VALUE"),
    ("models.1.label=x", "$.models is a list and '1' is past its end (1 entry)"),
    ("models.first.label=x", "$.models is a list and 'first' is not a list index"),
    ("training.lr.value=1", "$.training.lr is 0.1, not an object or a list, so it has no 'value'"),
])
def test_malformed_overrides_are_bad_input(override, message):
    with pytest.raises(BadInput) as caught:
        spec_mod.apply_overrides(SPEC, [override])
    assert message in caught.value.message


def test_set_changes_the_run_and_is_recorded(tmp_path, write_spec):
    path = write_spec(SPEC)
    result = invoke("run", path, "--out", tmp_path / "o", "--set", "training.epochs=2", "--set",
                    "defense.strengths=[0]", "--set", "models.0.label=Plain", "--set", "training.max_batches=1")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert [c["id"] for c in report["cells"]] == ["Plain__s0"]
    assert [h["epoch"] for h in report["cells"][0]["history"]] == [1, 2]  # the spec file says 1 epoch
    assert report["spec"]["training"]["epochs"] == 2 and report["spec"]["training"]["max_batches"] == 1
    assert report["overrides"] == ["training.epochs=2", "defense.strengths=[0]", "models.0.label=Plain",
                                   "training.max_batches=1"]
    assert json.loads(path.read_text()) == SPEC  # the file is not edited


@pytest.fixture
def weights(tmp_path):
    torch.manual_seed(0)
    model = registry.load("model", "lenet")(spectral_norm=True).build(10, (1, 8, 8))
    torch.save(model.state_dict(), tmp_path / "w.pt")
    return tmp_path / "w.pt"


def test_eval_takes_overrides(tmp_path, write_spec, weights):
    path = write_spec(SPEC)
    result = invoke("eval", path, "--weights", weights, "--out", tmp_path / "e", "--set",
                    "evaluation.attacks.0.eps=8", "--set", "dataset.max_test=16")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "e" / "report.json").read_text())
    assert list(report["cells"][0]["metrics"]["attacks"]) == ["foolbox-pgd@8"] and report["data"]["test_size"] == 16
    assert report["overrides"] == ["evaluation.attacks.0.eps=8", "dataset.max_test=16"]


@pytest.mark.parametrize("command", [["validate"], ["run", "--out", "{tmp}/o"], ["eval", "--weights", "{weights}"],
                                     ["bench", "--out", "{tmp}/b.json"], ["submit", "--dry-run", "--out", "{tmp}/o"]])
def test_every_command_refuses_bad_overrides_with_the_json_path(command, tmp_path, write_spec, weights):
    path = write_spec(SPEC)
    args = [a.format(tmp=tmp_path, weights=weights) for a in command[1:]]
    for override, needle in [("training.lr=fast", "$.training.lr: 'fast' is not of type 'number'"),
                             ("training.lrr=0.05", "$.training: unknown key 'lrr' (did you mean 'lr'?)"),
                             ("models.0.options.spectral_norm=3",
                              "$.models[0].options.spectral_norm: 3 is not of type 'boolean'"),
                             ("models.2.label=x", "$.models is a list and '2' is past its end")]:
        result = invoke(command[0], path, *args, "--set", override)
        assert result.exit_code == 2, (override, result.output)
        assert needle in result.output, result.output
    assert not (tmp_path / "o").exists() and not (tmp_path / "b.json").exists()  # refused before any work


def test_submit_passes_the_overrides_to_each_job(tmp_path, write_spec):
    path = write_spec(SPEC)
    result = invoke("submit", path, "--executor", "local", "--dry-run", "--out", tmp_path / "o",
                    "--set", "training.epochs=3", "--set", "defense.strengths=[0]")
    assert result.exit_code == 0, result.output
    assert "lenet__s0: harness run" in result.output and "lenet__s32" not in result.output
    assert "--set training.epochs=3 --set 'defense.strengths=[0]'" in result.output
    args = submit.RunArgs("s.json", "out", overrides=("training.epochs=3", "dataset.download=true"))
    assert args.argv(["c"]) == ["s.json", "--out", "out", "--set", "training.epochs=3", "--set",
                                "dataset.download=true", "--cell", "c"]


@pytest.fixture
def loads(monkeypatch):
    """The digits plugin's load, recording (root, download) and then stopping the command as a missing dataset."""
    seen = []
    cls = registry.load("dataset", "digits")

    def load(self, root, download):
        seen.append((root, download))
        raise DatasetNotFound("digits: recorded by the test", fix="none")

    monkeypatch.setattr(cls, "load", load)
    return seen


def test_download_reaches_the_dataset_plugin(loads, tmp_path, write_spec, weights):
    path = write_spec(SPEC)
    for command in (["run", path, "--out", tmp_path / "o"], ["eval", path, "--weights", weights],
                    ["bench", path, "--out", tmp_path / "b.json"]):
        for flag, expected in (([], False), (["--download"], True)):
            loads.clear()
            result = invoke(*command, *flag)
            assert result.exit_code == 2 and "recorded by the test" in result.output, result.output
            assert [download for _, download in loads] == [expected], (command, flag)
    loads.clear()
    with pytest.raises(DatasetNotFound):
        harness.evaluate(torch.nn.Flatten(), "digits", attacks=["foolbox-fgsm"], eps=8, download=True, quiet=True)
    with pytest.raises(DatasetNotFound):
        harness.run(SPEC, out=tmp_path / "o", download=True, quiet=True)
    assert [download for _, download in loads] == [True, True]
