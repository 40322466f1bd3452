"""`harness run` writes the analysis and the figures; `harness report` redraws them from saved reports, merging
cells run separately, without recomputing anything."""

import copy
import json
import shutil

import pytest

import harness.analysis
import harness.evaluate
import harness.runner
import harness.train
from harness import integrity
from harness.figures import make_figures
from harness.report import validate_report

from conftest import invoke

PNG = b"\x89PNG\r\n\x1a\n"
FIGURES = ("fig2_ge.png", "fig3_loss_variation.png", "fig4_pgd.png")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two real runs of one tiny spec, each with one strength: cells run separately."""
    from conftest import TINY_SPEC, invoke

    root = tmp_path_factory.mktemp("runs")
    spec = copy.deepcopy(TINY_SPEC)
    spec["dataset"].update(max_train=128, max_test=64)
    spec["analysis"] = {"max_train": 48, "steps": 3}
    out = {}
    for strength in (0, 32):
        spec["defense"]["strengths"] = [strength]
        path = root / f"spec{strength}.json"
        path.write_text(json.dumps(spec))
        result = invoke("run", path, "--out", root / f"s{strength}")
        assert result.exit_code == 0, result.output
        out[strength] = root / f"s{strength}"
    return out


@pytest.fixture
def no_recompute(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("harness report recomputed something")

    for module, name in [(harness.runner, "run_cell"), (harness.train, "train"), (harness.evaluate, "evaluate"),
                         (harness.analysis, "analyze"), (harness.analysis, "search_ball")]:
        monkeypatch.setattr(module, name, forbidden)


def test_run_writes_analysis_and_figures(runs):
    report = json.loads((runs[32] / "report.json").read_text())
    validate_report(report)
    (cell,) = report["cells"]
    a = cell["analysis"]
    assert a["eps"] == 32 and a["steps"] == 3 and a["train_samples"] == 48  # eps: the first attack's by default
    assert 0 <= a["robust"] <= a["correct"] <= 48 and a["loss_variation"]["n"] == a["correct"]
    assert a["margin_in_ball"]["max"] <= a["margins"]["train"]["max"]  # the search only lowers margins
    assert [layer["input_shape"] for layer in a["spectral"]["layers"]] == [[1, 8, 8], [32, 4, 4], [256], [1024]]
    for name in FIGURES:
        assert (runs[32] / name).read_bytes()[:8] == PNG


def test_report_merges_cells_run_separately(runs, tmp_path, no_recompute):
    out = tmp_path / "merged"
    result = invoke("report", runs[0], runs[32], "--out", out)
    assert result.exit_code == 0, result.output
    assert "Acc." in result.output and "max |ΔCE|" in result.output
    merged = json.loads((out / "report.json").read_text())
    validate_report(merged)
    assert [c["strength"] for c in merged["cells"]] == [0, 32]
    assert merged["spec"]["defense"]["strengths"] == [0, 32]
    assert len(merged["merged_from"]) == 2
    for name in FIGURES:
        assert (out / name).read_bytes()[:8] == PNG
    # the saved numbers, not new ones
    saved = json.loads((runs[32] / "report.json").read_text())["cells"][0]
    assert merged["cells"][1]["metrics"] == saved["metrics"] and merged["cells"][1]["analysis"] == saved["analysis"]


def test_report_of_one_run_redraws_in_place(runs, tmp_path, no_recompute):
    folder = tmp_path / "one"
    shutil.copytree(runs[0], folder)
    for name in FIGURES:
        (folder / name).unlink()
    result = invoke("report", folder)
    assert result.exit_code == 0, result.output
    assert all((folder / name).exists() for name in FIGURES)
    assert json.loads((folder / "report.json").read_text()) == json.loads((runs[0] / "report.json").read_text())


def test_same_cell_in_two_folders_the_later_wins(runs, tmp_path, no_recompute):
    later = tmp_path / "later"
    shutil.copytree(runs[0], later)
    report = json.loads((later / "report.json").read_text())
    report["cells"][0]["metrics"]["clean_acc"] = 12.5
    report["cells"][0]["checksum"] = integrity.json_checksum(report["cells"][0])  # another run's cell, not damage
    (later / "report.json").write_text(json.dumps(report))
    result = invoke("report", runs[0], later, "--out", tmp_path / "m")
    assert result.exit_code == 0
    assert "using the later" in result.output and "12.50" in result.output


def test_cells_without_report_json_are_merged(runs, tmp_path, no_recompute):
    cells_only = tmp_path / "cells_only"
    shutil.copytree(runs[32] / "cells", cells_only / "cells")
    result = invoke("report", runs[0], cells_only, "--out", tmp_path / "m", "--no-figures")
    assert result.exit_code == 0, result.output
    merged = json.loads((tmp_path / "m" / "report.json").read_text())
    assert [c["strength"] for c in merged["cells"]] == [0, 32]
    assert invoke("report", cells_only).exit_code == 2  # no report.json anywhere: no spec to trust


def test_reports_of_different_specs_do_not_merge(runs, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(runs[32], other)
    report = json.loads((other / "report.json").read_text())
    report["spec"]["training"]["lr"] = 0.5
    (other / "report.json").write_text(json.dumps(report))
    result = invoke("report", runs[0], other)
    assert result.exit_code == 2
    assert "differs" in result.output and "training" in result.output and "fix:" in result.output


@pytest.mark.parametrize("content, expected", [(None, "not found"), ("{}", "not a harness report"),
                                               ("[1,", "not valid JSON")])
def test_bad_report_paths_exit_2(tmp_path, content, expected):
    path = tmp_path / "x" / "report.json"
    if content is not None:
        path.parent.mkdir()
        path.write_text(content)
    result = invoke("report", path.parent)
    assert result.exit_code == 2 and expected in result.output


def test_figures_mark_the_papers_values_where_cells_carry_them(runs):
    report = json.loads((runs[0] / "report.json").read_text())
    figures = make_figures(report)
    assert set(figures) == set(FIGURES)
    labels = figures["fig4_pgd.png"].axes[0].get_legend_handles_labels()[1]
    assert labels == ["lenet"]
    report["cells"][0]["paper"] = {"acc": 99.2, "ge": 0.01, "pgd": 96.0}
    figures = make_figures(report)
    ax = figures["fig4_pgd.png"].axes[0]
    assert ax.get_legend_handles_labels()[1] == ["lenet", "lenet: paper"]
    assert list(ax.lines[1].get_ydata()) == [96.0]
    assert "(%)" in ax.get_ylabel() and "0–255" in ax.get_xlabel() and ax.get_title()
    assert figures["fig2_ge.png"].axes[0].get_legend_handles_labels()[1] == ["lenet", "lenet: paper"]
