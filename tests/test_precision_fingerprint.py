"""Precision and TF32 are part of the experiment (issue 11, section 3): the resolved training precision and TF32
are in a cell's training fingerprint (resume refused across a change, --force overrides), `harness report` does
not merge cells of different precisions, and evaluation on CUDA runs without TF32 unless the spec asks for it."""

from __future__ import annotations

import contextlib
import json
import shutil

import pytest
import torch
from torch import nn

import harness.performance
import harness.runner
from harness import checkpoint
from harness.performance import Performance
from harness.runner import Cell, cell_performance
from conftest import invoke

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU


@pytest.fixture
def spec(tiny_spec):
    tiny_spec["dataset"].update(max_train=64, max_test=32)
    tiny_spec["defense"].update(strengths=[16], options={"steps": 1, "step_size": 16})
    tiny_spec["evaluation"]["attacks"][0]["options"] = {"steps": 1, "step_size": 16}
    tiny_spec["performance"] = {"precision": "fp32"}
    return tiny_spec


def test_training_view_is_the_resolved_precision_and_tf32():
    assert Performance.from_spec({"precision": "bf16"}, CPU).training_view() == {"precision": "bf16", "tf32": False}
    # TF32 is a CUDA mode: asked for on CPU it changes nothing, so it is not a difference there
    assert Performance.from_spec({"tf32": True}, CPU).training_view() == \
        Performance.from_spec({"tf32": False}, CPU).training_view()
    on, off = (Performance.from_spec({"precision": "fp32", "tf32": t}, CUDA).training_view() for t in (True, False))
    assert on == {"precision": "fp32", "tf32": True} and off == {"precision": "fp32", "tf32": False}
    spec = {"seed": 0, "dataset": {"name": "digits"}, "defense": {"name": "none", "options": {}},
            "training": {"lr": 0.1}}
    old = checkpoint.training_view(spec, {"name": "lenet"}, 0.0, on)
    state = {"fingerprint": checkpoint.fingerprint(old), "spec": old}
    assert checkpoint.mismatch(state, checkpoint.training_view(spec, {"name": "lenet"}, 0.0, off)) == \
        ["performance.tf32: true -> false"]


def test_the_cpu_bf16_fallback_is_the_precision_in_the_fingerprint(monkeypatch):
    """A model with a conv striding past its input trains in fp32 on CPU: that, not the asked bf16, is fingerprinted,
    and run() knows it before training (cell_performance builds the model once)."""
    from harness.plugin import DataSplits, Split

    class Strided:
        def __init__(self, **options):
            pass

        def build(self, num_classes, input_shape):
            return nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.Conv2d(4, 4, 3, stride=8, padding=1),
                                 nn.Flatten(), nn.Linear(4, num_classes))

    monkeypatch.setattr(harness.runner.registry, "load", lambda kind, name: Strided)
    data = DataSplits(Split(torch.zeros(1, 1, 8, 8), torch.zeros(1, dtype=torch.long)),
                      Split(torch.zeros(1, 1, 8, 8), torch.zeros(1, dtype=torch.long)), 2, (1, 8, 8))
    bf16 = Performance.from_spec({"precision": "bf16"}, CPU)
    resolved = cell_performance(bf16, Cell({"label": "s", "name": "strided", "options": {}}, 0.0), data)
    assert resolved.training_view()["precision"] == "fp32" and "stride 8x8 on 4x4" in resolved.note
    assert cell_performance(Performance.from_spec({"precision": "fp32"}, CPU), Cell({"label": "s", "name": "x",
                            "options": {}}, 0.0), data).training_view()["precision"] == "fp32"


def test_resume_across_a_precision_change_is_refused_unless_forced(spec, write_spec, tmp_path):
    out = tmp_path / "out"
    assert invoke("run", write_spec(spec), "--out", out).exit_code == 0
    spec["performance"] = {"precision": "bf16"}
    refused = invoke("run", write_spec(spec), "--out", out)
    assert refused.exit_code == 2, refused.output
    assert 'performance.precision: "fp32" -> "bf16"' in refused.output and "--force" in refused.output
    forced = invoke("run", write_spec(spec), "--out", out, "--force")
    assert forced.exit_code == 0, forced.output
    cell = json.loads((out / "cells" / "lenet__s16.json").read_text())
    assert cell["resumed_from"] == {"epoch": 1, "step": 0} and cell["performance"]["precision"] == "bf16"
    again = invoke("run", write_spec(spec), "--out", out)  # the checkpoint now carries bf16: nothing to refuse
    assert again.exit_code == 0 and "finished earlier under the same spec" in again.output


