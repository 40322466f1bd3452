"""Fault injection, spec values (issue 12: 6, 7): whatever `harness validate` accepts, `harness run` can run.

A spec that validates must run to a report: exit 0, or exit 1 with the cells that failed named in it (a numeric
blow-up fails its cell as a non-finite loss does), never exit 2 after validation passed, never a traceback.
"""

from __future__ import annotations

import copy
import json

from conftest import TINY_SPEC, invoke


def quick_spec() -> dict:
    spec = copy.deepcopy(TINY_SPEC)
    spec["dataset"].update(max_train=32, max_test=16)
    spec["training"].update(epochs=1, batch_size=16, max_batches=1)
    spec["defense"]["options"] = {"steps": 1, "step_size": 16}
    spec["evaluation"]["attacks"][0]["options"] = {"steps": 1, "step_size": 16}
    spec["evaluation"]["checks"] = {"enabled": False}
    spec["analysis"] = {"enabled": False}
    return spec


def test_an_overflowing_learning_rate_fails_each_cell_and_the_run_goes_on(write_spec, tmp_path):
    """lr 1e39 validates (a positive number) but overflows float32 inside SGD's update: torch raises
    `value cannot be converted to type float without overflow` from optimizer.step. Each cell fails with that
    numeric error, as with a non-finite loss; the run reaches the last cell and writes its report (exit 1)."""
    spec = quick_spec()
    spec["training"]["lr"] = 1e39
    path = write_spec(spec)
    assert invoke("validate", path).exit_code == 0
    result = invoke("run", path, "--out", tmp_path / "out")
    assert result.exit_code == 1, result.output
    assert "2 cell(s) failed: lenet__s0, lenet__s32" in result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [(c["id"], c["status"]) for c in report["cells"]] == [("lenet__s0", "failed"), ("lenet__s32", "failed")]
    for cell in report["cells"]:
        assert "numeric error at epoch 1, step 1" in cell["error"] and "without overflow" in cell["error"]
        assert "lower the learning rate" in cell["error"]
