"""Signals and crashes: a real `python -m harness run` stopped by SIGTERM resumes to completion; SIGINT exits 130;
a crash in one cell leaves the finished cells' results intact."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner

from harness import checkpoint, runner
from harness.cli import cli
from harness.interrupt import InterruptGuard

from conftest import REPO, invoke, signal_at_gate


def harness(*args, cwd, plugins=None, **extra):
    path = os.pathsep.join([str(plugins), str(REPO)] if plugins else [str(REPO)])
    env = dict(os.environ, GIT_PYTHON_REFRESH="quiet", PYTHONPATH=path, OMP_NUM_THREADS="1", **extra)
    return subprocess.Popen([sys.executable, "-m", "harness", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_sigterm_to_a_real_run_checkpoints_and_resumes(evil_plugins, tiny_spec, tmp_path):
    # pgd-at, gated: the cell waits at epoch 3 (of 20, one step each) until the run has taken the signal, so it
    # stops at that step boundary however loaded the machine is; the straight run below is not gated
    epochs = 20
    tiny_spec["dataset"].update(max_train=64, max_test=32)
    tiny_spec["defense"].update(name="pgd-at-waits-for-gate", strengths=[16], options={"steps": 1, "step_size": 16})
    tiny_spec["training"].update(epochs=epochs, batch_size=32, max_batches=1)
    tiny_spec["evaluation"]["attacks"][0]["options"] = {"steps": 1, "step_size": 16}
    (tmp_path / "spec.json").write_text(json.dumps(tiny_spec))
    ckpt = tmp_path / "out" / "checkpoints" / "lenet__s16.pt"
    gate = tmp_path / "gate"

    proc = harness("run", "spec.json", "--out", "out", cwd=tmp_path, plugins=evil_plugins, HARNESS_TEST_GATE=str(gate))
    seen = signal_at_gate(proc, gate, "lenet__s16", signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    stderr = "".join(seen) + stderr
    assert proc.returncode == 143, stdout + stderr
    assert "SIGTERM received" in stderr and "interrupted by SIGTERM: cell lenet__s16 stopped after step" in stderr
    assert "-m harness run spec.json --out out" in stderr and "Traceback" not in stderr  # as invoked
    state = checkpoint.load(ckpt)
    # stopped at the step boundary right after the gate: epoch 3's one step done, its end not yet booked
    assert (state["epoch"], state["step"]) == (2, 1) and len(state["history"]) == 2, (state["epoch"], state["step"])
    assert not (tmp_path / "out" / "cells" / "lenet__s16.json").exists()

    proc = harness("run", "spec.json", "--out", "out", cwd=tmp_path, plugins=evil_plugins, HARNESS_TEST_GATE=str(gate))
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stdout + stderr
    cell = json.loads((tmp_path / "out" / "cells" / "lenet__s16.json").read_text())
    assert cell["status"] == "done" and cell["resumed_from"] == {"epoch": state["epoch"], "step": state["step"]}
    assert [h["epoch"] for h in cell["history"]] == list(range(1, epochs + 1))

    # the same spec without interruption, in this process: the same parameters to the bit
    assert invoke("run", tmp_path / "spec.json", "--out", tmp_path / "straight").exit_code == 0
    a = checkpoint.load(ckpt)["model"]
    b = checkpoint.load(tmp_path / "straight" / "checkpoints" / "lenet__s16.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_sigint_writes_a_checkpoint_and_exits_130(tiny_spec, write_spec, tmp_path, monkeypatch):
    tiny_spec["defense"]["strengths"] = [0, 32]
    tiny_spec["training"].update(epochs=2, max_batches=2)
    real_save = checkpoint.save
    saved = []

    def save_then_sigint(path, state):
        real_save(path, state)
        saved.append((path.name, state["epoch"], state["step"]))
        if len(saved) == 1:
            signal.raise_signal(signal.SIGINT)  # as Ctrl-C would: handled by the guard, no KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save", save_then_sigint)
    # Python's own handler, also where pytest was started with SIGINT ignored (a job started with `&` in a
    # script inherits SIG_IGN), so that "restored" is seen to mean the handler as it was, not SIG_IGN
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        result = invoke("run", write_spec(tiny_spec), "--out", tmp_path / "out")
        restored = signal.getsignal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, outer)
    assert result.exit_code == 130, result.output
    assert saved == [("lenet__s0.pt", 1, 0), ("lenet__s0.pt", 1, 1)]
    assert "interrupted by SIGINT" in result.output and "resume with: harness run" in result.output
    assert restored is signal.default_int_handler, "the guard restores the handlers"


def test_second_sigint_stops_at_once():
    with pytest.raises(KeyboardInterrupt), InterruptGuard() as guard:
        signal.raise_signal(signal.SIGINT)
        assert guard.requested()
        signal.raise_signal(signal.SIGINT)


def test_crash_in_one_cell_keeps_finished_cells(tiny_spec, write_spec, tmp_path, monkeypatch):
    out = tmp_path / "out"
    tiny_spec["training"]["max_batches"] = 2
    real_evaluate, calls = runner.evaluate, []

    def crash_on_second_cell(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")  # not a harness error
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(runner, "evaluate", crash_on_second_cell)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        CliRunner().invoke(cli, ["run", str(write_spec(tiny_spec)), "--out", str(out)], catch_exceptions=False)
    first = (out / "cells" / "lenet__s0.json").read_bytes()
    assert json.loads(first)["status"] == "done"
    assert sorted(p.name for p in (out / "cells").iterdir()) == ["lenet__s0.json"], "no half-written files"
    assert not (out / "report.json").exists()

    monkeypatch.setattr(runner, "evaluate", real_evaluate)
    result = invoke("run", write_spec(tiny_spec), "--out", out)
    assert result.exit_code == 0, result.output
    assert (out / "cells" / "lenet__s0.json").read_bytes() == first, "a finished cell is never rewritten"
    second = json.loads((out / "cells" / "lenet__s32.json").read_text())
    assert second["status"] == "done" and second["resumed_from"] == {"epoch": 1, "step": 0}  # trained already
    assert [c["id"] for c in json.loads((out / "report.json").read_text())["cells"]] == ["lenet__s0", "lenet__s32"]
