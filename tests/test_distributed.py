"""Multi-process training: `torchrun --nproc_per_node=2 -m harness run SPEC` (gloo, CPU) must train the same model
as one process does: each rank takes an interleaved shard of every global batch and DDP averages the gradients,
so 2-rank SGD on batch B is 1-rank SGD on batch B up to float rounding."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from rich.console import Console

from harness import spec as spec_mod
from harness.distributed import Distributed
from harness.errors import BadInput
from harness.runner import run

SPEC = {
    "name": "ddp", "seed": 0, "device": "cpu",
    "dataset": {"name": "digits", "max_train": 128, "max_test": 64},
    "models": [{"name": "lenet"}],
    # random_start false: no randomness in the adversary, so the two runs see the same adversaries
    "defense": {"name": "pgd-at", "strengths": [0, 16], "options": {"steps": 2, "step_size": 8, "random_start": False}},
    "training": {"epochs": 2, "batch_size": 32, "lr": 0.1},
    "evaluation": {"batch_size": 64, "attacks": [{"name": "foolbox-pgd", "eps": 16, "options": {"steps": 1, "step_size": 16}}]},
    # fp32: the comparison is of the sharding and the gradient averaging at 1e-5; bf16 rounds each rank's
    # half-batch differently from the whole batch (on an AMX CPU "auto" would pick bf16)
    "performance": {"precision": "fp32"},
}


def worker_env(plugins=None, **extra: str) -> dict[str, str]:
    """The environment of a torchrun launched by a test: no rank variables of an enclosing launch, one thread per
    rank, the test's plugins on the path."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", **extra)
    if plugins is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(plugins), env.get("PYTHONPATH", "")])
    return env


def torchrun(spec_path, out) -> list[str]:
    """`harness run SPEC --out OUT` with two gloo ranks."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "harness", "run", str(spec_path), "--out", str(out)]


def run_torchrun(spec_path, out, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`torchrun(spec_path, out)` run to its end (5 minutes at most), its output captured."""
    return subprocess.run(torchrun(spec_path, out), capture_output=True, text=True, env=env, timeout=300)


def test_two_gloo_ranks_train_the_same_model_as_one_process(tmp_path):
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(SPEC))
    proc = run_torchrun(spec_path, str(tmp_path / "two"), worker_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    one = run(spec_mod.validate(SPEC), tmp_path / "one", Console(quiet=True))

    assert two["environment"]["world_size"] == 2 and one["environment"]["world_size"] == 1
    assert [c["id"] for c in two["cells"]] == [c["id"] for c in one["cells"]] == ["lenet__s0", "lenet__s16"]
    for a, b in zip(one["cells"], two["cells"]):
        assert a["status"] == b["status"] == "done"
        for key in ("train_loss", "test_loss"):
            assert b["metrics"][key] == pytest.approx(a["metrics"][key], rel=1e-5, abs=1e-6), (a["id"], key)
        assert b["metrics"]["clean_acc"] == a["metrics"]["clean_acc"]
        # the epoch objective is summed over ranks: the mean over the whole global batch, as in one process
        for ha, hb in zip(a["history"], b["history"]):
            assert hb["train_objective"] == pytest.approx(ha["train_objective"], rel=1e-5)
    # training moved the weights (a run that did nothing would match trivially): the loss fell from ln(10) = 2.303
    history = one["cells"][0]["history"]
    assert history[-1]["train_objective"] < history[0]["train_objective"]
    assert one["cells"][0]["metrics"]["train_loss"] < 2.28


def test_environment_detection_and_batch_check():
    assert Distributed.from_env({}) is None
    assert Distributed.from_env({"WORLD_SIZE": "1", "RANK": "0"}) is None
    d = Distributed.from_env({"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0"})
    assert (d.rank, d.world_size, d.local_rank, d.is_main) == (2, 4, 0, False)
    with pytest.raises(BadInput, match="malformed"):
        Distributed.from_env({"WORLD_SIZE": "two"})
    with pytest.raises(BadInput, match="multiple of 4"):
        d.check_batch_size(30)


def test_shards_interleave_and_cover_each_batch_once():
    import torch

    x = torch.arange(10).float().view(10, 1)
    y = torch.arange(10)
    shards = [list(Distributed(rank=r, world_size=3, local_rank=r).shard(iter([(x, y)]))) for r in range(3)]
    got = sorted(int(v) for s in shards for _, ys in s for v in ys)
    assert got == list(range(9))  # 10 does not divide by 3: the last sample is dropped so shards stay equal
    assert [s[0][1].tolist() for s in shards] == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]
    assert all(torch.equal(xs.view(-1), ys.float()) for s in shards for xs, ys in s)


