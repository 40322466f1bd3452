"""Shared fixtures: tiny real specs (CPU, seconds) and a clean plugin cache per test."""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from click.testing import CliRunner

from harness import registry
from harness.cli import cli

os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
# One intra-op thread: tests use tiny models, for which two threads on a 2-core machine (often shared with other
# work) only spin against each other (measured up to 10x slower); every test module inherits this. Said through
# OMP_NUM_THREADS too, which harness.threads.configure (run by every harness run) respects, as do subprocesses.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]

TINY_SPEC = {
    "name": "tiny",
    "seed": 0,
    "device": "cpu",
    "dataset": {"name": "digits", "max_train": 256, "max_test": 64},
    "models": [{"name": "lenet", "options": {"spectral_norm": True}}],
    "defense": {"name": "pgd-at", "strengths": [0, 32], "options": {"steps": 2, "step_size": 16}},
    "training": {"epochs": 1, "batch_size": 64, "lr": 0.1},
    "evaluation": {"batch_size": 128, "attacks": [{"name": "foolbox-pgd", "eps": 32, "options": {"steps": 2, "step_size": 16}}]},
}


@pytest.fixture
def tiny_spec() -> dict:
    return copy.deepcopy(TINY_SPEC)


def fast_spec() -> dict:
    """TINY_SPEC at its quickest: 64 training and 32 test digits, one-step attacks in training and evaluation, no
    evaluation checks, no analysis."""
    spec = copy.deepcopy(TINY_SPEC)
    spec["dataset"].update(max_train=64, max_test=32)
    spec["defense"]["options"]["steps"] = 1
    spec["evaluation"]["attacks"][0]["options"]["steps"] = 1
    spec["evaluation"]["checks"] = {"enabled": False}
    spec["analysis"] = {"enabled": False}
    return spec


def finished_run(folder: Path, spec: dict) -> Path:
    """`spec` written to folder/spec.json and run to its end in-process (`harness run`, one job): the run's folder."""
    (folder / "spec.json").write_text(json.dumps(spec))
    result = invoke("run", folder / "spec.json", "--out", folder / "out")
    assert result.exit_code == 0, result.output
    return folder / "out"


@pytest.fixture
def write_spec(tmp_path):
    def write(spec, name: str = "spec.json") -> Path:
        path = tmp_path / name
        path.write_text(spec if isinstance(spec, str) else json.dumps(spec))
        return path

    return write


@pytest.fixture(autouse=True)
def fresh_plugin_cache():
    registry._LOADED.clear()
    yield
    registry._LOADED.clear()


def invoke(*args):
    """Run the CLI in-process as a user would; bad input must never reach the user as a traceback."""
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert "Traceback" not in result.output
    return result


def lenet() -> torch.nn.Module:
    """The spectral-norm LeNet the eval specs of the tests name (`{"name": "lenet", "options": {"spectral_norm":
    true}}`), untrained, for 10 classes of 8x8 digits."""
    return registry.load("model", "lenet")(spectral_norm=True).build(10, (1, 8, 8))


@pytest.fixture(scope="session")
def lenet_weights_file(tmp_path_factory) -> Path:
    """A spectral-norm LeNet trained for a few real steps (3 epochs of 256 digits, no defense), its state_dict saved
    once per session: only read (by `harness eval` / harness.evaluate), never written, by the tests that use it."""
    from harness import spec as spec_mod
    from harness.runner import load_data, seed_everything
    from harness.train import train

    spec = spec_mod.validate(copy.deepcopy(TINY_SPEC))  # its training split: 256 digits
    seed_everything(0)
    model = lenet()
    cfg = {"epochs": 3, "batch_size": 32, "lr": 0.1, "momentum": 0.9, "weight_decay": 0, "nesterov": False,
           "schedule": {"type": "constant"}, "max_batches": None}
    train(model, registry.load("defense", "none")(eps=0.0), load_data(spec), cfg, torch.device("cpu"), seed=0)
    path = tmp_path_factory.mktemp("lenet-weights") / "lenet.pt"
    torch.save(model.state_dict(), path)
    registry._LOADED.clear()
    return path


@pytest.fixture
def trained_lenet(lenet_weights_file) -> tuple[Path, torch.nn.Module]:
    """(the weights file, a LeNet of its own holding those weights): each test may change its model freely."""
    model = lenet()
    model.load_state_dict(torch.load(lenet_weights_file, weights_only=True))
    return lenet_weights_file, model


