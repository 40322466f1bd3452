"""The CPU thread policy (harness/threads.py): the harness command sets OpenMP's wait policy before torch loads
libgomp, picks one fewer intra-op thread than the usable cores, respects what the user set, and records it all in
the report. No timing is asserted (the machine running the tests is shared): only what was set and what libgomp
read (OMP_DISPLAY_ENV=VERBOSE makes every libgomp print its settings when it loads)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, TINY_SPEC
from harness import threads

SPEC = dict(TINY_SPEC, dataset={"name": "digits", "max_train": 64, "max_test": 32},
            defense={"name": "none", "strengths": [0], "options": {}},
            evaluation=dict(TINY_SPEC["evaluation"], checks={"enabled": False}))


def run_harness(tmp_path, *, cpus: set[int] | None = None, **env_extra) -> tuple[subprocess.CompletedProcess, dict]:
    """`python -m harness run` on a one-cell spec, with no OpenMP/MKL variables but `env_extra`, optionally pinned
    to `cpus` (as taskset or a Slurm cpuset would); returns the process and the report's environment."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "spec.json").write_text(json.dumps(SPEC))
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(GIT_PYTHON_REFRESH="quiet", PYTHONPATH=str(REPO), OMP_DISPLAY_ENV="VERBOSE", **env_extra)
    done = subprocess.run([sys.executable, "-m", "harness", "run", "spec.json", "--out", "out"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600,
                          preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
    assert done.returncode == 0, done.stdout + done.stderr
    return done, json.loads((tmp_path / "out" / "report.json").read_text())["environment"]


def spin_counts(stderr: str) -> set[str]:
    """GOMP_SPINCOUNT as every libgomp in the process read it when it loaded (torch's, scikit-learn's)."""
    return {line.split("=", 1)[1].strip().strip("'") for line in stderr.splitlines()
            if line.strip().startswith("GOMP_SPINCOUNT")}


def test_default_threads_leave_one_core_for_another_process():
    assert [threads.default_threads(n) for n in (1, 2, 3, 16)] == [1, 1, 2, 15]


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux CPU affinity")
def test_the_command_sets_the_wait_policy_before_torch_loads_and_picks_threads_from_the_cores(tmp_path):
    cpus = sorted(os.sched_getaffinity(0))
    done, env = run_harness(tmp_path / "all")
    # PASSIVE reached libgomp: it spins 0 iterations (300000 had it been read before the harness set it)
    assert spin_counts(done.stderr) == {"0"}
    cpu = env["cpu"]
    assert cpu["omp_wait_policy"] == "PASSIVE" and cpu["set_by_harness"] == ["OMP_WAIT_POLICY"]
    assert cpu["usable_cores"] == threads.usable_cores()
    assert env["threads"] == cpu["intra_op_threads"] == max(1, cpu["usable_cores"] - 1)
    assert "usable cores" in cpu["chosen_by"] and cpu["cpu_capability"]
    # pinned to one CPU (taskset, a Slurm cpuset): one usable core, one thread
    _, pinned = run_harness(tmp_path / "one", cpus={cpus[0]})
    assert (pinned["cpu"]["usable_cores"], pinned["threads"]) == (1, 1)


def test_what_the_user_set_is_respected(tmp_path):
    done, env = run_harness(tmp_path, OMP_NUM_THREADS="2", OMP_WAIT_POLICY="ACTIVE")
    assert "0" not in spin_counts(done.stderr)  # ACTIVE: libgomp spins, as the user asked
    cpu = env["cpu"]
    assert cpu["omp_wait_policy"] == "ACTIVE" and cpu["set_by_harness"] == []
    assert env["threads"] == 2 and cpu["chosen_by"] == "OMP_NUM_THREADS=2 (set by the user)"
