"""Fault injection, integrity (issue 12: 1, 2, 8, 9, 11, 12): files a run reads back that collide, are damaged,
have the wrong shape, hold non-finite numbers, or name paths outside their folder; temporary files a kill leaves.

Every case runs the real CLI on the tiny digits spec and asserts the exit code, the message, that no traceback
reaches the user and, where the run can go on, that the final report equals an uninterrupted run's. One finished
run per module (`finished`) is copied into each test's folder, so each fault costs at most one cell's run.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from harness import checkpoint, registry
from harness.errors import RunFailure
from harness.report import write_json_atomic

from conftest import REPO, TINY_SPEC, finished_run, invoke

CELL = "lenet__s0"


def small_spec() -> dict:
    spec = copy.deepcopy(TINY_SPEC)
    spec["dataset"].update(max_train=64, max_test=32)
    spec["defense"].update(strengths=[0])
    spec["training"].update(epochs=1, batch_size=32)
    spec["evaluation"]["attacks"][0]["options"] = {"steps": 1, "step_size": 16}
    spec["analysis"] = {"max_train": 16, "steps": 1}
    return spec


def comparable(report: dict) -> dict:
    """What must not depend on interruptions and reruns: everything but wall-clock times and resume records."""
    out = {k: v for k, v in report.items() if k not in ("created", "environment")}
    out["cells"] = []
    for cell in report["cells"]:
        cell = {k: v for k, v in cell.items() if k not in ("seconds", "timings", "resumed_from", "checksum")}
        cell["history"] = [{k: v for k, v in h.items() if k != "seconds"} for h in cell.get("history", [])]
        if "analysis" in cell:
            cell["analysis"] = {k: v for k, v in cell["analysis"].items() if k != "seconds"}
        out["cells"].append(cell)
    return out


def read_report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text(), parse_constant=_refuse)


def _refuse(name):
    raise AssertionError(f"report.json holds {name}: not JSON")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """(spec path, a finished run's folder): one cell, trained, evaluated, analysed."""
    out = finished_run(tmp_path_factory.mktemp("finished"), small_spec())
    return out.parent / "spec.json", out


@pytest.fixture
def copy_of(finished, tmp_path):
    spec_path, out = finished
    shutil.copytree(out, tmp_path / "out")
    return spec_path, tmp_path / "out"


# ---------------------------------------------------------------------------------------------- 1: cell ids


def assert_validate_and_run_refuse(path, out, *needles) -> None:
    """`harness validate` and `harness run` both exit 2 with a message holding every needle; the run writes
    nothing: refused before anything runs."""
    for command in (["validate", path], ["run", path, "--out", out]):
        result = invoke(*command)
        assert result.exit_code == 2, result.output
        for needle in needles:
            assert needle in result.output, (needle, result.output)
    assert not out.exists()


def test_strengths_that_name_the_same_cell_are_refused_before_anything_runs(write_spec, tmp_path):
    spec = small_spec()
    spec["defense"]["strengths"] = [8, 8.0000001]  # both print as lenet__s8
    assert_validate_and_run_refuse(write_spec(spec), tmp_path / "out", "$.defense.strengths[1]", "lenet__s8",
                                   "$.defense.strengths[0]", "fix:")


def test_model_labels_differing_only_in_case_are_refused(write_spec, tmp_path):
    spec = small_spec()
    spec["models"] = [{"name": "lenet", "label": "LeNet", "options": {"spectral_norm": True}},
                      {"name": "lenet", "label": "lenet", "options": {"spectral_norm": False}}]
    assert_validate_and_run_refuse(write_spec(spec), tmp_path / "out", "$.models[1].label", "$.models[0]", "case",
                                   "fix:")


def test_a_label_equal_to_another_model_name_once_sanitized_is_refused(write_spec):
    spec = small_spec()
    spec["models"] = [{"name": "timm:resnet18"}, {"name": "lenet", "label": "TIMM-resnet18"}]
    result = invoke("validate", write_spec(spec))
    assert result.exit_code == 2 and "$.models[1].label" in result.output, result.output


def test_a_checkpoint_of_another_training_spec_is_not_resumed_when_it_appears_after_planning(copy_of, write_spec,
                                                                                           monkeypatch):
    """The fingerprint is checked by the cell that loads the checkpoint, not only when the run is planned (two
    cells with one id used to 'resume' each other's finished checkpoint)."""
    _, out = copy_of
    (out / "cells" / f"{CELL}.json").unlink()
    spec = small_spec()
    spec["training"]["lr"] = 0.05
    monkeypatch.setattr(checkpoint, "plan_resume",  # the checkpoint appears after the plan decided to start
                        lambda spec, cells, *a, **k: {c.id: "start" for c in cells})
    result = invoke("run", write_spec(spec), "--out", out)
    assert result.exit_code == 2, result.output
    assert f"{out / 'checkpoints' / CELL}.pt" in result.output and "training.lr: 0.1 -> 0.05" in result.output
    assert not (out / "cells" / f"{CELL}.json").exists()


# ---------------------------------------------------------------------------------------------- 2: checksums


def flip_a_byte_inside(ckpt: Path, key: str) -> None:
    """Change one byte in the middle of the stored data of the model tensor `key` (torch stores tensors
    uncompressed in the zip), as a bad disk block or a cosmic ray would."""
    tensor = torch.load(ckpt, weights_only=True)["model"][key]
    raw, data = bytearray(ckpt.read_bytes()), tensor.contiguous().numpy().tobytes()
    at = raw.find(data)
    assert at > 0 and raw.find(data, at + 1) < 0
    raw[at + len(data) // 2] ^= 0x40
    ckpt.write_bytes(bytes(raw))


def test_a_flipped_byte_in_a_checkpoint_weight_stops_the_run_naming_the_file(copy_of, finished):
    spec_path, out = copy_of
    (out / "cells" / f"{CELL}.json").unlink()  # the cell is re-evaluated from its finished checkpoint
    ckpt = out / "checkpoints" / f"{CELL}.pt"
    flip_a_byte_inside(ckpt, "conv1.weight" if "conv1.weight" in torch.load(ckpt, weights_only=True)["model"]
                       else next(iter(torch.load(ckpt, weights_only=True)["model"])))
    result = invoke("run", spec_path, "--out", out)
    assert result.exit_code == 2, result.output
    assert f"checkpoint {ckpt}" in result.output and "checksum" in result.output
    assert f"delete {ckpt}" in result.output and "--fresh" in result.output
    assert not (out / "cells" / f"{CELL}.json").exists()

    ckpt.unlink()  # as the message says: that cell is trained again, to the same result
    again = invoke("run", spec_path, "--out", out)
    assert again.exit_code == 0, again.output
    assert comparable(read_report(out)) == comparable(read_report(finished[1]))


def test_a_changed_number_in_a_cell_file_stops_run_and_report(copy_of):
    spec_path, out = copy_of
    path = out / "cells" / f"{CELL}.json"
    cell = json.loads(path.read_text())
    cell["metrics"]["clean_acc"] = 99.0  # a confident, wrong number
    path.write_text(json.dumps(cell, indent=2))
    for command in (["run", spec_path, "--out", out], ["report", out, "--no-figures"]):
        result = invoke(*command)
        assert result.exit_code == 2, result.output
        assert str(path) in result.output and "checksum" in result.output and "--fresh" in result.output


# ---------------------------------------------------------------------------------------------- 8: wrong shapes


def without_checksum(cell: dict) -> dict:
    return {k: v for k, v in cell.items() if k != "checksum"}


@pytest.mark.parametrize("content", [
    "[]", '"a string"', "{not json",
    lambda cell: json.dumps(dict(without_checksum(cell), metrics="two")),
    lambda cell: json.dumps(dict(without_checksum(cell), history={"epoch": "two"})),
], ids=["list", "string", "not-json", "metrics-a-string", "history-a-dict"])
def test_a_cell_file_of_the_wrong_shape_is_re_evaluated(copy_of, finished, content):
    spec_path, out = copy_of
    path = out / "cells" / f"{CELL}.json"
    path.write_text(content(json.loads(path.read_text())) if callable(content) else content)
    result = invoke("run", spec_path, "--out", out)
    assert result.exit_code == 0, result.output
    assert f"ignoring {path}" in result.output and "re-evaluat" in result.output
    assert f"cell {CELL}: re-evaluating (training unchanged)" in result.output  # from the finished checkpoint
    assert comparable(read_report(out)) == comparable(read_report(finished[1]))


def _epoch_two(state):
    return {k: v for k, v in state.items() if k != "checksum"} | {"epoch": "two"}


@pytest.mark.parametrize("content", [
    lambda state: [1, 2, 3],
    lambda state: "a string",
    _epoch_two,
    lambda state: {k: v for k, v in state.items() if k not in ("checksum", "optimizer")},
    lambda state: {"weights": torch.zeros(3)},
], ids=["list", "string", "epoch-two", "no-optimizer", "foreign"])
def test_a_checkpoint_of_the_wrong_shape_is_retrained(copy_of, finished, content):
    spec_path, out = copy_of
    (out / "cells" / f"{CELL}.json").unlink()
    ckpt = out / "checkpoints" / f"{CELL}.pt"
    torch.save(content(torch.load(ckpt, weights_only=True)), ckpt)
    result = invoke("run", spec_path, "--out", out)
    assert result.exit_code == 0, result.output
    assert f"ignoring {ckpt}" in result.output and "from the start" in result.output
    assert "resuming from" not in result.output
    assert comparable(read_report(out)) == comparable(read_report(finished[1]))


# ---------------------------------------------------------------------------------------------- 9: non-finite


def test_eval_refuses_weights_holding_nan(write_spec, tmp_path):
    spec = small_spec()
    model = registry.load("model", "lenet")(spectral_norm=True).build(10, (1, 8, 8))
    state = model.state_dict()
    key = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
    state[key][0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    result = invoke("eval", write_spec(spec), "--weights", tmp_path / "nan.pt", "--out", tmp_path / "eval")
    assert result.exit_code == 2, result.output
    assert "non-finite" in result.output and key in result.output and "fix:" in result.output
    assert not (tmp_path / "eval" / "report.json").exists()


def test_a_cell_whose_metrics_come_out_non_finite_fails_and_reports_stay_json(copy_of, monkeypatch):
    spec_path, out = copy_of
    (out / "cells" / f"{CELL}.json").unlink()
    from harness import runner

    real_evaluate = runner.evaluate

    def overflowing(*args, **kwargs):  # what a model whose logits overflow to inf yields
        metrics = real_evaluate(*args, **kwargs)
        return dict(metrics, test_loss=float("inf"), ge=float("nan"))

    monkeypatch.setattr(runner, "evaluate", overflowing)
    result = invoke("run", spec_path, "--out", out)
    assert result.exit_code == 1, result.output
    assert "non-finite" in result.output and "metrics.ge" in result.output
    cell = read_report(out)["cells"][0]  # strict JSON: no NaN, no Infinity
    assert cell["status"] == "failed" and "metrics.test_loss" in cell["error"]


def test_the_json_writer_refuses_non_finite_numbers_naming_them(tmp_path):
    with pytest.raises(RunFailure, match=r"\$\.cells\[0\]\.metrics\.ge"):
        write_json_atomic(tmp_path / "r.json", {"cells": [{"metrics": {"ge": float("nan")}}]})
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary file left


# ---------------------------------------------------------------------------------------------- 11: paths


def test_a_merged_report_is_never_written_outside_reports(finished, tmp_path, monkeypatch):
    for copy_name in ("a", "b"):
        shutil.copytree(finished[1], tmp_path / copy_name)
        report = json.loads((tmp_path / copy_name / "report.json").read_text())
        report["spec"]["name"] = "../../escaped"
        (tmp_path / copy_name / "report.json").write_text(json.dumps(report))
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    result = invoke("report", tmp_path / "a", tmp_path / "b", "--no-figures")
    assert result.exit_code == 2, result.output
    assert "$.spec.name" in result.output and "../../escaped" in result.output and "--out" in result.output
    assert not list(tmp_path.parent.glob("escaped*")) and not list(tmp_path.glob("escaped*"))
    assert not (tmp_path / "work" / "reports").exists()


# ---------------------------------------------------------------------------------------------- 12: temp files


def killed_mid_write(folder: Path, name: str) -> Path:
    """A real process killed (SIGKILL) while harness.paths.write_atomic writes folder/name: its temp file stays."""
    code = ("import sys, time; from pathlib import Path; from harness.paths import write_atomic\n"
            "write_atomic(Path(sys.argv[1]), lambda fh: (fh.write(b'half'), fh.flush(), print('writing', flush=True),"
            " time.sleep(60)))")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder / name)], stdout=subprocess.PIPE, env=env,
                            text=True)
    assert proc.stdout.readline() == "writing\n"
    temps = list(folder.glob(f".{name}.*.tmp"))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert len(temps) == 1 and temps[0].name.startswith(f".{name}.{proc.pid}.")
    return temps[0]


