"""Checkpoints and resume: exact on CPU (torch.equal), finished cells skipped, a changed spec refused."""

import json
import random
import shutil
import signal

import numpy as np
import pytest
import torch

from harness import checkpoint, registry, spec as spec_mod
from harness.plugin import to_unit
from harness.report import validate_report
from harness.runner import load_data, seed_everything
from harness.interrupt import TrainingStopped
from harness.train import train
from conftest import invoke

CELL = "lenet__s16"


@pytest.fixture
def small_spec(tiny_spec):
    """One spectrally-normalized LeNet cell, PGD-AT at 16 (advertorch's random start draws from torch's RNG)."""
    tiny_spec["dataset"].update(max_train=96, max_test=32)
    tiny_spec["defense"].update(strengths=[16], options={"steps": 2, "step_size": 8})
    tiny_spec["training"].update(epochs=3, batch_size=32, lr=0.1,
                                 schedule={"type": "multistep", "milestones": [2], "gamma": 0.1})
    tiny_spec["evaluation"]["attacks"][0]["options"] = {"steps": 1, "step_size": 16}
    return tiny_spec


def final_model(out):
    return checkpoint.load(out / "checkpoints" / f"{CELL}.pt")["model"]


def assert_same_params(a, b):
    assert a.keys() == b.keys()
    for key in a:  # parametrizations.weight.original and the spectral-norm _u/_v buffers included
        assert torch.equal(a[key], b[key]), key


def cell_result(out):
    return json.loads((out / "cells" / f"{CELL}.json").read_text())


def test_sigterm_mid_run_then_resume_equals_uninterrupted(small_spec, write_spec, tmp_path, monkeypatch):
    spec_path = write_spec(small_spec)
    assert invoke("run", spec_path, "--out", tmp_path / "straight").exit_code == 0

    real_save, saved = checkpoint.save, []

    def save_then_signal(path, state):  # a real SIGTERM right after epoch 1's checkpoint is on disk
        real_save(path, state)
        saved.append((state["epoch"], state["step"]))
        if len(saved) == 1:
            shutil.copy(path, tmp_path / "after_epoch_1.pt")
            signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(checkpoint, "save", save_then_signal)
    out = tmp_path / "interrupted"
    stopped = invoke("run", spec_path, "--out", out)
    assert stopped.exit_code == 143, stopped.output
    assert saved == [(1, 0), (1, 1)], "epoch 1's checkpoint, then one at the next step boundary, then stop"
    assert f"resume with: harness run {spec_path} --out {out}" in stopped.output
    assert not (out / "cells" / f"{CELL}.json").exists() and not (out / "report.json").exists()
    monkeypatch.setattr(checkpoint, "save", real_save)

    resumed = invoke("run", spec_path, "--out", out)
    assert resumed.exit_code == 0, resumed.output
    assert f"cell {CELL}: resuming from" in resumed.output
    assert_same_params(final_model(out), final_model(tmp_path / "straight"))
    a, b = cell_result(out), cell_result(tmp_path / "straight")
    assert a["resumed_from"] == {"epoch": 1, "step": 1} and "resumed_from" not in b
    assert [h["train_objective"] for h in a["history"]] == [h["train_objective"] for h in b["history"]]
    assert [h["lr"] for h in a["history"]] == pytest.approx([0.1, 0.1, 0.01])  # milestone 2: the scheduler state came back
    assert a["metrics"] == b["metrics"]  # evaluation draws from the restored RNG too
    validate_report(json.loads((out / "report.json").read_text()))

    # an interruption right at an epoch boundary: resume from epoch 1's checkpoint in an empty folder
    boundary = tmp_path / "boundary"
    (boundary / "checkpoints").mkdir(parents=True)
    shutil.copy(tmp_path / "after_epoch_1.pt", boundary / "checkpoints" / f"{CELL}.pt")
    assert invoke("run", spec_path, "--out", boundary).exit_code == 0
    assert_same_params(final_model(boundary), final_model(tmp_path / "straight"))
    assert cell_result(boundary)["resumed_from"] == {"epoch": 1, "step": 0}


@pytest.mark.parametrize("stop_at, stopped_at, saved_at", [(7, (2, 2), (1, 2)), (5, (1, 6), (0, 6))])
def test_mid_epoch_resume_with_augmentation_is_exact(small_spec, tmp_path, stop_at, stopped_at, saved_at):
    """Stopped after step 2 of epoch 2 (or after the last step of epoch 1, before its scheduler step) with an
    augmentation drawing from the data generator; resumed in a process whose every global RNG was moved on: the
    parameters end equal to an uninterrupted run's."""
    spec = spec_mod.validate(small_spec)
    data = load_data(spec)
    data.augment = lambda x, g: torch.where(torch.rand(len(x), 1, 1, 1, generator=g) < 0.5, x.flip(-1), x)
    cfg = dict(spec["training"], batch_size=16)  # 6 steps per epoch
    defense = registry.load("defense", "pgd-at")(eps=to_unit(16), steps=2, step_size=8.0)
    model_cls = registry.load("model", "lenet")

    def fresh_model():
        seed_everything(0)
        return model_cls(spectral_norm=True).build(data.num_classes, data.input_shape)

    straight = fresh_model()
    history = train(straight, defense, data, cfg, torch.device("cpu"), seed=0)

    model, steps = fresh_model(), iter(range(10**6))
    path = tmp_path / "mid.pt"
    with pytest.raises(TrainingStopped) as stopped:
        train(model, defense, data, cfg, torch.device("cpu"), seed=0, should_stop=lambda: next(steps) == stop_at,
              on_checkpoint=lambda state: checkpoint.save(path, {**state, "cell": "c", "fingerprint": "", "spec": {}}))
    assert (stopped.value.epoch, stopped.value.step) == stopped_at
    state = checkpoint.load(path)
    assert (state["epoch"], state["step"]) == saved_at

    resumed = fresh_model()
    torch.manual_seed(1234), random.seed(99), np.random.seed(7)  # a new process's RNGs are anywhere
    resumed_history = train(resumed, defense, data, cfg, torch.device("cpu"), seed=0, resume=state)
    assert_same_params(resumed.state_dict(), straight.state_dict())
    assert [h["train_objective"] for h in resumed_history] == [h["train_objective"] for h in history]


