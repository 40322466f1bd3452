"""What the commands print and write (issue 14): plain progress lines for every phase when stdout is not a terminal
(a CI log, a Slurm file), at a bounded rate; files readable by the group under a 022 umask; `harness report`
printing everything `harness run` printed; `harness eval` printing the clean accuracy and every raised check, and
writing what is done when stopped by SIGTERM, then resuming from it."""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import signal
import stat
import subprocess
import sys

import pytest

from harness import registry

from conftest import REPO, TINY_SPEC, invoke

PHASES = {"training": "steps", "evaluating": "batches", "running the sanity checks": "batches",
          "analysing": "batches"}
PROGRESS = re.compile(r"^(run: cell \d+/\d+ |cell \S+: (training|evaluating|running the sanity checks|analysing)"
                      r"( |$))")


def harness_run(tmp_path, spec: dict, out: str, interval: str, *extra: str) -> str:
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "GIT_PYTHON_REFRESH": "quiet", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "HARNESS_PROGRESS_INTERVAL": interval}
    done = subprocess.run([sys.executable, "-m", "harness", "run", "spec.json", "--out", out, *extra], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600, umask=0o022)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def phase_lines(stdout: str, cell: str, phase: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith(f"cell {cell}: {phase} ")]


@pytest.mark.slow
def test_a_log_gets_plain_progress_lines_for_every_phase_and_files_readable_by_the_group(tmp_path, monkeypatch):
    spec = copy.deepcopy(TINY_SPEC)
    spec["analysis"] = {"max_train": 64}
    stdout = harness_run(tmp_path, spec, "out", "0")  # 0: a line after every step and batch
    lines = stdout.splitlines()
    assert "run: cell 1/2 lenet__s0" in lines
    second = [line for line in lines if line.startswith("run: cell 2/2 lenet__s32")]
    assert len(second) == 1 and re.search(r"\(1 finished in .+; about .+ left for the run\)$", second[0]), second
    for cell in ("lenet__s0", "lenet__s32"):
        seen = []
        for phase, unit in PHASES.items():
            got = phase_lines(stdout, cell, phase)
            start = re.fullmatch(rf"cell {cell}: {phase} \((\d+) {unit}\)", got[0])
            assert start, (phase, got)
            total = int(start.group(1))
            # every batch in between, counted up to the total the phase announced, then its end line
            assert [int(re.match(rf"cell {cell}: {phase} (\d+)/{total} {unit} ", line).group(1)) for line in got[1:-1]] \
                == list(range(1, total)), (phase, got)
            assert got[-1].startswith(f"cell {cell}: {phase} done, {total} {unit} in "), (phase, got)
            seen.append(lines.index(got[0]))
        assert seen == sorted(seen), "the phases in their order"

    out = tmp_path / "out"
    files = [out / "report.json", *(out / "cells").glob("*.json"), *(out / "checkpoints").glob("*.pt"),
             *out.glob("*.png")]
    assert len(files) == 8
    for path in files:  # written atomically through a temporary file, yet with the mode a plain open() gives
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, (path, oct(path.stat().st_mode))

    monkeypatch.setenv("HARNESS_PROGRESS_INTERVAL", "1e9")  # never due: start and end lines only
    quiet = invoke("run", tmp_path / "spec.json", "--out", tmp_path / "quiet", "--cell", "lenet__s0")
    assert quiet.exit_code == 0, quiet.output
    quiet = quiet.output
    for phase, unit in PHASES.items():
        got = phase_lines(quiet, "lenet__s0", phase)
        assert len(got) == 2 and got[0].endswith(f" {unit})") and " done, " in got[1], (phase, got)


def test_report_prints_everything_run_printed(tiny_spec, write_spec, tmp_path):
    tiny_spec["evaluation"]["checks"] = {"max_samples": 32, "tolerance": 0, "convergence": False,
                                         "gradient_free": {"name": "square", "options": {"n_queries": 50}}}
    tiny_spec["evaluation"]["attacks"][0]["options"] = {"steps": 1, "step_size": 1}  # weak: square finds more
    tiny_spec["analysis"] = {"max_train": 32, "steps": 2}
    out = tmp_path / "out"
    ran = invoke("run", write_spec(tiny_spec), "--out", out)
    assert ran.exit_code == 0, ran.output
    assert "check no_gradient_masking raised:" in ran.output  # a check's detail is among what must come back
    reported = invoke("report", out, "--no-figures")
    assert reported.exit_code == 0, reported.output
    lines = ran.output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("run: cell 1/"))  # after the run's header
    printed = [line for line in lines[start:] if not PROGRESS.match(line)  # the paths of the report and figures:
               and not line.startswith(("report: ", "figures: ", str(tmp_path)))]  # written by the run alone
    assert len(printed) > 40
    missing = [line for line in printed if line not in reported.output.splitlines()]
    assert not missing, missing


