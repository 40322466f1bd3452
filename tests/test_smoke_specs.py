"""Every shipped spec runs in smoke mode (on stand-in data where its dataset is not on disk), and the paper's
published numbers sit beside ours in the report and the table."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from rich.console import Console

from conftest import REPO
from harness import paper, spec as spec_mod
from harness.cli import cli
from harness.report import validate_report
from harness.runner import run

SPECS = sorted(p.name for p in (REPO / "specs").glob("*.json"))


@pytest.mark.parametrize("spec_file", SPECS)
def test_every_shipped_spec_runs_in_smoke_mode(spec_file, tmp_path):
    spec = spec_mod.load(REPO / "specs" / spec_file)
    spec["device"] = "cpu"
    spec["dataset"]["root"] = str(tmp_path / "empty")  # no dataset there: the stand-in must take over
    report = run(spec, tmp_path / "out", Console(quiet=True), smoke=True)
    validate_report(report)
    assert report["smoke"] is True
    used = report["spec"]
    assert used["training"]["epochs"] == 1
    if spec["training"]["epochs"] > 1:
        assert {"path": "$.training.epochs", "from": spec["training"]["epochs"], "to": 1} in report["smoke_overrides"]
    assert used["training"]["batch_size"] <= spec["smoke"]["batch_size"]
    assert used["defense"]["options"]["steps"] <= spec["smoke"]["steps"]
    if any(m.get("paper_block") for m in spec["models"]):
        assert spec["training"]["epochs"] > 1, "a paper spec itself keeps the paper's recipe"
    # digits ships with scikit-learn and synthetic is generated: no stand-in for them, even in smoke mode
    if spec["dataset"]["name"] not in ("digits", "synthetic"):
        assert report["data"]["stand_in"] is True and "STAND-IN" in report["data"]["source"]
        assert any("stand-in" in note.lower() for note in report["data"]["notes"])
    assert len(report["cells"]) == len(used["models"]) * len(used["defense"]["strengths"])
    for cell in report["cells"]:
        assert cell["status"] == "done", cell.get("error")
        m = cell["metrics"]
        assert 0 <= m["pgd_acc"] <= m["clean_acc"] <= 100
        model = next(mo for mo in used["models"] if mo["label"] == cell["model"])
        if model.get("paper_block"):
            ref = cell["paper"]
            assert ref["block"] == model["paper_block"]
            assert ref["diff"]["acc"] == pytest.approx(m["clean_acc"] - ref["acc"])
            assert ref["diff"]["ge"] == pytest.approx(m["ge"] - ref["ge"])
            assert ref["diff"]["pgd"] == pytest.approx(m["pgd_acc"] - ref["pgd"])


def test_cli_smoke_says_so_and_shows_the_paper(tmp_path):
    runner = CliRunner()
    spec = json.loads((REPO / "specs" / "mnist_lenet.json").read_text())
    spec["device"] = "cpu"
    spec["smoke"].update({"max_train": 8, "max_test": 4, "strengths": [0, 76.5]})
    (tmp_path / "s.json").write_text(json.dumps(spec))
    result = runner.invoke(cli, ["run", str(tmp_path / "s.json"), "--smoke", "--data-root", str(tmp_path / "none"),
                                 "--out", str(tmp_path / "out")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "SMOKE RUN on STAND-IN synthetic data" in text and "not a result" in text
    assert "99.42 (paper)" in text and "95.12 (paper)" in text  # Table 1, MNIST, strengths 0 and 76.5
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [c["paper"]["acc"] for c in report["cells"]] == [99.42, 99.38]


def test_missing_dataset_without_smoke_is_exit_2_with_layout(tmp_path):
    result = CliRunner().invoke(cli, ["run", str(REPO / "specs" / "cifar10_vgg16.json"), "--data-root",
                                      str(tmp_path), "--out", str(tmp_path / "out")], catch_exceptions=False)
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "cifar10 not found under" in text and "cifar-10-batches-py/data_batch_1" in text
    assert "--smoke" in text and "Traceback" not in result.output
    assert not (tmp_path / "out" / "report.json").exists()


def test_smoke_strengths_must_be_a_subset(tmp_path):
    spec = json.loads((REPO / "specs" / "mnist_lenet.json").read_text())
    spec["smoke"]["strengths"] = [0, 8]
    (tmp_path / "s.json").write_text(json.dumps(spec))
    result = CliRunner().invoke(cli, ["run", str(tmp_path / "s.json"), "--smoke", "--out", str(tmp_path / "o")],
                                catch_exceptions=False)
    assert result.exit_code == 2 and "$.smoke.strengths: [8]" in result.output


def test_reference_data_matches_the_schema_and_the_specs():
    blocks = paper.tables()["blocks"]
    enum = spec_mod.SPEC_SCHEMA["properties"]["models"]["items"]["properties"]["paper_block"]["enum"]
    assert sorted(enum) == sorted(blocks)
    for block, entry in blocks.items():
        assert all(len(entry[k]) == len(entry["strengths"]) == 4 for k in ("acc", "ge", "pgd")), block
    # spot checks against the paper's text (Table 1 CIFAR100 VGG19, Table 2 PGD row)
    assert paper.reference("cifar100_vgg19", 16)["pgd"] == 17.71
    assert blocks["tinyimagenet_wrn50"]["pgd"] == [0.00, 20.03, 25.17, 30.47]
    assert paper.reference("cifar10_vgg16", 2) is None
    for name in SPECS:
        spec = spec_mod.load(REPO / "specs" / name)
        for model in spec["models"]:
            if model.get("paper_block"):
                entry = blocks[model["paper_block"]]
                assert spec["defense"]["strengths"] == entry["strengths"], name
                assert spec["dataset"]["name"] == entry["dataset"], name
