"""`harness status DIR` on a folder whose cells were made by real runs, a real interruption and a real local
submission: done (with the report's numbers), failed (with the error), interrupted (with the checkpoint's
position), running, queued and not started; the last line's totals and resubmit command; --watch."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time

from harness import checkpoint

from conftest import REPO, SUBMIT_SPEC as SPEC, gate_of, invoke, job_env, record_at_gate

FAILURE = "training loss became inf at epoch 2, step 1"


def rows(output: str) -> dict[str, str]:
    """cell id -> its table row (the first line of it)."""
    return {line.split()[1]: line for line in output.splitlines() if line.startswith("│ ") and "__s" in line}


def test_status_of_cells_in_every_state(evil_plugins, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = copy.deepcopy(SPEC)
    spec["models"] = [{"name": "lenet", "label": "a"}, {"name": "lenet", "label": "b"}]
    # explode (inf from the 5th batch on at strength 32), waiting at the gate where $HARNESS_TEST_GATE is set
    spec["defense"] = {"name": "explode-waits-for-gate", "strengths": [0, 32]}
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

    # submit what is missing, one cell at a time: b__s0 resumes, b__s32 waits for the slot (and later fails).
    # The jobs are gated: b__s0 waits in training until this test has seen it running and b__s32 queued,
    # both here and in `status --watch`, so what is seen does not depend on the machine's load.
    gate = tmp_path / "gate"
    gate_of(gate, "b__s32").touch()
    env = job_env(PYTHONPATH=f"{evil_plugins}:{REPO}", HARNESS_TEST_GATE=str(gate))
    proc = subprocess.Popen([sys.executable, "-m", "harness", "submit", "spec.json", "--out", "out", "--executor",
                             "local", "--array-parallelism", "1"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    record_at_gate(tmp_path / "out", gate, "b__s0", alive=lambda: proc.poll() is None)
    row = rows(invoke("status", "out").output)
    assert "running" in row["b__s0"] and "queued" in row["b__s32"], row
    assert "waiting for a local slot" in row["b__s32"]
    assert row["a__s0"].split("│")[2].strip() == "done" and "failed" in row["a__s32"]  # not submitted again
    watch = subprocess.Popen([sys.executable, "-m", "harness", "status", "out", "--watch", "--interval", "0.5"],
                             cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watched = []
    for line in watch.stdout:  # the watch's first table, drawn while b__s0 waits
        watched.append(line)
        if line.startswith("│ b__s0") and "running" in line:
            break
    gate_of(gate, "b__s0").touch()
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
    watched = "".join(watched) + watch.communicate(timeout=120)[0]
    assert watch.returncode == 0
    assert watched.count("harness status out") >= 2 and "running" in watched
    assert watched.rstrip().splitlines()[-1].startswith(final)


def flip_byte(path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01  # one bit of one byte, as a disk error would
    path.write_bytes(bytes(data))


def test_a_damaged_cell_file_is_shown_as_the_run_treats_it(tmp_path, monkeypatch):
    """A real run's cell file with one byte flipped: in a number, its checksum no longer verifies (the run stops
    with exit 2 until it is deleted: status shows it failed, with the fix); in its structure, it is no cell result
    (the run re-evaluates the cell from its checkpoint: status shows it interrupted, ignored, and resubmits it)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "spec.json").write_text(json.dumps(SPEC))
    assert invoke("run", "spec.json", "--out", "out", "--cell", "lenet__s0").exit_code == 0
    path = tmp_path / "out" / "cells" / "lenet__s0.json"
    good = path.read_bytes()
    assert rows(invoke("status", "out").output)["lenet__s0"].split("│")[2].strip() == "done"

    text = good.decode()
    start = text.index('"clean_acc": ') + len('"clean_acc": ')
    at = next(i for i in range(start, len(text)) if text[i].isdigit())  # a digit stays a digit: still valid JSON
    flip_byte(path, at)
    assert json.loads(path.read_text())["status"] == "done"  # a plain JSON read still sees a finished cell
    shown = invoke("status", "out")
    row = rows(shown.output)["lenet__s0"]
    assert row.split("│")[2].strip() == "failed" and "cell file damaged:" in row, shown.output
    assert "Acc." not in row
    assert "1 failed" in shown.output and "--cell lenet__s0" in shown.output  # resubmit once fixed (deleted)
    assert "every run in this folder stops on a damaged cell file (exit 2): first rm out/cells/lenet__s0.json" \
        in shown.output
    for cell_id in ("lenet__s0", "lenet__s16"):  # what the run does with it: stops, whichever cell it runs
        rerun = invoke("run", "spec.json", "--out", "out", "--cell", cell_id)
        assert rerun.exit_code == 2 and "lenet__s0.json is damaged" in rerun.output
    assert not (tmp_path / "out" / "checkpoints" / "lenet__s16.pt").exists()

    path.write_bytes(good)
    flip_byte(path, 0)  # '{' -> 'z': not JSON any more, so no cell result: as if absent
    shown = invoke("status", "out")
    row = rows(shown.output)["lenet__s0"]
    assert row.split("│")[2].strip() == "interrupted" and "cell file ignored (it is not JSON" in row, shown.output
    assert "trained (8 epochs), not evaluated yet" in shown.output  # its checkpoint is complete
    assert "resubmit what is missing: harness submit SPEC --out out" in shown.output
    assert "damaged cell file" not in shown.output
    rerun = invoke("run", "spec.json", "--out", "out", "--cell", "lenet__s0")
    assert rerun.exit_code == 0 and "re-evaluating" in rerun.output, rerun.output
    assert rows(invoke("status", "out").output)["lenet__s0"].split("│")[2].strip() == "done"


