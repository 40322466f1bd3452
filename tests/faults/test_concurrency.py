"""Fault injection, concurrent jobs in one folder (issue 12: 10).

`harness run --cell` jobs and `harness report` share an output folder: every temporary file has a name of its own
(`.<name>.<pid>.<random>.tmp`: two figure writers once shared `.fig2_ge.png.tmp` and crashed), report.json and the
figures are rewritten under a lock from every cell file present then (no job's write drops another job's cell),
and a cell is run by one job at a time (a second job on it waits, says so, and then keeps what the first left).
Real processes on the tiny digits spec; the final report must equal an uninterrupted run's.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import fast_spec, finished_run, job_env, without_timings

CELLS = ("lenet__s0", "lenet__s32")


def jobs_spec() -> dict:
    spec = fast_spec()
    spec["training"].update(epochs=2, batch_size=32)
    return spec


def start(cwd, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "harness", *args], cwd=cwd, env=job_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    out, err = proc.communicate(timeout=600)
    return proc.returncode, out + err


def wait_for_line(proc: subprocess.Popen, text: str) -> None:
    """Read the job's output until a line holds `text`; a job that never prints it is killed after 10 minutes
    (the read then ends), so that the test fails instead of waiting forever."""
    watchdog = threading.Timer(600, proc.kill)
    watchdog.start()
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if text in line:
                return
    finally:
        watchdog.cancel()
    raise AssertionError(f"{text!r} never printed: {''.join(seen)[-3000:]} {proc.stderr.read()[-3000:]}")


def wait_for(path, proc) -> None:
    deadline = time.monotonic() + 600
    while not path.exists():
        assert proc.poll() is None and time.monotonic() < deadline, finish(proc)
        time.sleep(0.01)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """One uninterrupted run of both cells in one job: its report."""
    out = finished_run(tmp_path_factory.mktemp("straight"), jobs_spec())
    return json.loads((out / "report.json").read_text()), out


def hold(lock_path):
    """Take a harness lock as another job would (fcntl.flock on the lock file, our pid in it); return its fd."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


@pytest.mark.slow
def test_cell_jobs_and_report_commands_in_one_folder_neither_crash_nor_lose_cells(straight, tmp_path):
    """Three jobs at once, two of them on the same cell, and `harness report` redrawing the figures meanwhile."""
    expected, _ = straight
    (tmp_path / "spec.json").write_text(json.dumps(jobs_spec()))
    out = tmp_path / "out"
    jobs = [start(tmp_path, "run", "spec.json", "--out", "out", "--cell", cell)
            for cell in (CELLS[0], CELLS[1], CELLS[0])]
    reports = []
    while any(job.poll() is None for job in jobs):  # `harness report` (twice at most) while the jobs write
        if (out / "report.json").exists() and len(reports) < 2 and (not reports or reports[-1].poll() is not None):
            reports.append(start(tmp_path, "report", "out"))
        time.sleep(0.05)
    outcomes = [finish(job) for job in jobs]
    for code, output in outcomes:
        assert code == 0 and "Traceback" not in output, output[-3000:]
    assert reports, "no report command overlapped the jobs"
    for report in reports:
        code, output = finish(report)
        assert code == 0 and "Traceback" not in output, output[-3000:]

    first, _, second = (output for _, output in outcomes)
    trained = [f"cell {CELLS[0]}: acc " in output for output in (first, second)]
    assert sorted(trained) == [False, True], "exactly one of the two jobs on the same cell ran it"
    other = second if trained[0] else first
    assert f"cell {CELLS[0]}: finished earlier under the same spec, kept" in other.replace("\n", "")

    report = json.loads((out / "report.json").read_text())
    assert without_timings(report["cells"]) == without_timings(expected["cells"])
    assert not list(out.rglob("*.tmp")), "no temporary file left behind"
    assert all((out / name).stat().st_size > 0 for name in ("fig2_ge.png", "fig4_pgd.png"))


@pytest.mark.slow
def test_a_second_job_on_a_cell_waits_says_so_honours_sigterm_and_then_keeps_the_first_jobs_work(straight, tmp_path):
    (tmp_path / "spec.json").write_text(json.dumps(jobs_spec()))
    out = tmp_path / "out"
    fd = hold(out / ".locks" / f"{CELLS[0]}.lock")  # "another job" is running lenet__s0
    waiting = (f"cell {CELLS[0]}: another job (pid {os.getpid()}) is running it; waiting for it to finish "
               f"(out/.locks/{CELLS[0]}.lock)")  # the job runs with --out out
    try:
        job = start(tmp_path, "run", "spec.json", "--out", "out", "--cell", CELLS[0])
        wait_for_line(job, waiting)
        job.send_signal(signal.SIGTERM)  # a job that waits can still be stopped
        code, output = finish(job)
        assert code == 143, output
        assert f"interrupted by SIGTERM: stopped while waiting for cell {CELLS[0]}, which another job is running" \
               in output.replace("\n", "") and "-m harness run spec.json --out out --cell lenet__s0" in output
        assert not (out / "checkpoints").exists(), "it never trained"

        job = start(tmp_path, "run", "spec.json", "--out", "out", "--cell", CELLS[0])
        wait_for_line(job, waiting)
        _, straight_out = straight  # what "the other job" leaves: its finished cell
        (out / "cells").mkdir(parents=True, exist_ok=True)
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        shutil.copy(straight_out / "cells" / f"{CELLS[0]}.json", out / "cells")
        shutil.copy(straight_out / "checkpoints" / f"{CELLS[0]}.pt", out / "checkpoints")
    finally:
        os.close(fd)  # the other job is done
    code, output = finish(job)
    assert code == 0, output
    flat = output.replace("\n", "")
    assert f"cell {CELLS[0]}: the other job is done with it" in flat
    assert f"cell {CELLS[0]}: finished earlier under the same spec, kept" in flat
    assert f"cell {CELLS[0]}: acc " not in flat, "it did not train the cell again"


@pytest.mark.slow
def test_report_json_is_rebuilt_under_its_lock_from_every_cell_file_present_then(straight, tmp_path):
    """A job finishing its cell while another holds the report lock waits, then rebuilds report.json from all cell
    files, including one that another job wrote meanwhile: last-writer-wins used to drop that cell."""
    expected, straight_out = straight
    (tmp_path / "spec.json").write_text(json.dumps(jobs_spec()))
    out = tmp_path / "out"
    fd = hold(out / ".locks" / "report.lock")  # another job is rewriting report.json
    try:
        job = start(tmp_path, "run", "spec.json", "--out", "out", "--cell", CELLS[1])
        wait_for(out / "cells" / f"{CELLS[1]}.json", job)
        shutil.copy(straight_out / "cells" / f"{CELLS[0]}.json", out / "cells")  # the other job's cell lands
        time.sleep(0.5)  # gives a job that did not wait for the lock time to write report.json (it must not)
        assert not (out / "report.json").exists(), "report.json written without its lock"
    finally:
        os.close(fd)
    code, output = finish(job)
    assert code == 0, output
    report = json.loads((out / "report.json").read_text())
    assert without_timings(report["cells"]) == without_timings(expected["cells"]), "both jobs' cells"
