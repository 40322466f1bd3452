"""`harness submit` through submitit's real local executor: the cells run as separate jobs and end equal to a plain
`harness run`; a task sent submitit's preemption signal (SIGUSR2) or SIGTERM mid-training checkpoints at a step
boundary, is requeued and resumes exactly; failed cells are recorded, shown and not requeued; the options are
validated with JSON paths; a job with two processes trains its cell through the DDP path (gloo)."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import submitit

from harness import checkpoint, submit
from harness.errors import BadInput

from conftest import (REPO, SUBMIT_CELLS, SUBMIT_SPEC, assert_same_as_a_plain_run, gate_of, gated, invoke,
                      job_env, open_gate_once_received, record_at_gate)

SPEC, CELLS = SUBMIT_SPEC, SUBMIT_CELLS


def harness(*args, cwd, env=None):
    return subprocess.Popen([sys.executable, "-m", "harness", *map(str, args)], cwd=cwd, env=env or job_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_local_submit_equals_a_plain_run_and_signalled_tasks_requeue_and_resume_exactly(evil_plugins, tmp_path):
    # pgd-at, gated: each signalled cell waits in training until its job has taken the signal, so where it stops
    # does not depend on the machine's load; the plain run it is compared with runs without the gate
    spec = gated(SPEC)
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    out, gate = tmp_path / "out", tmp_path / "gate"
    env = job_env(PYTHONPATH=f"{evil_plugins}{os.pathsep}{REPO}", HARNESS_TEST_GATE=str(gate))
    gate_of(gate, "lenet__s0").touch()  # the cell left alone
    proc = harness("submit", "spec.json", "--out", "out", "--executor", "local", "--array-parallelism", 3,
                   cwd=tmp_path, env=env)
    signals = {"lenet__s16": signal.SIGUSR2, "lenet__s32": signal.SIGTERM}  # submitit's preemption signal; kill's
    for cell_id, sig in signals.items():
        record = record_at_gate(out, gate, cell_id, alive=lambda: proc.poll() is None)
        os.kill(record["pid"], sig)
        open_gate_once_received(out, gate, record, sig.name, alive=lambda: proc.poll() is None)
    stdout, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stdout + stderr
    assert "3 cells: 3 done, 0 running, 0 queued, 0 failed, 0 interrupted, 0 not started" in stdout
    assert "all done: harness report out" in stdout

    cells = assert_same_as_a_plain_run(tmp_path / "spec.json", out, tmp_path / "plain", CELLS)
    for cell_id, a in cells.items():
        record = json.loads(submit.task_record_path(out, cell_id).read_text())
        assert record["state"] == "done"
        if cell_id in signals:  # stopped mid-training (not while evaluating), requeued once, resumed
            # from the checkpoint written at the step boundary right after the signal: the gate's step (epoch 2 of
            # 8, counted from 0 in the file, step 1 of 2), not an epoch's end
            assert record["attempt"] == 2 and a["resumed_from"] == {"epoch": 1, "step": 1}, a
            logs = out / "submit" / "logs" / record["job_id"]
            log = "".join((logs / f"{record['job_id']}_0_log.{kind}").read_text() for kind in ("err", "out"))
            assert f"interrupted by {signals[cell_id].name}: cell {cell_id} stopped after step" in log
            assert "; requeuing" in log and f"Requeued job {record['job_id']}" in log  # submitit's own requeue
        else:
            assert record["attempt"] == 1 and "resumed_from" not in a
    # the report holds every cell as its file has it (the last job to finish reassembled it)
    report = json.loads((out / "report.json").read_text())
    assert [c["id"] for c in report["cells"]] == CELLS
    assert all(c == json.loads((out / "cells" / f"{c['id']}.json").read_text()) for c in report["cells"])
    listing = invoke("report", out, "--no-figures")
    assert listing.exit_code == 0 and "lenet" in listing.output


def test_failed_cells_are_recorded_shown_and_never_requeued(evil_plugins, tmp_path, monkeypatch):
    """A bad input (a checkpoint of another learning rate) and a non-finite loss (the `explode` defense from epoch
    2 on at strength 32) fail their jobs once each; status names both errors; a second submit skips them."""
    monkeypatch.setenv("PYTHONPATH", f"{evil_plugins}{os.pathsep}{REPO}")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    spec = copy.deepcopy(SPEC)
    spec["defense"] = {"name": "explode", "strengths": [0, 32]}
    spec["training"].update(epochs=3, max_batches=4)
    spec_path, out = tmp_path / "spec.json", tmp_path / "out"
    spec_path.write_text(json.dumps(spec))
    # a real interrupted run leaves lenet__s0's checkpoint; then the learning rate changes
    real_save = checkpoint.save

    def save_then_sigterm(path, state):
        real_save(path, state)
        signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(checkpoint, "save", save_then_sigterm)
    assert invoke("run", spec_path, "--out", out, "--cell", "lenet__s0").exit_code == 143
    monkeypatch.setattr(checkpoint, "save", real_save)
    spec["training"]["lr"] = 0.05
    spec_path.write_text(json.dumps(spec))

    result = invoke("submit", spec_path, "--out", out, "--executor", "local", "--array-parallelism", 2)
    assert result.exit_code == 1, result.output
    bad = json.loads(submit.task_record_path(out, "lenet__s0").read_text())
    nan = json.loads(submit.task_record_path(out, "lenet__s32").read_text())
    assert bad["state"] == nan["state"] == "failed" and bad["attempt"] == nan["attempt"] == 1  # never requeued
    assert "the training-relevant part of the spec changed" in bad["error"]
    assert "training.lr: 0.1 -> 0.05" in bad["error"]
    assert nan["error"].startswith("training loss became inf at epoch 2, step 1")
    assert json.loads((out / "cells" / "lenet__s32.json").read_text())["status"] == "failed"

    shown = invoke("status", out)
    assert shown.exit_code == 0
    rows = {line.split()[1]: line for line in shown.output.splitlines() if line.startswith("│ lenet")}
    assert "failed" in rows["lenet__s0"] and "the training-relevant part of the spec changed" in rows["lenet__s0"]
    assert "failed" in rows["lenet__s32"] and "training loss became inf at epoch 2, step 1" in rows["lenet__s32"]
    assert "2 cells: 0 done, 0 running, 0 queued, 2 failed, 0 interrupted, 0 not started" in shown.output
    assert "--cell lenet__s0 --cell lenet__s32" in shown.output  # how to resubmit them once fixed

    again = invoke("submit", spec_path, "--out", out, "--executor", "local")
    assert again.exit_code == 0 and "nothing to submit" in again.output
    assert "cell lenet__s32: not submitted: failed (training loss became inf" in again.output


def test_the_last_job_to_finish_reassembles_a_report_that_lost_a_cell(tmp_path, write_spec, capsys):
    """Two jobs finishing together: the one that read cells/ before the other's file existed writes its report.json
    last, without that cell. The job that finds its submission finished puts it back (and only then runs)."""
    spec = copy.deepcopy(SPEC)
    spec["defense"]["strengths"] = [0, 16]
    spec["training"]["epochs"] = 1
    spec_path, out = write_spec(spec), tmp_path / "out"
    assert invoke("run", spec_path, "--out", out, "--cell", "lenet__s0").exit_code == 0
    stale = (out / "report.json").read_text()  # what the first job wrote: lenet__s0 alone
    assert invoke("run", spec_path, "--out", out, "--cell", "lenet__s16").exit_code == 0
    (out / "report.json").write_text(stale)  # ... and wrote last

    from harness import spec as spec_mod
    from harness.runner import spec_digest

    resolved = spec_mod.load(spec_path)
    task = submit.CellTask(submit.RunArgs(str(spec_path), str(out)), "lenet__s16", ["lenet__s0", "lenet__s16"],
                           ["lenet__s0", "lenet__s16"], spec_digest(resolved), "local", str(tmp_path))
    task._rebuild_report_if_last()
    report = json.loads((out / "report.json").read_text())
    assert [c["id"] for c in report["cells"]] == ["lenet__s0", "lenet__s16"]
    assert all(c == json.loads((out / "cells" / f"{c['id']}.json").read_text()) for c in report["cells"])
    before = (out / "report.json").stat().st_mtime_ns
    task._rebuild_report_if_last()  # complete already: left as it is
    assert (out / "report.json").stat().st_mtime_ns == before

    # a cell file damaged since (one digit of a metric changed: still JSON, its checksum no longer verifies): the
    # cells are read as the run reads them, so nothing is reassembled from it, and the job says what to delete
    (out / "report.json").write_text(stale)
    capsys.readouterr()
    path = out / "cells" / "lenet__s0.json"
    text = path.read_text()
    at = text.index('"clean_acc": ') + len('"clean_acc": ')
    path.write_text(text[:at] + str((int(text[at]) + 1) % 10) + text[at + 1:])
    task._rebuild_report_if_last()
    shown = capsys.readouterr()
    err = shown.err
    assert "reassembling report.json" not in shown.out  # no run started that would stop on it
    assert f"report.json not reassembled (cell result {path} is damaged" in err and f"delete {path}" in err, err
    assert (out / "report.json").read_text() == stale


def test_options_are_validated_with_json_paths_and_dry_run_submits_nothing(tmp_path, write_spec):
    spec_path = write_spec(SPEC)
    config = tmp_path / "executor.json"
    config.write_text(json.dumps({"executor": "pbs", "time": "1:2:3:4", "gpus_per_cell": -1, "partiton": "gpu",
                                  "slurm_options": {"bad key": "x"}}))
    result = invoke("submit", spec_path, "--executor-config", config, "--dry-run")
    assert result.exit_code == 2
    for expected in ("$.executor: 'pbs' is not one of ['slurm', 'local']", "$.gpus_per_cell: -1 is less than",
                     "$.time:", "unknown key 'partiton' (did you mean 'partition'?)", "$.slurm_options: 'bad key'"):
        assert expected in result.output, (expected, result.output)
    assert invoke("submit", spec_path, "--time", "1:2:3:4", "--dry-run").output.count("--time:") == 1
    assert invoke("submit", spec_path, "--mem", "lots", "--dry-run").exit_code == 2
    bad_pair = invoke("submit", spec_path, "--slurm-option", "exclusive", "--dry-run")
    assert bad_pair.exit_code == 2 and "expected key=value" in bad_pair.output

    config.write_text(json.dumps({"partition": "gpu", "time": "2-00:00:00", "gpus_per_cell": 4, "cpus_per_cell": 32,
                                  "slurm_options": {"mail-user": "me@lab.org"}}))
    out = tmp_path / "out"
    result = invoke("submit", spec_path, "--out", out, "--executor-config", config, "--qos", "high",
                    "--slurm-option", "exclusive=user", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "would submit 3 cell(s) to the slurm executor" in result.output
    sbatch = json.loads(result.output.split("sbatch options per cell: ")[1].splitlines()[0])
    assert sbatch == {"job_name": "harness-tiny", "time": 2880, "ntasks_per_node": 4, "signal_delay_s": 120,
                      "partition": "gpu", "qos": "high", "gpus_per_node": 4, "cpus_per_task": 8,
                      "additional_parameters": {"mail-user": "me@lab.org", "exclusive": "user"}}
    assert f"lenet__s16: harness run {spec_path} --out {out} --cell lenet__s16" in result.output
    assert not out.exists()  # a dry run writes nothing


def test_time_limits_and_per_process_resources():
    assert [submit.parse_time(t) for t in (90, "90", "5:30", "01:00:00", "2-12", "1-00:30", "1-00:00:01")] == \
        [90, 90, 6, 60, 3600, 1470, 1441]
    with pytest.raises(BadInput, match="does not divide over the cell's 4 processes"):
        submit.slurm_parameters({**submit.DEFAULTS, "time": 60, "gpus_per_cell": 4, "cpus_per_cell": 30,
                                 "slurm_options": {}}, "x")


def test_a_two_process_job_trains_its_cell_through_the_ddp_path(tmp_path, monkeypatch):
    """submitit's local executor with two tasks for one cell: each process gets torchrun's variables and the cell
    trains with DDP over gloo, as `torchrun --nproc_per_node=2 -m harness run` does (tests/test_distributed.py)."""
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    spec = copy.deepcopy(SPEC)
    spec["defense"].update(strengths=[16], options={"steps": 1, "step_size": 16, "random_start": False})
    spec["training"]["epochs"] = 2
    del spec["training"]["max_batches"]
    spec["performance"] = {"precision": "fp32"}  # bf16 rounds each rank's half batch differently from the whole
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    out = tmp_path / "ddp"
    task = submit.CellTask(submit.RunArgs(str(spec_path), str(out)), "lenet__s16", ["lenet__s16"], ["lenet__s16"],
                           "", "local", str(tmp_path))
    executor = submitit.LocalExecutor(folder=tmp_path / "logs" / "%j")
    executor.update_parameters(tasks_per_node=2, timeout_min=10)
    job = executor.submit(task)
    results = job.results()  # one per process; raises if a process failed
    assert results[0]["status"] == "done" and results[1] == {"cell": "lenet__s16", "rank": 1}

    two = json.loads((out / "report.json").read_text())
    plain = invoke("run", spec_path, "--out", tmp_path / "one")
    assert plain.exit_code == 0, plain.output
    one = json.loads((tmp_path / "one" / "report.json").read_text())
    assert two["environment"]["world_size"] == 2 and one["environment"]["world_size"] == 1
    a, b = one["cells"][0], two["cells"][0]
    for key in ("train_loss", "test_loss"):
        assert b["metrics"][key] == pytest.approx(a["metrics"][key], rel=1e-5, abs=1e-6), key
    assert b["metrics"]["clean_acc"] == a["metrics"]["clean_acc"]
    assert [h["train_objective"] for h in b["history"]] == pytest.approx([h["train_objective"] for h in a["history"]],
                                                                         rel=1e-5)


def test_the_heartbeat_thread_stops_once_the_record_moves_on(tmp_path, monkeypatch):
    """The heartbeat refreshes only a running record of its own job and attempt: after the task records its end
    (done, requeued, failed) the thread writes nothing more and ends by itself. HARNESS_HEARTBEAT_S sets the
    interval; anything but a positive number leaves the default."""
    record = submit._update_task_record(tmp_path, "c", "7", state="running", heartbeat=submit._now("milliseconds"),
                                        heartbeat_s=0.01)
    beat = submit.Heartbeat(tmp_path, "c", "7", record["attempt"], 0.01)
    with beat:
        while submit.read_json_file(submit.task_record_path(tmp_path, "c"))["heartbeat"] == record["heartbeat"]:
            time.sleep(0.01)
        submit._update_task_record(tmp_path, "c", "7", state="done")
        beat.thread.join(timeout=60)
        assert not beat.thread.is_alive()
    assert submit.read_json_file(submit.task_record_path(tmp_path, "c"))["state"] == "done"
    for value, expected in (("0.3", 0.3), ("", submit.HEARTBEAT_S), ("x", submit.HEARTBEAT_S),
                            ("-1", submit.HEARTBEAT_S)):
        monkeypatch.setenv("HARNESS_HEARTBEAT_S", value)
        assert submit.heartbeat_interval() == expected