def test_a_job_killed_outright_on_another_host_is_shown_interrupted_once_its_heartbeat_stops(tmp_path, monkeypatch):
    """A real local job, SIGKILLed (as a node failure or the OOM killer would): on this host its process is gone;
    seen from another host (status's hostname patched), only its heartbeat, refreshed while it ran, tells: once
    it is LOST_AFTER intervals old the cell is interrupted, with what to check, and the resubmit command takes it."""
    from harness import status as status_mod, submit

    monkeypatch.chdir(tmp_path)
    spec = copy.deepcopy(SPEC)
    spec["training"]["epochs"] = 100_000  # killed long before the end
    spec["defense"]["strengths"] = [0]  # one cell: what is missing is that one
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "harness", "submit", "spec.json", "--out", "out", "--executor",
                             "local", "--cell", "lenet__s0"], cwd=tmp_path, env=job_env(HARNESS_HEARTBEAT_S="0.3"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 900
        first = None
        while True:  # the heartbeat moves on while the cell trains
            record = submit.read_json_file(submit.task_record_path(out, "lenet__s0")) or {}
            if record.get("state") == "running" and (out / "checkpoints" / "lenet__s0.pt").exists():
                first = first or record["heartbeat"]
                if record["heartbeat"] != first:
                    break
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        assert record["heartbeat_s"] == 0.3
        monkeypatch.setattr(status_mod.socket, "gethostname", lambda: "another-host")
        while "running" not in rows(invoke("status", "out").output)["lenet__s0"]:  # alive by its heartbeat alone
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        os.kill(record["pid"], signal.SIGKILL)
        while True:
            shown = invoke("status", "out")
            row = rows(shown.output)["lenet__s0"]
            if "interrupted" in row:
                break
            assert "running" in row and time.monotonic() < deadline, shown.output
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert "no sign of life for" in row and "the job may have died" in row, shown.output
    assert "epoch " in row  # where it stopped: its last checkpoint
    assert "1 interrupted" in shown.output
    assert "resubmit what is missing: harness submit spec.json --out out --executor-config" in shown.output
    resubmit = invoke("submit", "spec.json", "--out", "out", "--executor-config", "out/submit/executor.json",
                      "--dry-run")
    assert resubmit.exit_code == 0 and "would submit 1 cell(s)" in resubmit.output, resubmit.output

    monkeypatch.undo()  # seen from this host: the process is gone
    monkeypatch.chdir(tmp_path)
    row = rows(invoke("status", "out").output)["lenet__s0"]
    assert "interrupted" in row and "ended without a result" in row
