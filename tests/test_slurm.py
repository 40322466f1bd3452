"""`harness submit --executor slurm` on a real single-node Slurm (tests/slurm/setup_slurm.sh starts one; .ci/run
does so before the tests): the array's cells end equal to a plain run, a task requeued by `scontrol requeue`
(Slurm's preemption path: SIGTERM, then queued again) and one sent SIGUSR2 (Slurm's time-limit warning: submitit
requeues it) both resume from their checkpoints exactly. Skipped, with the reason, where no Slurm answers."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import status, submit

from conftest import (REPO, SUBMIT_CELLS as CELLS, SUBMIT_SPEC as SPEC, assert_same_as_a_plain_run, gate_of, gated,
                      invoke, job_env, open_gate_once_received, record_at_gate)


def _why_no_slurm() -> str | None:
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return "no Slurm here (sbatch/sinfo not found); tests/slurm/setup_slurm.sh installs and starts one"
    try:
        shown = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"sinfo failed: {exc}"
    states = shown.stdout.split()
    if shown.returncode != 0 or not any(s in ("idle", "mixed", "allocated") for s in states):
        return f"no Slurm node is up (sinfo: {(shown.stdout + shown.stderr).strip()[:300]!r})"
    return None


WHY = _why_no_slurm()
pytestmark = pytest.mark.skipif(WHY is not None, reason=WHY or "")


def wait_running(out: Path, cell_id: str, timeout: float = 900) -> dict:
    """The cell's task record once its job has written the first checkpoint."""
    deadline = time.monotonic() + timeout
    ckpt = out / "checkpoints" / f"{cell_id}.pt"
    while True:
        record = submit.read_json_file(submit.task_record_path(out, cell_id)) or {}
        if ckpt.exists() and record.get("state") == "running":
            return record
        assert time.monotonic() < deadline, f"{cell_id} did not start: {record}"
        time.sleep(0.05)


def test_slurm_array_equals_a_plain_run_and_requeued_tasks_resume_exactly(evil_plugins, tmp_path):
    # pgd-at, gated (the jobs inherit the environment): each signalled cell waits in training until its job has
    # taken the signal, so where it stops does not depend on the machine's load
    spec = gated(SPEC)
    spec["training"]["epochs"] = 10
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    out, gate = tmp_path / "out", tmp_path / "gate"
    env = job_env(PYTHONPATH=f"{evil_plugins}{os.pathsep}{REPO}", HARNESS_TEST_GATE=str(gate))
    gate_of(gate, "lenet__s0").touch()  # the cell left alone
    done = subprocess.run([sys.executable, "-m", "harness", "submit", "spec.json", "--out", "out", "--executor",
                           "slurm", "--time", "30", "--cpus-per-cell", "1"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    jobs = dict(re.findall(r"cell (\S+): Slurm job (\S+)", done.stdout))
    assert list(jobs) == CELLS and len({j.split("_")[0] for j in jobs.values()}) == 1  # one array
    try:
        # preemption / requeue by an admin: Slurm sends SIGTERM, the task checkpoints, Slurm queues it again
        record = record_at_gate(out, gate, "lenet__s16")
        subprocess.run(["scontrol", "requeue", record["job_id"]], check=True, timeout=60)
        open_gate_once_received(out, gate, record, "SIGTERM")
        # the time-limit warning (--signal=USR2@...): the task checkpoints, submitit requeues it
        record = record_at_gate(out, gate, "lenet__s32")
        subprocess.run(["scancel", "--signal=USR2", record["job_id"]], check=True, timeout=60)
        open_gate_once_received(out, gate, record, "SIGUSR2")

        deadline = time.monotonic() + 900
        while status.active(status.status(out)):  # some cell queued or running
            assert time.monotonic() < deadline, invoke("status", out).output
            time.sleep(1)
        shown = invoke("status", out)
        assert "3 cells: 3 done, 0 running, 0 queued, 0 failed" in shown.output, shown.output
    finally:
        subprocess.run(["scancel", *jobs.values()], timeout=60)

    cells = assert_same_as_a_plain_run(tmp_path / "spec.json", out, tmp_path / "plain", CELLS)
    for cell_id, a in cells.items():
        record = json.loads(submit.task_record_path(out, cell_id).read_text())
        assert record["job_id"] == jobs[cell_id] and record["executor"] == "slurm"
        if cell_id == "lenet__s0":
            assert record["attempt"] == 1 and "resumed_from" not in a
        else:  # stopped at the step boundary right after the signal (the gate's: epoch 2, step 1), resumed there
            assert record["attempt"] == 2 and a["resumed_from"] == {"epoch": 1, "step": 1}, (record, a)
    log = (out / "submit" / "logs" / jobs["lenet__s16"] / f"{jobs['lenet__s16']}_0_log.err").read_text()
    assert "interrupted by SIGTERM: cell lenet__s16 stopped after step" in log and "Slurm requeues the job" in log
    log = (out / "submit" / "logs" / jobs["lenet__s32"] / f"{jobs['lenet__s32']}_0_log.err").read_text()
    assert "interrupted by SIGUSR2: cell lenet__s32 stopped after step" in log and "; requeuing" in log
    report = json.loads((out / "report.json").read_text())
    assert [c["id"] for c in report["cells"]] == CELLS


def test_a_slurm_job_killed_outright_is_shown_interrupted_once_its_heartbeat_stops(tmp_path, monkeypatch):
    """The task's process SIGKILLed (as the OOM killer or a node failure does): the job writes nothing more and its
    record still says running. Seen from another host (status's hostname patched: it cannot look at the process), the
    heartbeat stops, and once it is a few intervals old the cell is interrupted with the `sacct` to check."""
    spec = copy.deepcopy(SPEC)
    spec["training"]["epochs"] = 100_000  # killed long before the end
    spec["defense"]["strengths"] = [0]
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "harness", "submit", "spec.json", "--out", "out", "--executor",
                           "slurm", "--time", "30", "--cpus-per-cell", "1"], cwd=tmp_path,
                          env=job_env(HARNESS_HEARTBEAT_S="0.5"), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    job = dict(re.findall(r"cell (\S+): Slurm job (\S+)", done.stdout))["lenet__s0"]
    monkeypatch.setattr(status.socket, "gethostname", lambda: "another-host")
    try:
        record = wait_running(out, "lenet__s0")
        assert record["executor"] == "slurm" and record["heartbeat_s"] == 0.5
        os.kill(record["pid"], signal.SIGKILL)  # the task's process, as the OOM killer does
        deadline = time.monotonic() + 300
        while True:
            shown = invoke("status", out)
            row = next(line for line in shown.output.splitlines() if line.startswith("│ lenet__s0"))
            if "interrupted" in row:
                break
            assert "running" in row and time.monotonic() < deadline, shown.output
            time.sleep(0.2)
    finally:
        subprocess.run(["scancel", job], timeout=60)
    assert "no sign of life for" in row and f"sacct -j {job}" in row, shown.output
    assert submit.read_json_file(submit.task_record_path(out, "lenet__s0"))["state"] == "running"  # as left
    assert f"resubmit what is missing: harness submit {tmp_path / 'spec.json'} --out {out}" in shown.output
