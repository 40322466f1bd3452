"""Fault injection, spec values (issue 12: 6, 7): whatever `harness validate` accepts, `harness run` can run.

A spec that validates must run to a report: exit 0, or exit 1 with the cells that failed named in it (a numeric
blow-up fails its cell as a non-finite loss does), never exit 2 after validation passed, never a traceback.
"""

from __future__ import annotations

import copy
import json
import shutil

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

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


# ------------------------------------------------------------------------------------------------ property test

# Boundary values tried at every number of the schemas: around 2^31, 2^32 (numpy's seeds), 2^53 (floats stop being
# exact), 2^63 and 2^64 (torch's int64 and uint64 seeds), float32's max (3.4e38), tiny and huge doubles.
BIG_INTS = [2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64, 10**30]
EXTREME_FLOATS = [5e-324, 1e-300, 1e-45, 1e-6, 0.5, 1 - 1e-12, 1e38, 3.5e38, 1e300, 1.7976931348623157e308]
# Numbers that are an amount of work are kept at their bounds' small end, so that an example runs in seconds (a huge
# one is a long run, not a crash); so are the sample counts of the checks and the analysis (bounded by the data,
# but checks and analysis on every sample take minutes) and image sizes (LeNet on 255x255 digits takes minutes).
WORK = {"epochs", "steps", "n_queries", "restarts", "power_iterations", "candidates", "max_samples",
        "convergence_samples", "resize", ("analysis", "max_train")}
# The plugins quick_spec() names, whose options schemas are walked as well
PLUGINS = {("dataset", "name"): ("dataset", "digits"), ("defense", "name"): ("defense", "pgd-at"),
           ("evaluation", "attacks", 0, "name"): ("attack", "foolbox-pgd"),
           ("evaluation", "checks", "gradient_free", "name"): ("attack", "square")}


def numeric_sites(schema: dict, path: tuple = ()) -> list[tuple[tuple, dict]]:
    """(spec path, property schema) of every integer or number the schema holds (through objects and arrays)."""
    types = schema.get("type")
    types = types if isinstance(types, list) else [types]
    if "integer" in types or "number" in types:
        return [(path, schema)]
    sites = []
    for key, sub in schema.get("properties", {}).items():
        sites += numeric_sites(sub, path + (key,))
    if isinstance(schema.get("items"), dict):
        sites += numeric_sites(schema["items"], path + (0,))
    return sites


def values_at(prop: dict, path: tuple) -> list:
    """The boundary values the property allows: its bounds and their neighbours, and the extremes above."""
    low = prop.get("minimum", prop.get("exclusiveMinimum", -float("inf")))
    high = prop.get("maximum", prop.get("exclusiveMaximum", float("inf")))
    integer = "integer" in (prop["type"] if isinstance(prop["type"], list) else [prop["type"]])
    if integer:
        key = path[-1] if not isinstance(path[-1], int) else path[-2]
        work = key in WORK or path in WORK
        candidates = [low, low + 1] if work else BIG_INTS + [low, low + 1, high, high - 1]
    else:
        candidates = EXTREME_FLOATS + [low, high, float(int(low)) + 1]
    ok = [v for v in candidates if isinstance(v, (int, float)) and abs(v) != float("inf")
          and (low < v if "exclusiveMinimum" in prop else low <= v)
          and (v < high if "exclusiveMaximum" in prop else v <= high)]
    return [int(v) for v in ok] if integer else [float(v) for v in ok]


def all_sites() -> list[tuple[tuple, list]]:
    from harness import registry
    from harness.spec import SPEC_SCHEMA

    core = {k: v for k, v in SPEC_SCHEMA["properties"].items() if k not in ("smoke",)}  # smoke: --smoke only
    sites = numeric_sites({"properties": core})
    for where, (kind, name) in PLUGINS.items():
        options = registry.load(kind, name).options_schema
        sites += [(where[:-1] + ("options",) + p, s) for p, s in numeric_sites(options)]
    return [(path, values_at(prop, path)) for path, prop in sites if values_at(prop, path)]


def put(spec: dict, path: tuple, value) -> None:
    """Set the value at `path` (creating objects on the way); a path ending in an index sets the array to [value]."""
    if isinstance(path[-1], int):
        path, value = path[:-1], [value]
    node = spec
    for key in path[:-1]:
        node = node.setdefault(key, {}) if isinstance(node, dict) else node[key]
    node[path[-1]] = value


# A failed cell is a legitimate outcome of a valid spec only for numbers gone wrong (as for a non-finite loss)
NUMERIC_FAILURES = ("numeric error", "non-finite", "not finite")