def _worker_pid(parent: int, rank: int) -> int | None:
    """The pid of torchrun's worker process `rank` (a direct child of `parent` with RANK=<rank>), from /proc."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:
            continue
        if ppid == parent and f"RANK={rank}".encode() in environ:
            return int(entry)
    return None


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds torchrun's workers through /proc")
def test_a_signal_reaching_one_rank_stops_every_rank_at_the_same_step_and_resumes(evil_plugins, tmp_path):
    """A signal that reaches rank 1 alone must stop rank 0 too, at the same step boundary, with rank 0's checkpoint
    written: otherwise rank 0 trains on into a DDP all-reduce that rank 1 never joins and crashes, losing the
    epoch. The resumed run then ends where an uninterrupted one does."""
    import signal

    import torch

    from harness import checkpoint

    from conftest import signal_at_gate

    # pgd-at, gated: both ranks wait at epoch 3 (one step each) until rank 1 has taken the signal, so the stop
    # lands there however loaded the machine is; the straight run below is not gated
    epochs = 6
    spec = json.loads(json.dumps(SPEC))
    spec["defense"].update(name="pgd-at-waits-for-gate", strengths=[16])
    spec["training"].update(epochs=epochs, max_batches=1)
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    env = worker_env(evil_plugins, HARNESS_TEST_GATE=str(tmp_path / "gate"))
    command = torchrun(spec_path, str(tmp_path / "two"))
    ckpt = tmp_path / "two" / "checkpoints" / "lenet__s16.pt"

    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    seen = signal_at_gate(proc, tmp_path / "gate", "lenet__s16", signal.SIGTERM, pid=lambda: _worker_pid(proc.pid, 1))
    stdout, stderr = proc.communicate(timeout=300)
    stderr = "".join(seen) + stderr
    assert proc.returncode != 0
    # both ranks stopped at a step boundary by the signal (rank 0 adopted rank 1's), neither by a broken collective
    assert stderr.count("interrupted by SIGTERM: cell lenet__s16 stopped after step") == 2, stderr[-3000:]
    assert stderr.count("exitcode  : 143") == 2, stderr[-3000:]  # torchrun's summary: both exited as SIGTERM says
    state = checkpoint.load(ckpt)
    # at the step boundary right after the gate: epoch 3's one step done, its end not yet booked
    assert (state["epoch"], state["step"]) == (2, 1), (state["epoch"], state["step"])

    proc = run_torchrun(spec_path, str(tmp_path / "two"), env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    resumed = json.loads((tmp_path / "two" / "cells" / "lenet__s16.json").read_text())
    assert resumed["resumed_from"] == {"epoch": state["epoch"], "step": state["step"]}
    straight = run(spec_mod.validate(spec), tmp_path / "one", Console(quiet=True))["cells"][0]
    for key in ("train_loss", "test_loss"):
        assert resumed["metrics"][key] == pytest.approx(straight["metrics"][key], rel=1e-5, abs=1e-6), key
    a = checkpoint.load(ckpt)["model"]
    b = checkpoint.load(tmp_path / "one" / "checkpoints" / "lenet__s16.pt")["model"]
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in b)


def test_a_non_finite_loss_on_one_rank_fails_the_cell_on_every_rank_and_the_next_cell_runs(evil_plugins, tmp_path):
    """Rank 0's loss stays finite, rank 1's turns NaN: both must fail the cell at the same step (rank 0 records
    it) and go on to the next cell together, instead of rank 0 waiting in a gradient all-reduce rank 1 left."""
    spec = json.loads(json.dumps(SPEC))
    spec["defense"] = {"name": "nan-on-rank-1", "strengths": [8, 0]}
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    proc = run_torchrun(spec_path, str(tmp_path / "out"), worker_env(evil_plugins))
    assert proc.returncode != 0  # a failed cell
    assert "Connection closed by peer" not in proc.stderr, proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    failed, done = report["cells"]
    assert (failed["id"], failed["status"], done["id"], done["status"]) == ("lenet__s8", "failed", "lenet__s0", "done")
    assert "non-finite in another process's shard at epoch 2, step 1" in failed["error"]


def test_a_plugin_failing_on_one_rank_fails_the_cell_on_every_rank_and_the_next_cell_runs(evil_plugins, tmp_path):
    """Rank 1's defense raises before its forward through the model, while rank 0 goes on into DDP's forward
    (which broadcasts buffers: a collective). Before, rank 1 failed the cell alone and went on to the next one,
    rank 0 waited in the broadcast, and both hung until the process group's 12-hour timeout. Now the cell fails
    on both at the same point, rank 0 records rank 1's error, and both go on to the next cell."""
    spec = json.loads(json.dumps(SPEC))
    spec["defense"] = {"name": "raises-on-rank-1", "strengths": [8, 0]}
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    proc = run_torchrun(spec_path, str(tmp_path / "out"), worker_env(evil_plugins))  # a hang: its 300 s timeout
    assert proc.returncode == 1, proc.stderr[-3000:]  # a failed cell, as in one process
    assert "Connection closed by peer" not in proc.stderr, proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    failed, done = report["cells"]
    assert (failed["id"], failed["status"], done["id"], done["status"]) == ("lenet__s8", "failed", "lenet__s0", "done")
    assert failed["error"].startswith("defense plugin 'raises-on-rank-1' (evil_plugins:RaisesOnRank1, from "
                                      "evil-plugins 0.1) failed in loss: KeyError: 'no such shard'"), failed["error"]
    assert "(on rank 1)" in failed["error"]
    assert [h["epoch"] for h in done["history"]] == [1, 2]


