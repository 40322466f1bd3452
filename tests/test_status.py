"""`harness status DIR` on a folder whose cells were made by real runs, a real interruption and a real local
submission: done (with the report's numbers), failed (with the error), interrupted (with the checkpoint's
position), running, queued and not started; the last line's totals and resubmit command; --watch."""

from __future__ import annotations

import copy
import json
import signal
import subprocess
import sys
import time

from harness import checkpoint

from conftest import REPO, SUBMIT_SPEC as SPEC, invoke, job_env

FAILURE = "training loss became inf at epoch 2, step 1"


def rows(output: str) -> dict[str, str]:
    """cell id -> its table row (the first line of it)."""
    return {line.split()[1]: line for line in output.splitlines() if line.startswith("│ ") and "__s" in line}


def test_status_of_cells_in_every_state(evil_plugins, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = copy.deepcopy(SPEC)
    spec["models"] = [{"name": "lenet", "label": "a"}, {"name": "lenet", "label": "b"}]
    spec["defense"] = {"name": "explode", "strengths": [0, 32]}  # inf from the 5th batch on at strength 32
    spec["training"].update(epochs=3, max_batches=4)
    (tmp_path / "spec.json").write_text(json.dumps(spec))

    assert invoke("run", "spec.json", "--out", "out", "--cell", "a__s0").exit_code == 0
    assert invoke("run", "spec.json", "--out", "out", "--cell", "a__s32").exit_code == 1  # non-finite loss
    real_save = checkpoint.save

    def save_then_sigterm(path, state):  # SIGTERM right after the first epoch's checkpoint
        real_save(path, state)
        signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(checkpoint, "save", save_then_sigterm)
    assert invoke("run", "spec.json", "--out", "out", "--cell", "b__s0").exit_code == 143
    monkeypatch.setattr(checkpoint, "save", real_save)

    shown = invoke("status", "out")
    assert shown.exit_code == 0, shown.output
    row = rows(shown.output)
    metrics = json.loads((tmp_path / "out" / "cells" / "a__s0.json").read_text())["metrics"]
    assert row["a__s0"].split("│")[2].strip() == "done"
    assert f"Acc. {metrics['clean_acc']:.2f}  GE {metrics['ge']:.4f}  PGD {metrics['pgd_acc']:.2f}" in row["a__s0"]
    assert row["a__s32"].split("│")[2].strip() == "failed" and FAILURE in row["a__s32"]
    assert row["b__s0"].split("│")[2].strip() == "interrupted" and "epoch 1/3 +1 steps" in row["b__s0"]
    assert row["b__s32"].split("│")[2].strip() == "not started"
    assert "4 cells: 1 done, 0 running, 0 queued, 1 failed, 1 interrupted, 1 not started" in shown.output
    assert "resubmit what is missing: harness submit SPEC --out out" in shown.output  # no submission yet

    # submit what is missing, one cell at a time: b__s0 resumes, b__s32 waits for the slot (and later fails)
    env = job_env(PYTHONPATH=f"{evil_plugins}:{REPO}")
    proc = subprocess.Popen([sys.executable, "-m", "harness", "submit", "spec.json", "--out", "out", "--executor",
                             "local", "--array-parallelism", "1"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 900  # generous: a loaded machine takes minutes to start jobs
    while True:
        row = rows(invoke("status", "out").output)
        if "running" in row["b__s0"] and "queued" in row["b__s32"]:
            break
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    assert "waiting for a local slot" in row["b__s32"]
    watch = subprocess.Popen([sys.executable, "-m", "harness", "status", "out", "--watch", "--interval", "0.5"],
                             cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert row["a__s0"].split("│")[2].strip() == "done" and "failed" in row["a__s32"]  # not submitted again
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 1, stdout + stderr  # b__s32 failed
    assert f"cell a__s32: not submitted: failed ({FAILURE}" in stdout

    shown = invoke("status", "out")
    row = rows(shown.output)
    assert row["b__s0"].split("│")[2].strip() == "done" and row["b__s32"].split("│")[2].strip() == "failed"
    assert FAILURE in row["b__s32"]
    final = "4 cells: 2 done, 0 running, 0 queued, 2 failed, 0 interrupted, 0 not started"
    assert final in shown.output
    assert ("failed cells, once their cause is fixed: harness submit spec.json --out out --executor-config "
            "out/submit/executor.json --cell a__s32 --cell b__s32") in shown.output
    b0 = json.loads((tmp_path / "out" / "cells" / "b__s0.json").read_text())
    assert b0["resumed_from"] == {"epoch": 1, "step": 1}

    # --watch redrew the table while cells ran and stopped by itself once none was queued or running
    watched, _ = watch.communicate(timeout=120)
    assert watch.returncode == 0
    assert watched.count("harness status out") >= 2 and "running" in watched
    assert watched.rstrip().splitlines()[-1].startswith(final)