def test_temp_files_of_killed_writers_are_removed_on_the_next_run_and_live_ones_kept(copy_of, finished):
    spec_path, out = copy_of
    orphans = [killed_mid_write(out / "checkpoints", f"{CELL}.pt"), killed_mid_write(out / "cells", f"{CELL}.json"),
               killed_mid_write(out, "report.json")]
    dead_pid = int(orphans[0].name.split(".")[-3])
    # a writer on another machine sharing the folder: its pid means nothing here, but it holds the file's lock
    remote = out / "cells" / f".other__s1.json.{dead_pid}.zz99.tmp"
    remote.write_bytes(b"being written elsewhere")
    holder = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX); "
              "print('locked', flush=True); time.sleep(120)")
    locker = subprocess.Popen([sys.executable, "-c", holder, str(remote)], stdout=subprocess.PIPE, text=True)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:  # another job, still writing into the same folder: its temp file must survive
        assert locker.stdout.readline() == "locked\n"
        live = out / "checkpoints" / f".other__s1.pt.{alive.pid}.abcd1234.tmp"
        live.write_bytes(b"being written")
        mine = out / "notes.tmp"
        mine.write_text("not a temporary file of the harness")
        result = invoke("run", spec_path, "--out", out)
        assert result.exit_code == 0, result.output
        assert "removed 3 temporary files left by interrupted writers" in result.output
        assert not any(p.exists() for p in orphans)
        assert live.exists() and remote.exists() and mine.exists()
        assert comparable(read_report(out)) == comparable(read_report(finished[1]))
    finally:
        for proc in (alive, locker):
            proc.kill()
            proc.wait()