def test_a_bad_input_on_one_rank_ends_the_run_on_every_rank_with_its_exit_code(evil_plugins, tmp_path):
    """The same place, but rank 1's plugin says the input is wrong (BadInput): every rank exits 2, rank 0 saying
    that rank 1 failed and rank 1 why, without a traceback of ours."""
    spec = json.loads(json.dumps(SPEC))
    spec["defense"] = {"name": "refuses-on-rank-1", "strengths": [8, 0]}
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    proc = run_torchrun(spec_path, str(tmp_path / "out"), worker_env(evil_plugins))
    assert proc.returncode != 0 and proc.stderr.count("exitcode  : 2") == 2, proc.stderr[-3000:]
    assert "refuses-on-rank-1: this shard holds an image it cannot take" in proc.stderr
    assert "stopped because rank 1 failed in a training step: refuses-on-rank-1: this shard holds" in proc.stderr
    ours = re.sub(r"Traceback \(most recent call last\):\n(?:  .*\n)+?torch\.distributed\.elastic\.multiprocessing"
                  r"\.errors\.ChildFailedError:", "", proc.stderr)
    assert ours.count("Traceback") == 0 and "gloo" not in ours.lower(), ours[-5000:]
    assert not (tmp_path / "out" / "cells" / "lenet__s8.json").exists()  # the run ended: no cell result


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds torchrun's workers through /proc")
def test_a_signal_while_rank_0_evaluates_alone_stops_every_rank_with_its_code_and_resumes(evil_plugins, tmp_path):
    """Rank 0 evaluates a cell alone while rank 1 waits for it. A SIGTERM reaching rank 0 then must stop rank 1 too,
    with the same exit code (143) and without a traceback (rank 1 once died in a barrier rank 0 never reached:
    a gloo error, or torchrun's SIGTERM); the resume hint is printed once; the trained checkpoint is kept and the
    resumed run's cell equals an uninterrupted run's."""
    import signal

    from harness import checkpoint

    from conftest import without_timings

    spec = json.loads(json.dumps(SPEC))
    spec["defense"]["strengths"] = [16]
    spec["training"].update(epochs=2, max_batches=1)
    # the gate attack waits until the test opens it, after its signal was sent: the evaluation is still going on
    # when the signal lands, however loaded the machine
    spec["evaluation"]["attacks"].insert(0, {"name": "waits-for-gate", "eps": 16})
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    gate = tmp_path / "gate"
    env = worker_env(evil_plugins, HARNESS_TEST_GATE=str(gate))

    ckpt = tmp_path / "two" / "checkpoints" / "lenet__s16.pt"
    with open(tmp_path / "stderr", "w+") as err:
        proc = subprocess.Popen(torchrun(spec_path, str(tmp_path / "two")), stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        seen = []
        for line in proc.stdout:  # rank 0 announces each phase as it starts (a log gets one line per phase)
            seen.append(line)
            if line.startswith("cell lenet__s16: evaluating ("):
                rank0 = _worker_pid(proc.pid, 0)
                assert rank0 is not None
                os.kill(rank0, signal.SIGTERM)
                break
        gate.touch()
        stdout = "".join(seen) + proc.communicate(timeout=300)[0]
        err.seek(0)
        stderr = err.read()
    output = stdout + stderr
    assert seen and seen[-1].startswith("cell lenet__s16: evaluating ("), output[-3000:]
    assert proc.returncode != 0
    # torchrun's own traceback (it raises ChildFailedError when a rank exits non-zero) is torchrun's: none else
    ours = re.sub(r"Traceback \(most recent call last\):\n(?:  .*\n)+?torch\.distributed\.elastic\.multiprocessing"
                  r"\.errors\.ChildFailedError:", "", output)
    assert ours.count("Traceback") == 0 and "gloo" not in ours.lower(), ours[-5000:]
    assert "interrupted by SIGTERM: cell lenet__s16 stopped while evaluating" in stderr, stderr[-3000:]
    assert "interrupted by SIGTERM: rank 1 stopped with rank 0 while it evaluated cell lenet__s16" in stderr
    assert stderr.count("exitcode  : 143") == 2, stderr[-3000:]  # torchrun's summary: each rank exited 143
    assert "exitcode  : -15" not in stderr
    assert stderr.count("fix: resume with: ") == 1, stderr[-3000:]  # printed by rank 0 alone
    assert not (tmp_path / "two" / "cells" / "lenet__s16.json").exists()
    state = checkpoint.load(ckpt)  # the finished training is kept: the resume only re-evaluates
    assert (state["epoch"], state["step"]) == (2, 0)

    resumed = run_torchrun(spec_path, str(tmp_path / "two"), env)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "re-evaluating (training unchanged)" in resumed.stdout
    straight = run_torchrun(spec_path, str(tmp_path / "straight"), env)
    assert straight.returncode == 0, straight.stdout[-3000:] + straight.stderr[-3000:]
    a = json.loads((tmp_path / "two" / "report.json").read_text())["cells"]
    b = json.loads((tmp_path / "straight" / "report.json").read_text())["cells"]
    assert a[0]["resumed_from"] == {"epoch": 2, "step": 0}
    assert without_timings(a) == without_timings(b)


def test_an_error_of_rank_0_while_it_evaluates_alone_ends_every_rank_with_its_code(evil_plugins, tmp_path):
    """Rank 0 fails alone (an attack plugin says the input is wrong: BadInput, exit 2) while rank 1 waits for it:
    rank 1 ends with the same code and one line pointing to rank 0's error, at once (not after the process group's
    12 h timeout), without a gloo error or a traceback; the message the user reads is rank 0's."""
    spec = json.loads(json.dumps(SPEC))
    spec["defense"]["strengths"] = [16]
    spec["training"].update(epochs=1, max_batches=1)
    spec["evaluation"]["attacks"] = [{"name": "refuses-the-input", "eps": 16}]
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    proc = run_torchrun(spec_path, str(tmp_path / "out"), worker_env(evil_plugins))
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    ours = re.sub(r"Traceback \(most recent call last\):\n(?:  .*\n)+?torch\.distributed\.elastic\.multiprocessing"
                  r"\.errors\.ChildFailedError:", "", output)
    assert ours.count("Traceback") == 0 and "gloo" not in ours.lower(), ours[-5000:]
    assert proc.stderr.count("error: refuses-the-input: these images are not what it attacks") == 1, output[-3000:]
    assert "error: rank 1 stopped because rank 0 failed (exit 2) while it evaluated cell lenet__s16; rank 0's " \
           "error says why" in proc.stderr.replace("\n", "")
    assert proc.stderr.count("exitcode  : 2 ") == 2, proc.stderr[-3000:]  # torchrun's summary: both ranks exit 2
    assert not (tmp_path / "out" / "cells" / "lenet__s16.json").exists()


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds torchrun's workers through /proc")
def test_a_signal_while_rank_0_waits_for_a_cell_lock_stops_every_rank_with_its_code(tmp_path):
    """Another job holds the cell's lock: rank 0 waits for it (polling its stop request) while rank 1 waits for
    rank 0. A SIGTERM reaching rank 0 stops both with exit 143, no traceback, the resume hint once."""
    import signal

    from harness.paths import locked

    spec = json.loads(json.dumps(SPEC))
    spec["defense"]["strengths"] = [16]
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    env = worker_env()
    with locked(tmp_path / "out" / ".locks" / "lenet__s16.lock"), open(tmp_path / "stderr", "w+") as err:
        proc = subprocess.Popen(
            torchrun(spec_path, str(tmp_path / "out")),
            stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if "another job (pid" in line:  # rank 0 waits for the lock this test holds
                os.kill(_worker_pid(proc.pid, 0), signal.SIGTERM)
                break
        stdout = "".join(seen) + proc.communicate(timeout=300)[0]
        err.seek(0)
        stderr = err.read()
    output = stdout + stderr
    assert seen and "another job (pid" in seen[-1], output[-3000:]
    ours = re.sub(r"Traceback \(most recent call last\):\n(?:  .*\n)+?torch\.distributed\.elastic\.multiprocessing"
                  r"\.errors\.ChildFailedError:", "", output)
    assert ours.count("Traceback") == 0 and "gloo" not in ours.lower(), ours[-5000:]
    assert "interrupted by SIGTERM: stopped while waiting for cell lenet__s16" in stderr, stderr[-3000:]
    assert "interrupted by SIGTERM: rank 1 stopped with rank 0 while it waited for cell lenet__s16's lock" in stderr
    assert stderr.count("exitcode  : 143") == 2, stderr[-3000:]
    assert stderr.count("fix: resume with: ") == 1
    assert not (tmp_path / "out" / "checkpoints" / "lenet__s16.pt").exists()  # nothing trained


def test_rank_0_unable_to_write_a_checkpoint_ends_every_rank_with_its_code(tmp_path):
    """A full disk: rank 0 cannot write the cell's first checkpoint (WriteFailed, exit 1, its message). Rank 1,
    which trains on, must learn it at that step (Distributed.agreed_write) and end with exit 1 too, instead of
    dying in its next collective with a gloo error."""
    import shutil

    if sys.platform != "linux" or shutil.which("mount") is None:
        pytest.skip("needs Linux's mount to make a small file system")
    out = tmp_path / "small"
    out.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=65536", "tmpfs", str(out)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip() or mounted.returncode})")
    try:
        spec = json.loads(json.dumps(SPEC))
        spec["defense"]["strengths"] = [16]
        spec["training"].update(epochs=2, max_batches=1)
        spec_path = tmp_path / "spec.json"
        spec_path.write_text(json.dumps(spec))
        proc = run_torchrun(spec_path, str(out), worker_env())
    finally:
        subprocess.run(["umount", "-l", str(out)], capture_output=True)
    output = proc.stdout + proc.stderr
    ours = re.sub(r"Traceback \(most recent call last\):\n(?:  .*\n)+?torch\.distributed\.elastic\.multiprocessing"
                  r"\.errors\.ChildFailedError:", "", output)
    assert ours.count("Traceback") == 0 and "gloo" not in ours.lower(), ours[-5000:]
    flat = proc.stderr.replace("\n", "")
    assert "error: no space left on" in flat and "cell lenet__s16 has no checkpoint yet" in flat, proc.stderr[-3000:]
    assert "rank 1 stopped because rank 0 failed (exit 1) while it wrote the cell's checkpoint" in flat
    assert proc.stderr.count("exitcode  : 1 ") == 2, proc.stderr[-3000:]