def test_finished_cells_are_skipped_and_evaluation_changes_do_not_retrain(small_spec, write_spec, tmp_path):
    out = tmp_path / "out"
    small_spec["defense"]["strengths"] = [0, 16]
    assert invoke("run", write_spec(small_spec), "--out", out).exit_code == 0
    before = {p.name: p.read_bytes() for p in (out / "cells").iterdir()}

    again = invoke("run", write_spec(small_spec), "--out", out)
    assert again.exit_code == 0 and again.output.count("finished earlier under the same spec") == 2
    assert {p.name: p.read_bytes() for p in (out / "cells").iterdir()} == before
    assert len(json.loads((out / "report.json").read_text())["cells"]) == 2

    small_spec["evaluation"]["attacks"][0]["options"]["steps"] = 2  # evaluation only: re-evaluate, no training
    reeval = invoke("run", write_spec(small_spec), "--out", out)
    assert reeval.exit_code == 0 and reeval.output.count("re-evaluating (training unchanged)") == 2
    result = cell_result(out)
    assert result["resumed_from"] == {"epoch": 3, "step": 0}
    assert result["history"] == json.loads(before[f"{CELL}.json"])["history"]


def test_changed_training_spec_is_refused_naming_fields(small_spec, write_spec, tmp_path):
    out = tmp_path / "out"
    assert invoke("run", write_spec(small_spec), "--out", out).exit_code == 0
    small_spec["training"]["lr"] = 0.05
    small_spec["defense"]["options"]["steps"] = 3
    refused = invoke("run", write_spec(small_spec), "--out", out)
    assert refused.exit_code == 2
    assert "training.lr: 0.1 -> 0.05" in refused.output and "defense.options.steps: 2 -> 3" in refused.output
    assert f"cell {CELL}" in refused.output and "--fresh" in refused.output and "--force" in refused.output

    forced = invoke("run", write_spec(small_spec), "--out", out, "--force")
    assert forced.exit_code == 0 and cell_result(out)["resumed_from"]["epoch"] == 3
    assert invoke("run", write_spec(small_spec), "--out", out).exit_code == 0  # the new checkpoint matches

    fresh = invoke("run", write_spec(small_spec), "--out", out, "--fresh")
    assert fresh.exit_code == 0 and "resumed_from" not in cell_result(out)


def test_checkpoint_of_another_architecture_is_refused(small_spec, write_spec, tmp_path):
    out = tmp_path / "out"
    assert invoke("run", write_spec(small_spec), "--out", out).exit_code == 0
    small_spec["models"][0]["options"]["spectral_norm"] = False
    refused = invoke("run", write_spec(small_spec), "--out", out)
    assert refused.exit_code == 2 and "model.options.spectral_norm: true -> false" in refused.output
    forced = invoke("run", write_spec(small_spec), "--out", out, "--force")
    assert forced.exit_code == 2 and "does not fit this model" in forced.output and "--fresh" in forced.output


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_damaged_checkpoint_is_a_clear_error(small_spec, write_spec, tmp_path, damage):
    """A file torch cannot read. (One it reads that is no checkpoint, such as another program's tensors, is
    treated as missing: tests/faults/test_integrity.py.)"""
    out = tmp_path / "out"
    small_spec["training"]["epochs"] = 1
    assert invoke("run", write_spec(small_spec), "--out", out).exit_code == 0
    (out / "cells" / f"{CELL}.json").unlink()
    ckpt = out / "checkpoints" / f"{CELL}.pt"
    if damage == "garbage":
        ckpt.write_bytes(b"\x00not a checkpoint" * 10)
    else:
        ckpt.write_bytes(ckpt.read_bytes()[:1000])
    result = invoke("run", write_spec(small_spec), "--out", out)
    assert result.exit_code == 2, result.output
    assert f"checkpoint {ckpt}" in result.output and "--fresh" in result.output


def test_diff_and_fingerprint():
    old = {"training": {"lr": 0.1, "epochs": 3}, "seed": 0, "model": {"options": {"spectral_norm": True}}}
    new = {"training": {"lr": 0.05, "epochs": 3.0, "nesterov": True}, "seed": 0, "model": {"options": {}}}
    assert checkpoint.diff(old, new) == ["training.lr: 0.1 -> 0.05", "training.nesterov: (absent) -> true",
                                         "model.options.spectral_norm: true -> (absent)"]
    assert checkpoint.fingerprint({"a": 1, "b": [2.0]}) == checkpoint.fingerprint({"b": [2], "a": 1.0})
    assert checkpoint.fingerprint({"a": 1}) != checkpoint.fingerprint({"a": 2})
