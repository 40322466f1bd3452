"""`--log tensorboard DIR` (harness.tracking): the event files, read back with TensorBoard's own reader, hold the
report's numbers (per epoch and per cell, one TensorBoard run per cell), a resumed cell shows every epoch exactly
once, logging changes no result, and a missing tensorboard package is bad input before anything trains."""

import copy
import json
import signal
import sys

import numpy as np
import pytest

import harness
from harness import checkpoint
from harness.errors import BadInput

from conftest import TINY_SPEC, invoke, without_timings

pytest.importorskip("tensorboard")  # the `test` extra installs it; without it only the BadInput test could run
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

SPEC = copy.deepcopy(TINY_SPEC)  # two cells (strengths 0 and 32), two epochs of two steps each
SPEC["dataset"].update(max_train=128, max_test=32)
SPEC["training"].update(epochs=2, batch_size=32, max_batches=2)
SPEC["evaluation"].update(checks={"enabled": False})
SPEC["analysis"] = {"enabled": False}
CELLS = ["lenet__s0", "lenet__s32"]


def f32(value: float) -> float:
    """A scalar as TensorBoard stores it (float32)."""
    return float(np.float32(value))


def read(folder) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of one TensorBoard run as [(step, value), ...] in the order TensorBoard shows them."""
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def expected(cell: dict) -> dict[str, list[tuple[int, float]]]:
    """What one cell's run must show: each history record's numbers at its epoch, the metrics at the last epoch."""
    history, metrics = cell["history"], cell["metrics"]
    last = history[-1]["epoch"]
    want = {f"train/{key}": [(h["epoch"], f32(h[key])) for h in history]
            for key in ("lr", "train_objective", "seconds")}
    for key in ("clean_acc", "ge", "train_loss", "test_loss", "pgd_acc", "robust_acc"):
        want[f"eval/{key}"] = [(last, f32(metrics[key]))]
    for label, entry in metrics["attacks"].items():
        want[f"eval/attack/{label}/acc"] = [(last, f32(entry["acc"]))]
    for eps, entry in metrics["worst_case"].items():
        want[f"eval/worst_case/{eps}/acc"] = [(last, f32(entry["acc"]))]
    return want


def assert_logged(tb_root, report: dict) -> None:
    run = tb_root / f"{report['spec']['name']}-seed{report['spec']['seed']}"
    assert sorted(p.name for p in run.iterdir()) == CELLS  # one TensorBoard run per cell
    for cell in report["cells"]:
        assert read(run / cell["id"]) == expected(cell), cell["id"]
        assert len(list((run / cell["id"]).glob("events.out.tfevents.*"))) == 1  # a rerun replaces, never adds
        acc = EventAccumulator(str(run / cell["id"]))
        acc.Reload()
        assert set(acc.PluginTagToContent("hparams")) == {"_hparams_/experiment", "_hparams_/session_start_info",
                                                          "_hparams_/session_end_info"}


def test_scalars_are_the_reports_numbers_and_change_nothing(tmp_path):
    report = harness.run(copy.deepcopy(SPEC), out=tmp_path / "out", log={"tensorboard": tmp_path / "tb"},
                         figures=False, quiet=True)
    assert [c["id"] for c in report["cells"]] == CELLS and all(c["status"] == "done" for c in report["cells"])
    assert [h["epoch"] for h in report["cells"][0]["history"]] == [1, 2]
    assert_logged(tmp_path / "tb", report)

    # logging draws no random number and runs no extra pass: the same results as a run without it
    plain = harness.run(copy.deepcopy(SPEC), out=tmp_path / "plain", figures=False, quiet=True)
    assert without_timings(plain["cells"]) == without_timings(report["cells"])

    # cells finished earlier are kept, and logged as they are into a tracker added afterwards
    kept = harness.run(copy.deepcopy(SPEC), out=tmp_path / "out", log={"tensorboard": tmp_path / "tb2"},
                       figures=False, quiet=True)
    assert kept["cells"] == report["cells"]
    assert_logged(tmp_path / "tb2", report)


def test_a_resumed_cell_shows_each_epoch_once(tmp_path, write_spec, monkeypatch):
    spec_path, tb = write_spec(SPEC), tmp_path / "tb"
    real_save = checkpoint.save
    saved = []

    def save_then_sigint(path, state):
        real_save(path, state)
        saved.append((path.name, state["epoch"], state["step"]))
        if len(saved) == 1:  # after epoch 1 of the first cell: stops at the next step, in epoch 2
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(checkpoint, "save", save_then_sigint)
    stopped = invoke("run", spec_path, "--out", tmp_path / "out", "--log", "tensorboard", tb)
    assert stopped.exit_code == 130, stopped.output
    assert f"--log tensorboard {tb}" in stopped.output  # the resume command keeps logging
    first = tb / "tiny-seed0" / "lenet__s0"
    assert [s for s, _ in read(first)["train/train_objective"]] == [1]  # epoch 1 logged as it ended
    monkeypatch.setattr(checkpoint, "save", real_save)

    resumed = invoke("run", spec_path, "--out", tmp_path / "out", "--log", "tensorboard", tb)
    assert resumed.exit_code == 0, resumed.output
    report = harness.run(spec_path, out=tmp_path / "out", figures=False, quiet=True)  # all kept: the report
    assert report["cells"][0]["resumed_from"] == {"epoch": 1, "step": 1}
    assert_logged(tb, report)  # steps 1 and 2 once each, the values of the resumed run's report

    straight = harness.run(spec_path, out=tmp_path / "straight", log={"tensorboard": tmp_path / "tb-straight"},
                           figures=False, quiet=True)
    for cell in CELLS:  # the resumed curves are the uninterrupted run's (the wall-clock seconds aside)
        a, b = read(tb / "tiny-seed0" / cell), read(tmp_path / "tb-straight" / "tiny-seed0" / cell)
        assert {t: v for t, v in a.items() if t != "train/seconds"} == \
            {t: v for t, v in b.items() if t != "train/seconds"}
    assert without_timings(straight["cells"]) == without_timings(report["cells"])


def test_without_tensorboard_it_is_bad_input_before_training(tmp_path, write_spec, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` raises ImportError
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)  # imported by an earlier test
    result = invoke("run", write_spec(SPEC), "--out", tmp_path / "out", "--log", "tensorboard", tmp_path / "tb")
    assert result.exit_code == 2, result.output
    assert "pip install 'harness[tensorboard]'" in result.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "tb").exists()  # nothing trained, nothing written
    with pytest.raises(BadInput, match=r"harness\[tensorboard\]"):
        harness.run(copy.deepcopy(SPEC), out=tmp_path / "out", log={"tensorboard": tmp_path / "tb"}, quiet=True)


def test_unknown_tracker_is_bad_input(tmp_path, write_spec):
    result = invoke("run", write_spec(SPEC), "--out", tmp_path / "out", "--log", "wandb", tmp_path / "w")
    assert result.exit_code == 2 and "tensorboard" in result.output
    with pytest.raises(BadInput, match="unknown tracker 'wandb'"):
        harness.run(copy.deepcopy(SPEC), out=tmp_path / "out", log={"wandb": "w"}, quiet=True)
    assert not (tmp_path / "out").exists()


def test_submitted_jobs_log_as_harness_run_does_and_status_resubmits_with_log(write_spec, tmp_path):
    """`harness submit --log tensorboard DIR` passes --log to every job (submitit's real local executor): each
    cell's TensorBoard run holds the report's numbers; the submission records it, so the resubmit command that
    `harness status` prints keeps it; a dry run shows it in each job's command."""
    from harness import status, submit

    spec_path, out, tb = write_spec(SPEC), tmp_path / "out", tmp_path / "tb"
    dry = invoke("submit", spec_path, "--out", out, "--executor", "local", "--log", "tensorboard", tb, "--dry-run")
    assert dry.exit_code == 0 and dry.output.count(f"--log tensorboard {tb}") == len(CELLS), dry.output
    assert not tb.exists()  # a dry run writes nothing
    result = invoke("submit", spec_path, "--out", out, "--executor", "local", "--log", "tensorboard", tb)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert_logged(tb, report)
    assert submit.submissions(out)[-1]["run_options"]["log"] == [["tensorboard", str(tb.resolve())]]
    again = status.resubmit_command(out, status.status(out), cells=[CELLS[0]])
    assert again[again.index("--log"):again.index("--log") + 3] == ["--log", "tensorboard", str(tb.resolve())]