# A distribution of misbehaving plugins, for the tests of failure handling (test_safety, test_distributed).
EVIL_PLUGINS = '''
import os

import torch
import torch.nn.functional as F
from harness.plugin import AttackPlugin, DefensePlugin
from harness_plugins.defenses import PGDAdversarialTraining

CALLS = {"perturb": 0}


def wait_at_gate(calls, eps):
    """The gate of the `*-waits-for-gate` defenses: with $HARNESS_TEST_GATE set, a cell's 3rd loss call in a process
    (in training, after its first checkpoint at <= 2 steps per epoch) writes $HARNESS_TEST_GATE-<strength>.waiting
    and waits (up to 10 min) until $HARNESS_TEST_GATE-<strength> exists. A test opens it once what it must see
    has happened (its signal taken, a status shown), so that cannot depend on the machine's load. A requeued job
    finds its gate open. Without the variable nothing waits."""
    import time

    gate = os.environ.get("HARNESS_TEST_GATE")
    if gate and calls == 3:
        gate = f"{gate}-{round(eps * 255)}"
        open(gate + ".waiting", "w").close()
        deadline = time.monotonic() + 600
        while not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.01)


class PGDATWaitsForGate(PGDAdversarialTraining):
    """pgd-at, waiting at the gate (wait_at_gate)."""

    def __init__(self, eps, **options):
        super().__init__(eps, **options)
        self.calls = 0

    def loss(self, model, x, y):
        self.calls += 1
        wait_at_gate(self.calls, self.eps)
        return super().loss(model, x, y)


class CountingCrossEntropy(DefensePlugin):
    """Cross-entropy that counts its calls; at a positive strength `corrupt` decides what each call returns."""

    def __init__(self, eps):
        super().__init__(eps)
        self.calls = 0

    def loss(self, model, x, y):
        self.calls += 1
        loss = F.cross_entropy(model(x), y)
        return self.corrupt(loss) if self.eps > 0 else loss


class ExplodeAtEpoch2(CountingCrossEntropy):
    """Infinite from the 5th batch on (epoch 2 with 4 steps per epoch)."""

    def corrupt(self, loss):
        return loss * float("inf") if self.calls >= 5 else loss


class ExplodeWaitsForGate(ExplodeAtEpoch2):
    """explode, waiting at the gate (wait_at_gate)."""

    def loss(self, model, x, y):
        wait_at_gate(self.calls + 1, self.eps)
        return super().loss(model, x, y)


class NaNGradientEndingEpoch2(CountingCrossEntropy):
    """A finite value but a NaN gradient at the 4th batch (epoch 2, step 2 of 2): sqrt(0 * loss) is 0, its
    derivative 0 * inf."""

    def corrupt(self, loss):
        return loss + torch.sqrt(0 * loss) if self.calls == 4 else loss


class NaNOnRank1(CountingCrossEntropy):
    """NaN in torchrun rank 1's shard alone from its 5th batch on (epoch 2, step 1 at 4 steps per epoch)."""

    def corrupt(self, loss):
        return loss * float("nan") if self.calls >= 5 and os.environ.get("RANK") == "1" else loss


class RaisesOnRank1(CountingCrossEntropy):
    """A plugin bug on torchrun rank 1's shard alone: a KeyError at its 3rd batch (epoch 2 at 2 steps per
    epoch), before its forward through the model (a failure there fails the cell)."""

    def failure(self):
        return KeyError("no such shard")

    def loss(self, model, x, y):
        if self.calls == 2 and self.eps > 0 and os.environ.get("RANK") == "1":
            raise self.failure()
        return super().loss(model, x, y)

    def corrupt(self, loss):
        return loss


class RefusesOnRank1(RaisesOnRank1):
    """The same place, but the plugin says the input is wrong (BadInput: the run ends with exit 2)."""

    def failure(self):
        from harness.errors import BadInput

        return BadInput("refuses-on-rank-1: this shard holds an image it cannot take", fix="use other data")


class RaisesInLoss(DefensePlugin):
    """A plugin bug: a KeyError inside its loss (for the plugin-boundary messages)."""

    def loss(self, model, x, y):
        return {"logits": model(x)}["loss"]


class RaisesInPerturb(AttackPlugin):
    def perturb(self, model, x, y):
        raise ValueError("this attack handles only 3-channel images")


class WaitsForGate(AttackPlugin):
    """No perturbation; each call first waits (up to 10 min) until the file $HARNESS_TEST_GATE exists: a test
    opens it only after its signal was sent, so the evaluation cannot end before the signal lands."""

    def perturb(self, model, x, y):
        import time

        gate, deadline = os.environ.get("HARNESS_TEST_GATE"), time.monotonic() + 600
        while gate and not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.01)
        return x


class RefusesTheInput(AttackPlugin):
    """Says the input is wrong (BadInput, exit 2) at its first call, as a plugin may once it sees the data."""

    def perturb(self, model, x, y):
        from harness.errors import BadInput

        raise BadInput("refuses-the-input: these images are not what it attacks", fix="use another attack")


class LeavesTheBall(AttackPlugin):
    """Fine for the first cell; from then on it moves images by 3 eps (a broken projection)."""

    def perturb(self, model, x, y):
        CALLS["perturb"] += 1
        step = self.eps if CALLS["perturb"] == 1 else 3 * self.eps
        return (x + step * torch.sign(torch.randn_like(x))).clamp(0, 1)
'''


