"""Bad input, tried wholesale: hypothesis breaks a valid spec in generated ways and throws it at `harness validate`
(in-process, through click's CliRunner) and a handful at `harness run`. Every one must exit 2 with a message that
names the JSON path of what is wrong, and none may print a traceback."""

import copy
import json
import re

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings, strategies as st

from harness.cli import cli

from conftest import TINY_SPEC

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
                derandomize=True)

# JSON values of every kind (finite numbers: NaN and Infinity get their own mutation)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                    st.floats(allow_nan=False, allow_infinity=False, width=32), st.text(max_size=8))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                            st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                           max_leaves=6)
not_number = st.one_of(st.none(), st.booleans(), st.text(max_size=8), st.lists(scalars, max_size=2),
                       st.dictionaries(st.text(max_size=3), scalars, max_size=2))
not_string = st.one_of(st.none(), st.booleans(), st.integers(), st.lists(scalars, max_size=2),
                       st.dictionaries(st.text(max_size=3), scalars, max_size=2))
negative = st.one_of(st.integers(max_value=-1), st.floats(max_value=-1e-6, allow_nan=False, allow_infinity=False))


def positive_int_field():  # integer >= 1 (or null where allowed): a wrong type, zero/negative, or a fraction
    return st.one_of(not_number.filter(lambda v: v is not None), st.integers(max_value=0),
                     st.floats(0.01, 0.99))


# (JSON path as keys, strategy of values that are invalid there)
BAD_VALUES = [
    (["name"], st.one_of(not_string, st.sampled_from(["", "../../etc", "/abs", "a/b", "-x", "a b", "x" * 65]))),
    (["seed"], st.one_of(not_number, negative, st.floats(0.1, 0.9))),
    (["device"], st.one_of(not_string, st.text(max_size=6).filter(lambda s: s not in ("auto", "cpu", "cuda")))),
    (["dataset"], st.one_of(not_string.filter(lambda v: not isinstance(v, dict)), st.text(max_size=4))),
    (["dataset", "name"], not_string),
    (["dataset", "max_train"], positive_int_field()),
    (["dataset", "download"], st.one_of(st.none(), st.integers(), st.text(max_size=3))),
    (["models"], st.one_of(st.just([]), st.just({}), st.text(max_size=4), st.integers())),
    (["models", 0], st.one_of(scalars, st.lists(scalars, max_size=2))),
    (["models", 0, "name"], not_string),
    (["models", 0, "label"], st.one_of(not_string, st.sampled_from(["", "../up", "a/b", "/root", ".hidden", "é"]))),
    (["models", 0, "options", "spectral_norm"], st.one_of(st.none(), st.integers(), st.text(max_size=3))),
    (["defense", "strengths"], st.one_of(st.just([]), st.just([8, 8]), st.lists(negative, min_size=1, max_size=2),
                                        st.lists(st.integers(256, 10**4), min_size=1, max_size=2),
                                        not_number.filter(lambda v: not isinstance(v, list)))),
    (["defense", "strengths", 0], st.one_of(not_number, negative, st.integers(256, 10**6))),
    (["defense", "options", "steps"], positive_int_field()),
    (["defense", "options", "step_size"], st.one_of(not_number, negative, st.just(0))),
    (["training", "epochs"], st.one_of(not_number, negative, st.floats(0.1, 0.9))),
    (["training", "batch_size"], positive_int_field()),
    (["training", "lr"], st.one_of(not_number, negative, st.just(0))),
    (["training", "momentum"], st.one_of(not_number, negative, st.floats(1.01, 100))),
    (["training", "schedule"], st.one_of(scalars, st.just({"type": "multistep"}), st.just({"type": "cosine"}),
                                         st.just({"type": "step", "step_size": 0, "gamma": 0.1}))),
    (["evaluation", "batch_size"], positive_int_field()),
    (["evaluation", "attacks"], st.one_of(st.just([]), scalars)),
    (["evaluation", "attacks", 0, "eps"], st.one_of(not_number, negative, st.integers(256, 10**6))),
    (["evaluation", "attacks", 0, "options", "steps"], positive_int_field()),
]
REQUIRED = [([], k) for k in ("name", "dataset", "models", "defense", "training", "evaluation")] + [
    (["dataset"], "name"), (["models", 0], "name"), (["defense"], "name"), (["defense"], "strengths"),
    (["training"], "epochs"), (["training"], "batch_size"), (["training"], "lr"), (["evaluation"], "attacks"),
    (["evaluation", "attacks", 0], "name"), (["evaluation", "attacks", 0], "eps")]
CLOSED = [[], ["dataset"], ["models", 0], ["defense"], ["training"], ["evaluation"], ["evaluation", "attacks", 0],
          ["dataset", "options"], ["models", 0, "options"], ["defense", "options"],
          ["evaluation", "attacks", 0, "options"]]
PLUGIN_NAMES = [["dataset", "name"], ["models", 0, "name"], ["defense", "name"], ["evaluation", "attacks", 0, "name"]]
KNOWN = {"digits", "synthetic", "lenet", "none", "pgd-at", "foolbox-pgd"}


def path_of(keys):
    return "$" + "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in keys)


def container(spec, keys):
    node = spec
    for key in keys:
        node = node.setdefault(key, {}) if isinstance(node, dict) and key == "options" else node[key]
    return node


