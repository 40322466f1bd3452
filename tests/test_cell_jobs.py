"""`harness run SPEC --cell ID`: cells run as independent jobs; their cell files in OUT/cells/ merge into one
report.json (only files of the same spec), so a sweep can be spread over machines by any scheduler."""

from __future__ import annotations

import json

import pytest

from harness.report import validate_report
from conftest import invoke


@pytest.fixture
def spec(tiny_spec):
    tiny_spec["dataset"].update(max_train=64, max_test=32)
    tiny_spec["defense"]["options"]["steps"] = 1
    tiny_spec["evaluation"]["attacks"][0]["options"]["steps"] = 1
    return tiny_spec


def without_timings(value):
    """A result with its wall-clock fields ("seconds") removed: those differ between any two runs."""
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def test_separate_cell_jobs_merge_into_one_report(spec, write_spec, tmp_path):
    path, out = str(write_spec(spec)), tmp_path / "out"
    first = invoke("run", path, "--out", str(out), "--cell", "lenet__s32")
    assert first.exit_code == 0, first.output
    report = json.loads((out / "report.json").read_text())
    assert [c["id"] for c in report["cells"]] == ["lenet__s32"]  # only what exists so far
    second = invoke("run", path, "--out", str(out), "--cell", "lenet__s0")
    assert second.exit_code == 0, second.output
    merged = json.loads((out / "report.json").read_text())
    validate_report(merged)
    assert [c["id"] for c in merged["cells"]] == ["lenet__s0", "lenet__s32"]  # plan order, both jobs
    assert merged["cells"][1] == report["cells"][0]  # the first job's cell, read back unchanged

    whole = invoke("run", path, "--out", str(tmp_path / "whole"))
    assert whole.exit_code == 0
    together = json.loads((tmp_path / "whole" / "report.json").read_text())
    for a, b in zip(together["cells"], merged["cells"]):  # same seeds: a cell's result does not depend on the job
        assert without_timings(a["metrics"]) == without_timings(b["metrics"])


def test_cells_of_another_spec_in_the_same_folder_are_not_merged(spec, write_spec, tmp_path):
    out = tmp_path / "out"
    assert invoke("run", str(write_spec(spec)), "--out", str(out), "--cell", "lenet__s0").exit_code == 0
    other = dict(spec, training=dict(spec["training"], lr=0.05))  # another experiment, same cell ids
    assert invoke("run", str(write_spec(other, "other.json")), "--out", str(out), "--cell", "lenet__s32").exit_code == 0
    report = json.loads((out / "report.json").read_text())
    assert [c["id"] for c in report["cells"]] == ["lenet__s32"]
    assert report["spec"]["training"]["lr"] == 0.05


def test_unknown_cell_is_bad_input_listing_the_valid_ids(spec, write_spec, tmp_path):
    result = invoke("run", str(write_spec(spec)), "--out", str(tmp_path / "o"), "--cell", "lenet__s7")
    assert result.exit_code == 2
    assert "unknown cell id: lenet__s7" in result.output
    assert "lenet__s0, lenet__s32" in result.output
    assert not (tmp_path / "o").exists()  # rejected before anything ran


def test_jobs_on_different_precisions_are_refused_unless_forced(spec, write_spec, tmp_path):
    """The resolved precision is part of the experiment: a bf16 job (GPU, AMX CPU) does not silently merge its cell
    into a folder of fp32 cells; --force merges, and each cell records the precision it was trained in."""
    out = tmp_path / "out"
    fp32 = dict(spec, performance={"precision": "fp32"})
    bf16 = dict(spec, performance={"precision": "bf16"})
    assert invoke("run", str(write_spec(fp32)), "--out", str(out), "--cell", "lenet__s0").exit_code == 0
    refused = invoke("run", str(write_spec(bf16, "bf16.json")), "--out", str(out), "--cell", "lenet__s32")
    assert refused.exit_code == 2, refused.output
    assert 'cell lenet__s0' in refused.output and 'performance.precision: "fp32" -> "bf16"' in refused.output
    assert "--force" in refused.output
    assert not (out / "cells" / "lenet__s32.json").exists()  # refused before training
    second = invoke("run", str(write_spec(bf16, "bf16.json")), "--out", str(out), "--cell", "lenet__s32", "--force")
    assert second.exit_code == 0, second.output
    assert "trained in different precisions: lenet__s0 fp32, lenet__s32 bf16" in second.output
    report = json.loads((out / "report.json").read_text())
    validate_report(report)
    assert [(c["id"], c["performance"]["precision"]) for c in report["cells"]] == [("lenet__s0", "fp32"),
                                                                                  ("lenet__s32", "bf16")]
    assert report["environment"]["performance"]["precision"] == "bf16"  # the run that wrote report.json