@pytest.fixture
def evil_plugins(tmp_path, monkeypatch):
    """A distribution `evil-plugins` on sys.path: found by importlib.metadata exactly as an installed one is.
    Yields its folder (a subprocess finds it through PYTHONPATH)."""
    site = tmp_path / "site"
    (site / "evil_plugins-0.1.dist-info").mkdir(parents=True)
    (site / "evil_plugins.py").write_text(EVIL_PLUGINS)
    (site / "evil_broken.py").write_text("raise RuntimeError('evil-plugins needs a GPU driver from 2031')\n")
    (site / "evil_plugins-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: evil-plugins\n"
                                                                 "Version: 0.1\n")
    (site / "evil_plugins-0.1.dist-info" / "entry_points.txt").write_text(
        "[harness.defenses]\nexplode = evil_plugins:ExplodeAtEpoch2\n"
        "explode-waits-for-gate = evil_plugins:ExplodeWaitsForGate\n"
        "nan-gradient = evil_plugins:NaNGradientEndingEpoch2\nnan-on-rank-1 = evil_plugins:NaNOnRank1\n"
        "raises-in-loss = evil_plugins:RaisesInLoss\npgd-at-waits-for-gate = evil_plugins:PGDATWaitsForGate\n"
        "raises-on-rank-1 = evil_plugins:RaisesOnRank1\nrefuses-on-rank-1 = evil_plugins:RefusesOnRank1\n\n"
        "[harness.attacks]\nleaves-ball = evil_plugins:LeavesTheBall\nraises-in-perturb = evil_plugins:RaisesInPerturb\n"
        "waits-for-gate = evil_plugins:WaitsForGate\nrefuses-the-input = evil_plugins:RefusesTheInput\n\n"
        "[harness.models]\nbroken = evil_broken:Net\n")
    monkeypatch.syspath_prepend(str(site))
    yield site
    for name in ("evil_plugins", "evil_broken"):
        sys.modules.pop(name, None)


# `harness submit` / `harness status` (tests/test_submit.py, test_status.py, test_slurm.py): three cells, fast (no
# evaluation checks, no analysis, one-step attacks), 8 epochs of 2 steps so a signal can land mid-training.
SUBMIT_SPEC = copy.deepcopy(TINY_SPEC)
SUBMIT_SPEC["dataset"].update(max_train=128, max_test=64)
SUBMIT_SPEC["defense"].update(strengths=[0, 16, 32], options={"steps": 1, "step_size": 16})
SUBMIT_SPEC["training"].update(epochs=8, batch_size=32, max_batches=2)
SUBMIT_SPEC["evaluation"].update(attacks=[{"name": "foolbox-pgd", "eps": 32, "options": {"steps": 1, "step_size": 16}}],
                                 checks={"enabled": False})
SUBMIT_SPEC["analysis"] = {"enabled": False}
SUBMIT_CELLS = ["lenet__s0", "lenet__s16", "lenet__s32"]


def gated(spec: dict) -> dict:
    """The spec with `pgd-at-waits-for-gate` (evil_plugins) in place of pgd-at: the same training, except that with
    $HARNESS_TEST_GATE set each cell waits at epoch 2, step 1 until the test opens its gate (gate_of)."""
    spec = copy.deepcopy(spec)
    spec["defense"]["name"] = "pgd-at-waits-for-gate"
    return spec