@st.composite
def mutation(draw):
    """(function that breaks a spec in place, the JSON path its error must name)."""
    kind = draw(st.sampled_from(["value", "value", "value", "missing", "unknown_key", "plugin", "non_finite"]))
    if kind == "value":
        keys, values = draw(st.sampled_from(BAD_VALUES))
        value = draw(values)
        return (lambda s: container(s, keys[:-1]).__setitem__(keys[-1], value)), path_of(keys)
    if kind == "missing":
        keys, key = draw(st.sampled_from(REQUIRED))
        return (lambda s: container(s, keys).pop(key, None)), f"{path_of(keys)}: '{key}' is a required property"
    if kind == "unknown_key":
        keys = draw(st.sampled_from(CLOSED))
        key = draw(st.text(min_size=1, max_size=10).filter(lambda k: k not in ("name", "options", "label", "root",
                   "max_train", "max_test", "download", "steps", "step_size", "random_start", "spectral_norm",
                   "test_fraction", "split_seed", "resize", "eps", "strengths", "epochs", "batch_size", "lr",
                   "momentum", "nesterov", "weight_decay", "schedule", "max_batches", "attacks", "seed", "device",
                   "description", "dataset", "models", "defense", "training", "evaluation", "$schema")))
        value = draw(json_values)
        return (lambda s: container(s, keys).__setitem__(key, value)), f"{path_of(keys)}: unknown key {key!r}"
    if kind == "plugin":
        keys = draw(st.sampled_from(PLUGIN_NAMES))
        name = draw(st.text(max_size=12).filter(lambda n: n not in KNOWN))
        return (lambda s: container(s, keys[:-1]).__setitem__("name", name)), path_of(keys)
    keys, _ = draw(st.sampled_from([b for b in BAD_VALUES if "strengths" in b[0] or b[0][-1] in ("lr", "eps")]))
    value = draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
    if keys[-1] == "strengths":
        keys = keys + [0]
    return (lambda s: container(s, keys[:-1]).__setitem__(keys[-1], value)), path_of(keys)


def broken_spec(mutations):
    spec = copy.deepcopy(TINY_SPEC)
    for apply, _ in mutations:
        try:
            apply(spec)
        except (KeyError, IndexError, TypeError, AttributeError):
            pass  # an earlier mutation removed or replaced this site; the others still break the spec
    return spec


def check_exit_2(result, expected_paths=()):
    assert "Traceback" not in result.output
    assert result.exit_code == 2, result.output
    assert re.search(r"\$(\.|\[|:)", result.output), result.output  # a JSON path
    assert "fix:" in result.output
    for expected in expected_paths:
        assert expected in result.output, (expected, result.output)


def invoke(tmp_path, *args, spec):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec), encoding="utf-8")  # json.dumps writes NaN/Infinity as Python reads them
    return CliRunner().invoke(cli, [args[0], str(path), *args[1:]], catch_exceptions=False)


@settings(max_examples=80, **SETTINGS)
@given(m=mutation())
def test_one_mutation_exits_2_naming_its_path(tmp_path, m):
    check_exit_2(invoke(tmp_path, "validate", spec=broken_spec([m])), [m[1]])


@settings(max_examples=60, **SETTINGS)
@given(ms=st.lists(mutation(), min_size=2, max_size=4))
def test_several_mutations_exit_2(tmp_path, ms):
    check_exit_2(invoke(tmp_path, "validate", spec=broken_spec(ms)))


@settings(max_examples=40, **SETTINGS)
@given(value=json_values)
def test_any_json_at_any_site_never_tracebacks(tmp_path, value):
    """Any JSON value put anywhere: valid or exit 2 with a path, never a crash."""
    for keys, _ in BAD_VALUES[::4]:
        spec = copy.deepcopy(TINY_SPEC)
        container(spec, keys[:-1])[keys[-1]] = value
        result = invoke(tmp_path, "validate", spec=spec)
        if result.exit_code != 0:
            check_exit_2(result)


@settings(max_examples=8, **SETTINGS)
@given(m=mutation())
def test_run_refuses_broken_specs_before_running(tmp_path, m):
    out = tmp_path / "out"
    check_exit_2(invoke(tmp_path, "run", "--out", str(out), spec=broken_spec([m])), [m[1]])
    assert not out.exists()


@settings(max_examples=30, **SETTINGS)
@given(data=st.binary(max_size=64))
def test_bytes_that_are_not_a_spec(tmp_path, data):
    path = tmp_path / "spec.json"
    path.write_bytes(data)
    result = CliRunner().invoke(cli, ["validate", str(path)], catch_exceptions=False)
    assert "Traceback" not in result.output and result.exit_code == 2 and "fix:" in result.output


def test_spec_path_that_is_a_folder_or_not_utf8(tmp_path):
    result = CliRunner().invoke(cli, ["validate", str(tmp_path)], catch_exceptions=False)
    assert result.exit_code == 2 and "is a folder" in result.output
    bad = tmp_path / "latin1.json"
    bad.write_bytes(json.dumps(TINY_SPEC).replace("tiny", "t\xefny").encode("latin-1"))
    result = CliRunner().invoke(cli, ["run", str(bad)], catch_exceptions=False)
    assert result.exit_code == 2 and "not UTF-8" in result.output and "Traceback" not in result.output


def test_unreadable_spec_file(tmp_path):
    import os

    path = tmp_path / "secret.json"
    path.write_text(json.dumps(TINY_SPEC))
    path.chmod(0)
    if os.access(path, os.R_OK):
        pytest.skip("running as root: permissions do not stop reads (the folder and non-UTF-8 cases cover OSError paths)")
    result = CliRunner().invoke(cli, ["validate", str(path)], catch_exceptions=False)
    assert result.exit_code == 2 and "cannot read spec file" in result.output
