"""An exception from a plugin's own code (construction, build, load, a defense's loss, an attack's perturb) reaches
the user as one message naming the plugin, its distribution and the cause, exit 1: never a bare traceback
(harness.registry.plugin_boundary)."""

from __future__ import annotations

import pytest

from conftest import invoke
from harness import registry
from harness.errors import BadInput, PluginFailure


def test_a_defense_that_raises_in_its_loss_fails_its_cell_by_name(evil_plugins, tiny_spec, write_spec, tmp_path):
    tiny_spec["dataset"].update(max_train=64, max_test=16)
    tiny_spec["defense"] = {"name": "raises-in-loss", "strengths": [0]}
    result = invoke("run", write_spec(tiny_spec), "--out", tmp_path / "out")
    assert result.exit_code == 1, result.output
    assert ("defense plugin 'raises-in-loss' (evil_plugins:RaisesInLoss, from evil-plugins 0.1) failed in loss: "
            "KeyError: 'loss' (raised at evil_plugins.py:") in " ".join(result.output.split())
    assert "in loss)" in result.output


def test_an_attack_that_raises_in_perturb_is_named(evil_plugins, tiny_spec, write_spec, tmp_path):
    tiny_spec["dataset"].update(max_train=64, max_test=16)
    tiny_spec["defense"] = {"name": "none", "strengths": [0]}
    tiny_spec["evaluation"]["attacks"] = [{"name": "raises-in-perturb", "eps": 8}]
    result = invoke("run", write_spec(tiny_spec), "--out", tmp_path / "out")
    assert result.exit_code == 1, result.output
    flat = " ".join(result.output.split())
    assert "attack plugin 'raises-in-perturb' (evil_plugins:RaisesInPerturb, from evil-plugins 0.1) failed in " \
           "perturb: ValueError: this attack handles only 3-channel images" in flat


def test_the_boundary_lets_bad_input_and_numeric_passthrough_go_unchanged():
    with pytest.raises(BadInput, match="no such folder"):
        with registry.plugin_boundary("dataset", "digits", "load"):
            raise BadInput("no such folder")
    with pytest.raises(OverflowError):
        with registry.plugin_boundary("defense", "pgd-at", "loss", passthrough=lambda e: isinstance(e, OverflowError)):
            raise OverflowError("float overflow")
    with pytest.raises(PluginFailure) as caught:
        with registry.plugin_boundary("model", "lenet", "build"):
            raise RuntimeError("view size is not compatible\nsecond line")
    assert caught.value.exit_code == 1
    assert caught.value.message.startswith("model plugin 'lenet' (") and "from harness " in caught.value.message
    assert "failed in build: RuntimeError: view size is not compatible (raised at test_plugin_errors.py:" \
        in caught.value.message
    assert "second line" not in caught.value.message