def gate_of(gate: Path, cell_id: str) -> Path:
    return gate.with_name(f"{gate.name}-{cell_id.rsplit('__s', 1)[1]}")


def signal_at_gate(proc, gate: Path, cell_id: str, signum: int, pid=None, timeout: float = 300) -> list[str]:
    """Send `signum` to `proc` (a run of a gated spec, stderr piped), or to the process `pid()` names, once its cell
    waits at its gate, and open the gate once it has taken the signal ("<SIGNAL> received" on stderr). The stderr
    lines read."""
    import signal
    import time

    deadline = time.monotonic() + timeout
    while not gate_of(gate, cell_id).with_suffix(".waiting").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    if pid is None:
        proc.send_signal(signum)
    else:
        os.kill(pid(), signum)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if line.startswith(f"{signal.Signals(signum).name} received"):
            break
    gate_of(gate, cell_id).touch()
    return seen


def record_at_gate(out: Path, gate: Path, cell_id: str, alive=lambda: True, timeout: float = 900) -> dict:
    """The cell's task record once its job waits at the gate (training, after its epoch-1 checkpoint)."""
    import time

    from harness import submit

    deadline = time.monotonic() + timeout
    while True:
        record = submit.read_json_file(submit.task_record_path(out, cell_id)) or {}
        if gate_of(gate, cell_id).with_suffix(".waiting").exists() and record.get("state") == "running":
            return record
        assert alive() and time.monotonic() < deadline, f"{cell_id} never reached its gate: {record}"
        time.sleep(0.02)


def open_gate_once_received(out: Path, gate: Path, record: dict, signame: str, alive=lambda: True,
                            timeout: float = 900) -> None:
    """Open the cell's gate once its job has taken the signal (its guard's "<SIGNAL> received" line in the job's
    log): the stop request is then certain to be seen at the step boundary right after the gate."""
    import time

    log = out / "submit" / "logs" / record["job_id"] / f"{record['job_id']}_0_log.err"
    deadline = time.monotonic() + timeout
    while not (log.exists() and f"{signame} received" in log.read_text(errors="replace")):
        assert alive() and time.monotonic() < deadline, f"{record['cell']} never took {signame}"
        time.sleep(0.02)
    gate_of(gate, record["cell"]).touch()


def job_env(**extra) -> dict:
    """The environment of a `python -m harness` subprocess and of the jobs it starts (they inherit it)."""
    return {**os.environ, "GIT_PYTHON_REFRESH": "quiet", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


VARYING = ("seconds", "timings", "resumed_from", "checksum")  # what differs between any two runs of one cell


def without_timings(value, also: tuple[str, ...] = ()):
    """A result without what differs between any two runs (wall-clock fields, where it resumed, its checksum),
    nor the keys in `also`: what is left must be equal for an interrupted-and-resumed run and a straight one."""
    drop = VARYING + tuple(also)
    if isinstance(value, dict):
        return {k: without_timings(v, also) for k, v in value.items() if k not in drop}
    if isinstance(value, list):
        return [without_timings(v, also) for v in value]
    return value


def assert_same_cell(a: dict, b: dict, ckpt_a: Path, ckpt_b: Path) -> None:
    """Two results of one cell are the same: metrics, per-epoch objectives and the trained weights, to the bit."""
    from harness import checkpoint

    assert a["status"] == b["status"] == "done"
    assert a["metrics"] == b["metrics"], a["id"]
    assert [h["train_objective"] for h in a["history"]] == [h["train_objective"] for h in b["history"]], a["id"]
    wa, wb = checkpoint.load(ckpt_a)["model"], checkpoint.load(ckpt_b)["model"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wb), a["id"]


def assert_same_as_a_plain_run(spec_path: Path, out: Path, plain: Path, cells) -> dict[str, dict]:
    """Run `spec_path` plainly (in-process, one job) into `plain`, assert that each of `cells` in `out` (a submitted,
    interrupted or resumed run) is the same as its plain twin (assert_same_cell); return out's results by cell."""
    assert invoke("run", spec_path, "--out", plain).exit_code == 0
    results = {}
    for cell_id in cells:
        a = json.loads((out / "cells" / f"{cell_id}.json").read_text())
        b = json.loads((plain / "cells" / f"{cell_id}.json").read_text())
        assert_same_cell(a, b, out / "checkpoints" / f"{cell_id}.pt", plain / "checkpoints" / f"{cell_id}.pt")
        results[cell_id] = a
    return results