EVAL_SPEC = {
    "name": "weights",
    "device": "cpu",
    "dataset": {"name": "digits", "max_train": 128, "max_test": 64},
    "models": [{"name": "lenet", "options": {"spectral_norm": True}}],
    "evaluation": {
        "batch_size": 16,
        "attacks": [{"name": "foolbox-pgd", "eps": 32, "options": {"steps": 1, "step_size": 1}},
                    {"name": "foolbox-fgsm", "eps": 32}],
        "checks": {"max_samples": 32, "tolerance": 0, "convergence": False, "eps_grid": [32],
                   "attacks": ["foolbox-pgd@32"],
                   "gradient_free": {"name": "square", "options": {"n_queries": 50}}},
    },
}


def test_eval_prints_the_clean_accuracy_and_the_detail_of_every_raised_check(lenet_weights_file, write_spec,
                                                                             tmp_path):
    out = tmp_path / "out"
    result = invoke("eval", write_spec(EVAL_SPEC), "--weights", lenet_weights_file, "--out", out)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "report.json").read_text())["cells"][0]["metrics"]
    assert f"lenet__checkpoint: acc {metrics['clean_acc']:.2f}% (clean)" in result.output
    raised = {k: v for k, v in metrics["checks"]["flags"].items() if v["ok"] is False}
    assert raised, "the weak PGD beside square raises no_gradient_masking"
    flat = result.output.replace("\n", "")
    for flag, value in raised.items():
        assert f"check {flag} raised: {value['detail']}" in flat


def test_sigterm_during_eval_writes_what_is_done_says_how_to_resume_and_the_resume_skips_it(lenet_weights_file, write_spec,
                                                                                            tmp_path, monkeypatch):
    spec_path, out = write_spec(EVAL_SPEC), tmp_path / "out"
    fgsm = registry.load("attack", "foolbox-fgsm")
    real_perturb = fgsm.perturb
    calls = {"fgsm": 0}

    def perturb_then_sigterm(self, *args):
        calls["fgsm"] += 1
        if calls["fgsm"] == 1:  # while the second attack runs, the first finished
            signal.raise_signal(signal.SIGTERM)
        return real_perturb(self, *args)

    monkeypatch.setattr(fgsm, "perturb", perturb_then_sigterm)
    stopped = invoke("eval", spec_path, "--weights", lenet_weights_file, "--out", out)
    assert stopped.exit_code == 143, stopped.output
    flat = stopped.output.replace("\n", "")
    assert "interrupted by SIGTERM: the evaluation of lenet stopped while evaluating; done so far: clean " \
           "accuracy" in flat and "foolbox-pgd@32" in flat and str(out / "eval-progress.json") in flat
    hint = re.search(r"fix: resume with: (.*)", stopped.output).group(1)
    assert shlex.split(hint) == ["harness", "eval", str(spec_path), "--weights", str(lenet_weights_file), "--out",
                                 str(out)]
    progress = json.loads((out / "eval-progress.json").read_text())
    assert list(progress["robust"]) == ["foolbox-pgd@32"] and not (out / "report.json").exists()

    pgd = registry.load("attack", "foolbox-pgd")
    real_pgd = pgd.perturb
    pgd_calls = []
    monkeypatch.setattr(pgd, "perturb", lambda self, *a: (pgd_calls.append(1), real_pgd(self, *a))[1])
    resumed = invoke("eval", *shlex.split(hint)[2:])
    assert resumed.exit_code == 0, resumed.output
    assert "resuming the evaluation: foolbox-pgd@32 finished earlier" in resumed.output.replace("\n", "")
    main_pgd_calls = len(pgd_calls)
    assert not (out / "eval-progress.json").exists()
    report = json.loads((out / "report.json").read_text())

    straight = invoke("eval", spec_path, "--weights", lenet_weights_file, "--out", tmp_path / "straight")
    assert straight.exit_code == 0, straight.output
    # the resume ran PGD only in the checks (the main PGD pass came from the file): fewer calls than a full run
    assert main_pgd_calls < len(pgd_calls) - main_pgd_calls
    expected = json.loads((tmp_path / "straight" / "report.json").read_text())
    assert report["cells"][0]["metrics"] == expected["cells"][0]["metrics"]