def test_report_does_not_merge_runs_of_different_precisions(spec, write_spec, tmp_path):
    runs = {}
    for strength, precision in ((0, "fp32"), (16, "bf16")):
        one = dict(spec, defense=dict(spec["defense"], strengths=[strength]), performance={"precision": precision})
        runs[precision] = tmp_path / precision
        assert invoke("run", write_spec(one, f"{precision}.json"), "--out", runs[precision]).exit_code == 0
    refused = invoke("report", runs["fp32"], runs["bf16"], "--no-figures")
    assert refused.exit_code == 2, refused.output
    assert 'performance.precision: "fp32" -> "bf16"' in refused.output and "fix:" in refused.output

    # another model trained in bf16 (no cell shares a row with the fp32 run): the runs' resolved precisions differ
    other = dict(spec, models=[dict(spec["models"][0], label="lenet_b")], performance={"precision": "bf16"})
    assert invoke("run", write_spec(other, "other.json"), "--out", tmp_path / "other").exit_code == 0
    refused = invoke("report", runs["fp32"], tmp_path / "other", "--no-figures")
    assert refused.exit_code == 2, refused.output
    assert f'{tmp_path / "other"} differs' in refused.output and 'performance.precision: "fp32" -> "bf16"' in \
        refused.output

    # cell files without their report.json (an interrupted job): compared cell by cell, within the model's row
    cells_only = tmp_path / "cells_only"
    shutil.copytree(runs["bf16"] / "cells", cells_only / "cells")
    refused = invoke("report", runs["fp32"], cells_only, "--no-figures")
    assert refused.exit_code == 2, refused.output
    assert "model lenet: cell lenet__s0" in refused.output and 'performance.precision: "fp32" -> "bf16"' in \
        refused.output

    # seeds of one experiment: a bf16 seed beside an fp32 one is refused too
    seed1 = dict(spec, seed=1, defense=dict(spec["defense"], strengths=[0]), performance={"precision": "bf16"})
    assert invoke("run", write_spec(seed1, "seed1.json"), "--out", tmp_path / "seed1").exit_code == 0
    refused = invoke("report", "--across-seeds", runs["fp32"], tmp_path / "seed1")
    assert refused.exit_code == 2, refused.output
    assert 'performance.precision: "fp32" -> "bf16"' in refused.output

    same = tmp_path / "fp32_again"  # the same precision merges as before
    one = dict(spec, defense=dict(spec["defense"], strengths=[16]))
    assert invoke("run", write_spec(one, "again.json"), "--out", same).exit_code == 0
    merged = invoke("report", runs["fp32"], same, "--no-figures", "--out", tmp_path / "m")
    assert merged.exit_code == 0, merged.output


def test_evaluation_tf32_is_off_on_cuda_unless_asked():
    assert Performance.from_spec({}, CUDA).evaluation_tf32 is False  # while training keeps TF32 (tf32: true)
    assert Performance.from_spec({}, CUDA).training_view()["tf32"] is True
    assert Performance.from_spec({"eval_tf32": True}, CUDA).evaluation_tf32 is True
    assert Performance.from_spec({"eval_tf32": True}, CPU).evaluation_tf32 is False  # no TF32 on CPU
    assert Performance.from_spec({}, CUDA).describe()["eval_tf32"] is False
    spec = {"evaluation": {"batch_size": 8, "attacks": []}}
    assert checkpoint.fingerprint(checkpoint.evaluation_view(spec, False)) != \
        checkpoint.fingerprint(checkpoint.evaluation_view(spec, True))


@pytest.mark.parametrize("eval_tf32", [False, True])
def test_evaluation_sets_and_restores_the_tf32_flags(eval_tf32):
    """The switch itself, exercised on the process-wide flags (they can be set without a GPU)."""
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        performance = Performance.from_spec({"tf32": True, "eval_tf32": eval_tf32}, CUDA)
        harness.performance._set_tf32(True)  # training's setting, as apply_global leaves it
        with performance.evaluation():
            assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (eval_tf32, eval_tf32)
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)
        with Performance.from_spec({}, CPU).evaluation():  # on CPU: untouched
            assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)
    finally:
        harness.performance._set_tf32(*before)


def test_run_evaluates_and_analyses_inside_the_evaluation_setting(spec, write_spec, tmp_path, monkeypatch):
    inside = []

    @contextlib.contextmanager
    def recording(self):
        inside.append(True)
        try:
            yield
        finally:
            inside.pop()

    seen = {}

    def observed(name, real):
        def call(*args, **kwargs):
            seen[name] = bool(inside)
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(Performance, "evaluation", recording)
    monkeypatch.setattr(harness.runner, "evaluate", observed("evaluate", harness.runner.evaluate))
    monkeypatch.setattr(harness.runner, "analyze_cell", observed("analysis", harness.runner.analyze_cell))
    spec["analysis"] = {"max_train": 8, "steps": 1}
    result = invoke("run", write_spec(spec), "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert seen == {"evaluate": True, "analysis": True}
