"""Fault injection, signals (issue 12: 3): SIGTERM/SIGINT in every phase after training.

Training already stops at a step boundary (tests/test_interrupt.py). Here a signal arrives while a cell is being
evaluated, sanity-checked or analysed: the run must stop within one batch (one attack call: a plugin cannot be
stopped inside its call), exit 143 (SIGTERM) or 130 (SIGINT) naming the phase and the command that resumes, and
keep the trained checkpoint, so that the resume only re-evaluates. After an interruption in each phase and the
resumes, the report equals an uninterrupted run's.

`test_a_signal_inside_each_phase...` raises the signal in-process from inside the phase's real work (an attack
call, a search of the analysis): deterministic, and it counts the units of work done after the signal.
`test_sigterm_to_a_real_process...` signals a real `python -m harness run` when it announces the sanity checks
(a phase the signal was once ignored in until the run ended).
"""

from __future__ import annotations

import copy
import json
import os
import shlex
import signal
import subprocess
import sys

import pytest

from harness import analysis, checkpoint, registry

from conftest import REPO, TINY_SPEC, invoke, without_timings

CELL = "lenet__s0"
PHASES = ("evaluating", "running the sanity checks", "analysing")


def signal_spec() -> dict:
    """One cell; each phase after training takes several batches."""
    spec = copy.deepcopy(TINY_SPEC)
    spec["dataset"].update(max_train=64, max_test=32)
    spec["defense"].update(strengths=[0])
    spec["training"].update(epochs=2, batch_size=32)
    spec["evaluation"] = {
        "batch_size": 8,  # 8 + 4 clean batches, then up to 4 attacked ones
        "attacks": [{"name": "foolbox-pgd", "eps": 32, "options": {"steps": 5, "step_size": 8}}],
        "checks": {"max_samples": 16, "eps_grid": [32], "convergence": False,
                   "gradient_free": {"name": "square", "options": {"n_queries": 20}}},
    }
    spec["analysis"] = {"max_train": 24, "steps": 3}
    return spec


def flat(text: str) -> str:
    """Output with rich's line wrapping undone (at 80 columns in a non-terminal it breaks lines after a space, and
    folds a long path anywhere)."""
    return text.replace("\n", "")


def phase_now() -> str:
    """The phase of the run that called us, from the call stack."""
    frame, names = sys._getframe(1), set()
    while frame is not None:
        names.add(frame.f_code.co_name)
        frame = frame.f_back
    for function, phase in (("run_checks", PHASES[1]), ("analyze", PHASES[2]), ("evaluate", PHASES[0])):
        if function in names:
            return phase
    return "training"


@pytest.mark.slow
def test_a_signal_inside_each_phase_after_training_stops_it_within_one_batch_and_resumes_to_the_same_report(
        write_spec, tmp_path, monkeypatch):
    spec = signal_spec()
    path, out = write_spec(spec), tmp_path / "out"
    ckpt, cell_file = out / "checkpoints" / f"{CELL}.pt", out / "cells" / f"{CELL}.json"

    # Every unit of work after training (an attack call; one batch's search of the eps-balls in the analysis) is
    # logged with its phase; the first one in the target phase raises the signal, as a `kill` arriving then would.
    work: list[str] = []
    target: dict = {}

    def unit_of_work() -> None:
        work.append(phase_now())
        if work[-1] == target.get("phase") and "at" not in target:
            target["at"] = len(work)
            signal.raise_signal(target["signum"])

    pgd = registry.load("attack", "foolbox-pgd")
    real_perturb, real_search = pgd.perturb, analysis.search_ball
    monkeypatch.setattr(pgd, "perturb", lambda self, *a: (unit_of_work(), real_perturb(self, *a))[1])
    monkeypatch.setattr(analysis, "search_ball", lambda *a: (unit_of_work(), real_search(*a))[1])

    for phase, signum in ((PHASES[0], signal.SIGTERM), (PHASES[1], signal.SIGINT), (PHASES[2], signal.SIGTERM)):
        work.clear()
        target.clear()
        target.update(phase=phase, signum=signum)
        result = invoke("run", path, "--out", out)
        name = signal.Signals(signum).name
        assert result.exit_code == 128 + signum, (phase, result.output)
        assert "at" in target, f"no work was done while {phase}"
        assert work[target["at"]:] == [], f"work went on after {name} while {phase}: {work[target['at']:]}"
        output = flat(result.output)
        assert f"interrupted by {name}: cell {CELL} stopped while {phase}; its trained state is in {ckpt}" in output
        assert "fix: resume with: " + shlex.join(["harness", "run", str(path), "--out", str(out)]) in output
        assert not cell_file.exists(), "an interrupted cell has no result"
        state = checkpoint.load(ckpt)  # the trained checkpoint is kept, so the resume only re-evaluates
        assert (state["epoch"], state["step"]) == (spec["training"]["epochs"], 0)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, "the guard restores the handlers"

    target.clear()
    resumed = invoke("run", path, "--out", out)
    assert resumed.exit_code == 0, resumed.output
    assert f"cell {CELL}: re-evaluating (training unchanged): the trained state in {ckpt} is kept" \
        in flat(resumed.output)
    report = json.loads((out / "report.json").read_text())
    assert report["cells"][0]["resumed_from"] == {"epoch": spec["training"]["epochs"], "step": 0}  # not retrained

    straight = invoke("run", path, "--out", tmp_path / "straight")
    assert straight.exit_code == 0, straight.output
    expected = json.loads((tmp_path / "straight" / "report.json").read_text())
    assert without_timings(report["cells"]) == without_timings(expected["cells"])
    assert report["cells"][0]["analysis"] and report["cells"][0]["metrics"]["checks"]["flags"]


@pytest.mark.slow
def test_sigterm_to_a_real_process_during_the_sanity_checks_exits_143_with_the_resume_command(tmp_path):
    spec = signal_spec()
    spec["evaluation"]["checks"].update(max_samples=32, convergence=True)  # a longer phase to land the signal in
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = dict(os.environ, GIT_PYTHON_REFRESH="quiet", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "harness", "run", "spec.json", "--out", "out"], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stdout:  # a log (not a terminal) gets a line as each phase starts; rich flushes every print
        seen.append(line)
        if line.startswith(f"cell {CELL}: {PHASES[1]} ("):  # the phase's first progress line
            proc.send_signal(signal.SIGTERM)
            break
    stdout, stderr = proc.communicate(timeout=600)
    stdout = "".join(seen) + stdout
    assert proc.returncode == 143, stdout[-3000:] + stderr[-3000:]
    assert f"interrupted by SIGTERM: cell {CELL} stopped while {PHASES[1]}" in stderr, stderr
    assert "-m harness run spec.json --out out" in stderr and "Traceback" not in stdout + stderr  # as invoked
    assert f"cell {CELL}: {PHASES[2]}" not in stdout, "the analysis never started"
    assert checkpoint.load(tmp_path / "out" / "checkpoints" / f"{CELL}.pt")["epoch"] == spec["training"]["epochs"]