def check_valid_spec_runs(spec: dict, folder) -> str:
    """validate, and when it accepts, run: exit 0, or exit 1 with only numerically failed cells; never a
    traceback, never exit 2 after validation passed. Returns 'refused', 'ran' or 'failed cells'."""
    path = folder / "spec.json"
    path.write_text(json.dumps(spec))
    checked = invoke("validate", path)
    if checked.exit_code != 0:
        assert checked.exit_code == 2 and "$." in checked.output and "fix:" in checked.output, checked.output
        return "refused"
    out = folder / "out"
    shutil.rmtree(out, ignore_errors=True)
    result = invoke("run", path, "--out", out)  # invoke: no traceback (exceptions propagate)
    assert result.exit_code in (0, 1), (spec, result.output)
    report = json.loads((out / "report.json").read_text())
    failed = [c for c in report["cells"] if c["status"] != "done"]
    assert (result.exit_code == 1) == bool(failed), result.output
    for cell in failed:
        assert any(kind in cell["error"] for kind in NUMERIC_FAILURES), (spec, cell["error"])
    return "failed cells" if failed else "ran"


SITES = all_sites()


@st.composite
def boundary_spec(draw):
    spec = quick_spec()
    spec["evaluation"]["checks"] = {"max_samples": 8, "convergence": False,
                                    "gradient_free": {"name": "square", "options": {"n_queries": 5}}}
    spec["analysis"] = {"max_train": 8, "steps": 1}
    spec["defense"]["strengths"] = [8]
    for path, values in draw(st.lists(st.sampled_from(SITES), min_size=1, max_size=3, unique_by=lambda s: s[0])):
        put(spec, path, draw(st.sampled_from(values)))
    return spec


@pytest.mark.slow
@settings(max_examples=10, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(spec=boundary_spec())
def test_whatever_validate_accepts_at_the_schemas_boundaries_runs(spec, tmp_path):
    """Every number of the spec schema and of the named plugins' option schemas, at its bounds and at the
    classic overflow points: validate refuses it with its JSON path, or run runs it."""
    check_valid_spec_runs(spec, tmp_path)


@pytest.mark.parametrize("path, value", [
    (("seed",), 2**32), (("seed",), 2**64),  # numpy's global seed is 32-bit: a traceback after validating
    (("evaluation", "checks", "seed"), 2**64),  # torch.Generator.manual_seed: "Overflow when unpacking long long"
    (("evaluation", "checks", "gradient_free", "options", "seed"), 2**64),
    (("dataset", "options", "split_seed"), 2**32),  # scikit-learn's random_state is 32-bit
    (("dataset", "options", "test_fraction"), 1e-300), (("dataset", "options", "test_fraction"), 0.999999),
])  # a stratified split needs 10 classes on both sides
def test_the_classes_of_values_that_crashed_after_validation_are_refused_with_their_path(path, value, tmp_path):
    spec = quick_spec()
    spec["evaluation"]["checks"] = {"gradient_free": {"name": "square", "options": {}}}
    put(spec, path, value)
    assert check_valid_spec_runs(spec, tmp_path) == "refused"
    result = invoke("validate", tmp_path / "spec.json")
    assert "$." + ".".join(str(k) for k in path) in result.output.replace("\n", ""), result.output


def test_every_seed_of_every_built_in_schema_fits_32_bits():
    """numpy, scikit-learn and torchattacks take 32-bit seeds: a schema that lets a larger one through sends it to a
    traceback after minutes of work."""
    from harness import registry
    from harness.spec import SPEC_SCHEMA

    schemas = [("spec", SPEC_SCHEMA)] + [(f"{kind} {name}", registry.load(kind, name).options_schema)
                                         for kind in registry.KINDS for name in registry.discover(kind)]
    unbounded = [f"{where}: {'.'.join(map(str, path))}" for where, schema in schemas
                 for path, prop in numeric_sites(schema)
                 if "seed" in str(path[-1]) and prop.get("maximum", float("inf")) > 2**32 - 1]
    assert unbounded == []


def test_seed_option_beyond_32_bits_is_refused(write_spec, tmp_path):
    result = invoke("run", write_spec(quick_spec()), "--out", tmp_path / "out", "--seed", 2**32)
    assert result.exit_code == 2 and "--seed" in result.output and not (tmp_path / "out").exists()


@pytest.mark.parametrize("options", [
    {"train_size": 2**31 - 1},  # 3 KiB images: about 70 TiB
    {"shape": [3, 100000, 100000]},  # one image of 30 G pixels
    {"num_classes": 100000, "shape": [3, 224, 224], "train_size": 1, "test_size": 1},  # the prototypes alone: 56 GiB
])
def test_synthetic_data_that_would_not_fit_in_memory_is_refused_at_validate_time(options, tmp_path):
    """The schema bounds each option of the synthetic dataset, not the memory they take together: validate refuses
    (Synthetic.check_options) what run could only fail to allocate, with the JSON path and the estimate."""
    spec = quick_spec()
    spec["dataset"] = {"name": "synthetic", "options": options}
    assert check_valid_spec_runs(spec, tmp_path) == "refused"
    output = invoke("validate", tmp_path / "spec.json").output.replace("\n", "")
    assert "$.dataset.options: synthetic data of shape" in output and "GiB of memory, over the 8 GiB" in output


def test_synthetic_data_within_the_memory_cap_validates_and_runs(tmp_path):
    spec = quick_spec()
    spec["dataset"] = {"name": "synthetic", "options": {"shape": [1, 28, 28], "train_size": 32, "test_size": 16}}
    assert check_valid_spec_runs(spec, tmp_path) == "ran"
