"""Spec validation: every error at once, each with its JSON path; defaults resolved; plugin options checked."""

import pytest

from harness import spec as spec_mod
from harness.errors import BadInput


def errors_of(spec) -> str:
    with pytest.raises(BadInput) as info:
        spec_mod.validate(spec)
    return info.value.message


def test_valid_spec_resolves_defaults(tiny_spec):
    resolved = spec_mod.validate(tiny_spec)
    assert resolved["training"]["momentum"] == 0.9
    assert resolved["training"]["weight_decay"] == 0
    assert resolved["training"]["schedule"] == {"type": "constant"}
    assert resolved["models"][0]["label"] == "lenet"
    assert resolved["evaluation"]["attacks"][0]["label"] == "foolbox-pgd@32"
    # plugin defaults are filled from the plugin's own schema
    assert resolved["defense"]["options"] == {"steps": 2, "step_size": 16, "random_start": True, "attack_bn": "eval"}
    assert resolved["dataset"]["options"]["test_fraction"] == 0.2
    assert "label" not in tiny_spec["models"][0], "validation must not mutate its input"


def test_all_errors_reported_with_json_paths(tiny_spec):
    tiny_spec["defense"]["strengths"] = [0, 8, -4]
    tiny_spec["training"]["epochs"] = "ten"
    tiny_spec["seed"] = -1
    message = errors_of(tiny_spec)
    assert "$.defense.strengths[2]: -4 is less than the minimum of 0" in message
    assert "$.training.epochs: 'ten' is not of type 'integer'" in message
    assert "$.seed: -1 is less than the minimum of 0" in message
    assert "3 problems" in message


def test_unknown_key_suggests_the_close_one(tiny_spec):
    tiny_spec["training"]["epoch"] = 3
    message = errors_of(tiny_spec)
    assert "$.training: unknown key 'epoch' (did you mean 'epochs'?)" in message


def test_schedule_alternative_points_into_the_branch(tiny_spec):
    tiny_spec["training"]["schedule"] = {"type": "multistep", "milestones": [10], "gamma": -1}
    message = errors_of(tiny_spec)
    assert "$.training.schedule.gamma" in message


def test_unknown_plugin_names_closest_and_available(tiny_spec):
    tiny_spec["models"][0]["name"] = "lenett"
    message = errors_of(tiny_spec)
    assert "$.models[0].name: unknown model 'lenett'. Did you mean 'lenet'?" in message
    assert "Available models: " in message and "lenet" in message


def test_plugin_options_validated_by_the_plugin_schema(tiny_spec):
    tiny_spec["models"][0]["options"] = {"spectral_nrom": True}
    tiny_spec["defense"]["options"]["steps"] = 0
    message = errors_of(tiny_spec)
    assert "$.models[0].options: unknown key 'spectral_nrom' (did you mean 'spectral_norm'?)" in message
    assert "$.defense.options.steps: 0 is less than the minimum of 1" in message


def test_duplicate_labels_rejected(tiny_spec):
    tiny_spec["models"].append({"name": "lenet", "options": {"spectral_norm": False}})
    assert "$.models[1]: label 'lenet' repeats $.models[0]" in errors_of(tiny_spec)


def test_smoke_strengths_must_be_a_subset_of_the_defense_strengths(tiny_spec, write_spec):
    """Checked by `harness validate` (not only by `run --smoke`): a CI smoke spec fails before anything runs."""
    from conftest import invoke

    tiny_spec["smoke"] = {"strengths": [0, 8]}
    assert "$.smoke.strengths: [8] are not among $.defense.strengths [0, 32]" in errors_of(tiny_spec)
    result = invoke("validate", write_spec(tiny_spec))
    assert result.exit_code == 2 and "$.smoke.strengths" in result.output and "Traceback" not in result.output
    tiny_spec["smoke"] = {"strengths": [32]}
    assert spec_mod.validate(tiny_spec)["smoke"]["strengths"] == [32]


def test_not_an_object():
    assert "$: [1, 2] is not of type 'object'" in errors_of([1, 2])


def test_invalid_json_reports_line_and_column(write_spec):
    path = write_spec('{\n  "name": "x",\n  "seed": ,\n}')
    with pytest.raises(BadInput) as info:
        spec_mod.load(path)
    assert "line 3, column 11" in info.value.message


def test_missing_and_folder_paths(tmp_path):
    with pytest.raises(BadInput, match="spec file not found"):
        spec_mod.load(tmp_path / "nope.json")
    with pytest.raises(BadInput, match="is a folder"):
        spec_mod.load(tmp_path)


def test_shipped_specs_are_valid():
    from conftest import REPO

    specs = sorted((REPO / "specs").glob("*.json"))
    assert specs, "specs/ must ship at least the offline default"
    for path in specs:
        resolved = spec_mod.load(path)
        assert resolved["name"] == path.stem, f"{path.name}: its name must match the file name"
