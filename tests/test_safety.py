"""Safe loading and paths, a missing dataset root, and misbehaving third-party plugins (registered through real
entry points of a distribution put on sys.path for the test): a non-finite loss keeps the last good checkpoint,
an attack leaving its eps-ball fails by name, a plugin that raises on import is named; other cells go on."""

import ast
import json

import pytest
import torch
from rich.console import Console

from harness import checkpoint, spec as spec_mod
from harness.errors import BadInput
from harness.paths import inside, safe_component
from harness.runner import run

from conftest import REPO, invoke


def test_every_torch_load_is_weights_only():
    """AST scan of the source tree: each call of torch.load (or a bare `load` imported from torch) passes
    weights_only=True literally."""
    offenders, calls = [], 0
    for path in [*REPO.glob("harness/**/*.py"), *REPO.glob("plugins/**/*.py"), *REPO.glob("tests/**/*.py")]:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        bare = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "torch"
                for a in n.names if a.name == "load"}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            is_torch_load = (isinstance(f, ast.Attribute) and f.attr == "load" and isinstance(f.value, ast.Name)
                             and f.value.id == "torch") or (isinstance(f, ast.Name) and f.id in bare)
            if not is_torch_load:
                continue
            calls += 1
            if not any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                       for k in node.keywords):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert calls >= 1, "the scan must see harness.checkpoint's torch.load"
    assert not offenders, f"torch.load without weights_only=True: {offenders}"


@pytest.mark.parametrize("name", ["..", "../x", "a/../../b", "/etc/passwd", "a/b", "a\\b", "", ".hidden", "x\x00y",
                                  "C:\\x", "~root", 7, None])
def test_names_cannot_leave_their_folder(tmp_path, name):
    with pytest.raises(BadInput, match=r"\$\.models\[0\]\.label"):
        safe_component(name, "$.models[0].label")
    if isinstance(name, str):
        with pytest.raises(BadInput):
            inside(tmp_path, "cells", name, where="$.name")


def test_safe_names_pass(tmp_path):
    for name in ["LeNet+SP__s0", "resnet-18__s76.5", "PGD-10@32", "tiny"]:
        assert inside(tmp_path, name) == tmp_path / name


def test_runner_sanitizes_labels_that_skipped_validation(tiny_spec, tmp_path):
    spec = spec_mod.validate(tiny_spec)
    spec["models"][0]["label"] = "../../escaped"  # a caller that built the dict itself
    with pytest.raises(BadInput, match="cannot name a file"):
        run(spec, tmp_path / "out", Console(quiet=True))
    assert not list(tmp_path.rglob("*escaped*"))


def test_dataset_root_that_does_not_exist(tiny_spec, write_spec, tmp_path):
    tiny_spec["dataset"]["root"] = str(tmp_path / "nowhere")
    result = invoke("run", write_spec(tiny_spec), "--out", tmp_path / "out")
    assert result.exit_code == 2 and "$.dataset.root" in result.output and "does not exist" in result.output
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ misbehaving plugins
# (the `evil_plugins` fixture, in conftest.py)


def test_non_finite_loss_keeps_the_last_good_checkpoint(evil_plugins, tiny_spec, write_spec, tmp_path):
    out = tmp_path / "out"
    tiny_spec["dataset"]["max_train"] = 128
    tiny_spec["defense"] = {"name": "explode", "strengths": [0, 8]}
    tiny_spec["training"].update(epochs=2, batch_size=32)  # 4 steps per epoch
    result = invoke("run", write_spec(tiny_spec), "--out", out)
    assert result.exit_code == 1
    assert "training loss became inf at epoch 2, step 1" in result.output
    report = json.loads((out / "report.json").read_text())
    assert [c["status"] for c in report["cells"]] == ["done", "failed"]
    assert "epoch 2, step 1" in report["cells"][1]["error"]
    last_good = checkpoint.load(out / "checkpoints" / "lenet__s8.pt")
    assert (last_good["epoch"], last_good["step"], len(last_good["history"])) == (1, 0, 1)

    # Again: the done cell is kept; the failed one resumes from epoch 1 with a fresh defense instance, whose
    # 4 good steps now finish epoch 2.
    again = invoke("run", write_spec(tiny_spec), "--out", out)
    assert "cell lenet__s0: finished earlier" in again.output and "cell lenet__s8: resuming from" in again.output
    assert again.exit_code == 0, again.output
    cell = json.loads((out / "cells" / "lenet__s8.json").read_text())
    assert cell["resumed_from"] == {"epoch": 1, "step": 0} and [h["epoch"] for h in cell["history"]] == [1, 2]


def test_a_finite_loss_with_a_non_finite_gradient_fails_the_cell_without_checkpointing_it(evil_plugins, tiny_spec,
                                                                                          write_spec, tmp_path):
    """The last step of an epoch can leave NaN weights behind a finite loss: the cell fails by name before that
    state is checkpointed, evaluated or analysed (an SVD of NaN weights used to crash the run with a traceback)."""
    out = tmp_path / "out"
    tiny_spec["dataset"]["max_train"] = 64
    tiny_spec["defense"] = {"name": "nan-gradient", "strengths": [0, 8]}
    tiny_spec["training"].update(epochs=2, batch_size=32)  # 2 steps per epoch: the 4th call ends epoch 2
    result = invoke("run", write_spec(tiny_spec), "--out", out)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "parameters became non-finite during epoch 2" in result.output
    report = json.loads((out / "report.json").read_text())
    assert [c["status"] for c in report["cells"]] == ["done", "failed"]
    last_good = checkpoint.load(out / "checkpoints" / "lenet__s8.pt")
    assert last_good["epoch"] == 1
    assert all(bool(torch.isfinite(v).all()) for v in last_good["model"].values() if v.is_floating_point())


def test_attack_outside_its_ball_fails_by_name_and_other_cells_stay(evil_plugins, tiny_spec, write_spec, tmp_path):
    out = tmp_path / "out"
    tiny_spec["training"]["max_batches"] = 1
    tiny_spec["evaluation"]["attacks"] = [{"name": "leaves-ball", "label": "evil", "eps": 8}]
    tiny_spec["evaluation"]["checks"] = {"enabled": False}  # the evil attack counts its calls: one per cell here
    result = invoke("run", write_spec(tiny_spec), "--out", out)
    assert result.exit_code == 1
    report = json.loads((out / "report.json").read_text())
    first, second = report["cells"]
    assert first["status"] == "done" and first["metrics"]["attacks"]["evil"]["eps"] == 8
    assert second["status"] == "failed" and "attack 'evil' moved an image by 24/255" in second["error"]
    assert "outside its eps-ball of 8/255" in second["error"]
    assert json.loads((out / "cells" / "lenet__s0.json").read_text()) == first


def test_plugin_raising_on_import_is_named(evil_plugins, tiny_spec, write_spec):
    tiny_spec["models"] = [{"name": "broken"}]
    for command in ("validate", "run"):
        result = invoke(command, write_spec(tiny_spec))
        assert result.exit_code == 2
        assert "$.models[0].name: model plugin 'broken' (evil_broken:Net, from evil-plugins 0.1) failed to load" \
            in result.output
        assert "needs a GPU driver from 2031" in result.output
