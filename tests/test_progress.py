"""Progress and stopping as a user sees them (issue 14): plain progress lines with a bounded rate, the run-level
"cell i/n" line with the time left, the resume hint runnable as printed, a double Ctrl-C, "re-evaluating", and
smoke runs that keep no checkpoints unless asked."""

from __future__ import annotations

import copy
import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from harness import runner
from harness.progress import Overall, Phases, batch_hook

from conftest import REPO, TINY_SPEC, invoke, without_timings

CELL = "lenet__s0"


def env(**extra) -> dict:
    return {**os.environ, "GIT_PYTHON_REFRESH": "quiet", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def plain_console() -> tuple[Console, list[str]]:
    lines: list[str] = []

    class Sink:
        def write(self, text: str) -> None:
            lines.extend(t for t in text.splitlines() if t)

        def flush(self) -> None:
            pass

    return Console(file=Sink(), force_terminal=False, width=200), lines


def test_plain_lines_start_end_and_at_most_one_per_interval():
    console, lines = plain_console()
    clock = FakeClock()
    with Phases(console, interval=10, clock=clock) as phases:
        phases.start("cell a", "training", 30, unit="steps")
        for _ in range(30):
            clock.now += 1
            phases.advance()
    assert lines[0] == "cell a: training (30 steps)"
    assert lines[-1] == "cell a: training done, 30 steps in 30 s"
    middle = lines[1:-1]
    # one line at 10 s and one at 20 s; at 30 s the phase is complete and its end line says so
    assert [line.split(",")[0] for line in middle] == ["cell a: training 10/30 steps (33%)",
                                                       "cell a: training 20/30 steps (67%)"]
    assert "about 20 s left" in middle[0]


def test_a_terminal_gets_bars_not_lines():
    lines: list[str] = []
    console = Console(file=type("S", (), {"write": lambda s, t: lines.append(t), "flush": lambda s: None})(),
                      force_terminal=True, width=100)
    with Phases(console, interval=0) as phases:
        phases.start("cell a", "evaluating", 3)
        for _ in range(3):
            phases.advance()
    assert not any("evaluating (3 batches)" in t or "evaluating done" in t for t in lines)


def test_batch_hook_starts_after_the_stop_check_and_counts_the_batches():
    console, lines = plain_console()
    order: list[str] = []

    def stop() -> None:
        order.append("stop")

    with Phases(console, interval=1e9) as phases:
        hook = batch_hook(phases, "cell a", "analysing", lambda: 2, stop)
        hook()
        order.append(lines[-1])
        hook()
        hook()
    assert order == ["stop", "cell a: analysing (2 batches)", "stop", "stop"]
    assert lines[-1].startswith("cell a: analysing done, 2 batches in")


def test_overall_line_estimates_the_rest_from_the_cells_finished_in_this_run():
    overall = Overall(4, 3)  # one of the four cells was finished earlier: it is kept, not run
    assert overall.starting(2, "lenet__s8") == "run: cell 2/4 lenet__s8"
    overall.finished(60.0)
    assert overall.starting(3, "lenet__s16") == "run: cell 3/4 lenet__s16 (1 finished in 1 min 00 s; about 2 min " \
                                                "00 s left for the run)"


def one_cell_spec(**training) -> dict:
    spec = copy.deepcopy(TINY_SPEC)
    spec["dataset"].update(max_train=64, max_test=32)
    spec["defense"]["strengths"] = [0]
    spec["training"].update(batch_size=32, **training)
    spec["evaluation"]["checks"] = {"enabled": False}
    spec["analysis"] = {"enabled": False}
    return spec


def test_re_evaluation_says_so_and_a_resume_of_training_says_resuming(write_spec, tmp_path):
    spec = one_cell_spec()
    out = tmp_path / "out"
    assert invoke("run", write_spec(spec), "--out", out).exit_code == 0
    spec["evaluation"]["attacks"][0]["options"]["steps"] = 3  # the evaluation changed, the training did not
    result = invoke("run", write_spec(spec), "--out", out)
    assert result.exit_code == 0, result.output
    assert f"cell {CELL}: re-evaluating (training unchanged)" in result.output
    assert "resuming" not in result.output
    spec["training"]["epochs"] = 2  # now the checkpoint is one epoch short: training goes on from it
    result = invoke("run", write_spec(spec), "--out", out, "--force")
    assert result.exit_code == 0, result.output
    assert f"cell {CELL}: resuming from" in result.output and "re-evaluating" not in result.output


def test_smoke_runs_delete_each_checkpoint_once_the_cell_is_written_unless_asked(write_spec, tmp_path):
    path = write_spec(copy.deepcopy(TINY_SPEC))
    out, kept = tmp_path / "smoke", tmp_path / "kept"
    assert invoke("run", path, "--smoke", "--out", out).exit_code == 0
    assert sorted(p.name for p in (out / "cells").glob("*.json")) == ["lenet__s0.json", "lenet__s32.json"]
    assert list((out / "checkpoints").glob("*.pt")) == []
    again = invoke("run", path, "--smoke", "--out", out)  # the cells are finished: kept, nothing retrained
    assert again.exit_code == 0 and again.output.count("finished earlier under the same spec, kept") == 2
    assert invoke("run", path, "--smoke", "--keep-checkpoints", "--out", kept).exit_code == 0
    assert sorted(p.name for p in (kept / "checkpoints").glob("*.pt")) == ["lenet__s0.pt", "lenet__s32.pt"]


def interrupt_on(proc: subprocess.Popen, marker: str, signum: int) -> list[str]:
    """Read the process's stdout until a line starts with `marker`, then send `signum`; the lines read."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(marker):
            proc.send_signal(signum)
            break
    return seen


def run_params(words: list[str]) -> dict:
    """What `harness run` makes of these words (after `run`), as Click parses them."""
    from harness.cli import cli

    return cli.commands["run"].make_context("run", list(words)).params


def resume_hint(stderr: str) -> list[str]:
    lines = [line for line in stderr.splitlines() if line.startswith("fix: resume with: ")]
    assert len(lines) == 1, stderr
    return shlex.split(lines[0][len("fix: resume with: "):])


@pytest.mark.slow
def test_the_resume_hint_of_the_console_script_runs_as_printed_and_ends_as_an_uninterrupted_run(tmp_path):
    script = Path(sys.executable).parent / "harness"
    if not script.exists():
        pytest.skip(f"no console script beside {sys.executable}")
    spec = one_cell_spec()
    spec["defense"]["strengths"] = [0, 32]
    spec["smoke"] = {"max_train": 256, "batch_size": 8, "max_batches": 32}  # 32 smoke steps: time to land a signal
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    args = ["run", "spec.json", "--out", "out", "--smoke", "--seed", "3", "--cell", CELL]
    proc = subprocess.Popen([str(script), *args], cwd=tmp_path, env=env(HARNESS_PROGRESS_INTERVAL="0"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    interrupt_on(proc, f"cell {CELL}: training 1/", signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, stderr
    hint = resume_hint(stderr)
    assert hint[0] in ("harness", str(script)) and hint[1] == "run", hint
    assert run_params(hint[2:]) == run_params(args[1:]), hint  # the same command, whatever the order of its options
    assert (tmp_path / "out" / "checkpoints" / f"{CELL}.pt").exists(), "the interrupted smoke cell's checkpoint"

    done = subprocess.run(hint, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    resumed = json.loads((tmp_path / "out" / "report.json").read_text())
    assert resumed["cells"][0]["resumed_from"], "it resumed from the checkpoint"
    assert list((tmp_path / "out" / "checkpoints").glob("*.pt")) == [], "a finished smoke cell keeps no checkpoint"

    straight = invoke("run", tmp_path / "spec.json", "--out", tmp_path / "straight", *args[4:])
    assert straight.exit_code == 0, straight.output
    expected = json.loads((tmp_path / "straight" / "report.json").read_text())
    assert without_timings(resumed["cells"], also=("created",)) == without_timings(expected["cells"], also=("created",))


@pytest.mark.slow
def test_the_resume_hint_of_python_dash_m_runs_as_printed(tmp_path):
    spec = one_cell_spec(epochs=3)
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    args = ["run", "spec.json", "--out", "out"]
    proc = subprocess.Popen([sys.executable, "-m", "harness", *args], cwd=tmp_path,
                            env=env(HARNESS_PROGRESS_INTERVAL="0"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    interrupt_on(proc, f"cell {CELL}: training 1/", signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, stderr
    hint = resume_hint(stderr)
    assert hint[:3] in (["python", "-m", "harness"], ["python3", "-m", "harness"], [sys.executable, "-m", "harness"])
    assert hint[3:] == args, hint
    done = subprocess.run(hint, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads((tmp_path / "out" / "report.json").read_text())["cells"][0]["status"] == "done"


SLOW_PLUGIN = '''
import time

import torch.nn.functional as F
from harness.plugin import DefensePlugin


class Slow(DefensePlugin):
    """Plain training whose every step takes 5 s: a stop at the next step boundary is far away."""

    def loss(self, model, x, y):
        time.sleep(5)
        return F.cross_entropy(model(x), y)
'''


@pytest.mark.slow
def test_a_second_ctrl_c_while_stopping_exits_130_at_once_without_a_traceback(tmp_path):
    site = tmp_path / "site"
    (site / "slow_plugins-0.1.dist-info").mkdir(parents=True)
    (site / "slow_plugins.py").write_text(SLOW_PLUGIN)
    (site / "slow_plugins-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: slow-plugins\n"
                                                                  "Version: 0.1\n")
    (site / "slow_plugins-0.1.dist-info" / "entry_points.txt").write_text("[harness.defenses]\n"
                                                                          "slow = slow_plugins:Slow\n")
    spec = one_cell_spec(epochs=1)
    spec["defense"] = {"name": "slow", "strengths": [0]}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.Popen([sys.executable, "-m", "harness", "run", "spec.json", "--out", "out"], cwd=tmp_path,
                            env=env(PYTHONPATH=f"{site}{os.pathsep}{REPO}"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    interrupt_on(proc, f"cell {CELL}: training (", signal.SIGINT)
    first = []
    for line in proc.stderr:  # the first SIGINT is acknowledged; the step under way still has seconds to go
        first.append(line)
        if line.startswith("SIGINT received"):
            proc.send_signal(signal.SIGINT)
            break
    stdout, stderr = proc.communicate(timeout=120)
    stderr = "".join(first) + stderr
    assert proc.returncode == 130, stdout + stderr
    assert "second SIGINT: stopped at once" in stderr, stderr
    assert "Traceback" not in stdout + stderr and "Aborted" not in stdout + stderr
    assert not (tmp_path / "out" / "checkpoints" / f"{CELL}.pt").exists(), "it did not wait for the step boundary"


def test_a_ctrl_c_before_the_run_is_guarded_exits_130_without_a_traceback(tiny_spec, write_spec, tmp_path,
                                                                          monkeypatch):
    def interrupted_while_loading(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "load_data", interrupted_while_loading)
    result = invoke("run", write_spec(tiny_spec), "--out", tmp_path / "out")
    assert result.exit_code == 130 and "interrupted by SIGINT" in result.output
