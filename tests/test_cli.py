"""The command line through click's CliRunner: exit codes, messages, reports."""

import json

import pytest
from click.testing import CliRunner

from harness.cli import cli
from harness.report import validate_report


@pytest.fixture
def runner():
    return CliRunner()


def invoke(runner, *args):
    result = runner.invoke(cli, list(args), catch_exceptions=False)
    assert "Traceback" not in result.output
    return result


def test_good_spec_runs_and_writes_a_valid_report(runner, write_spec, tiny_spec, tmp_path):
    out = tmp_path / "out"
    result = invoke(runner, "run", str(write_spec(tiny_spec)), "--out", str(out))
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    validate_report(report)
    assert [c["strength"] for c in report["cells"]] == [0, 32]
    for cell in report["cells"]:
        m = cell["metrics"]
        assert cell["status"] == "done" and 0 <= m["pgd_acc"] <= m["clean_acc"] <= 100
        assert m["ge"] == pytest.approx(m["test_loss"] - m["train_loss"])
        assert (out / "cells" / f"{cell['id']}.json").exists()
    env = report["environment"]
    assert env["device"] == "cpu" and env["torch"]
    assert {(p["kind"], p["name"]) for p in env["plugins"]} == {
        ("dataset", "digits"), ("model", "lenet"), ("defense", "pgd-at"), ("attack", "foolbox-pgd"),
        ("attack", "square")}  # square: the gradient-masking check (evaluation.checks.gradient_free)
    assert report["spec"]["training"]["momentum"] == 0.9  # the resolved spec, defaults included
    # the paper's layout: a block per model, rows Acc. / GE / PGD, a column per strength
    for row in ("Acc.", "GE", "PGD"):
        assert row in result.output
    assert "│ lenet" in result.output and "32" in result.output


def test_bad_spec_exits_2_with_json_path(runner, write_spec, tiny_spec, tmp_path):
    tiny_spec["defense"]["strengths"] = [0, 8, -4]
    result = invoke(runner, "run", str(write_spec(tiny_spec)), "--out", str(tmp_path / "out"))
    assert result.exit_code == 2
    assert "$.defense.strengths[2]: -4 is less than the minimum of 0" in result.output
    assert not (tmp_path / "out").exists(), "nothing may run for an invalid spec"


@pytest.mark.parametrize("content, expected", [
    ("{not json", "not valid JSON"),
    ('{"name": "x"}', "'dataset' is a required property"),
])
def test_validate_bad_files(runner, write_spec, content, expected):
    result = invoke(runner, "validate", str(write_spec(content)))
    assert result.exit_code == 2
    assert expected in result.output and "fix:" in result.output


def test_validate_missing_file(runner, tmp_path):
    result = invoke(runner, "validate", str(tmp_path / "missing.json"))
    assert result.exit_code == 2 and "spec file not found" in result.output


def test_validate_good_spec_lists_cells(runner, write_spec, tiny_spec):
    result = invoke(runner, "validate", str(write_spec(tiny_spec)))
    assert result.exit_code == 0
    assert "lenet__s0" in result.output and "lenet__s32" in result.output


def test_unknown_plugin_exit_2(runner, write_spec, tiny_spec):
    tiny_spec["defense"]["name"] = "pgd"
    result = invoke(runner, "validate", str(write_spec(tiny_spec)))
    assert result.exit_code == 2
    assert "unknown defense 'pgd'" in result.output and "pgd-at" in result.output


def test_failed_cell_exits_1_and_keeps_the_others(runner, write_spec, tiny_spec, tmp_path):
    tiny_spec["training"]["lr"] = 1e30  # blows up the adversarially trained cell, not necessarily the clean one
    tiny_spec["defense"]["strengths"] = [32]
    result = invoke(runner, "run", str(write_spec(tiny_spec)), "--out", str(tmp_path / "out"))
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    validate_report(report)
    failed = [c for c in report["cells"] if c["status"] == "failed"]
    assert failed and "became" in failed[0]["error"]
    assert result.exit_code == 1


def test_plugins_lists_groups_and_providers(runner):
    result = invoke(runner, "plugins")
    assert result.exit_code == 0
    for group in ("harness.models", "harness.datasets", "harness.defenses", "harness.attacks"):
        assert group in result.output
    assert "harness 0.1.0" in result.output


@pytest.mark.parametrize("command", [[], ["run"], ["validate"], ["plugins"]])
def test_help_everywhere(runner, command):
    result = invoke(runner, *command, "--help")
    assert result.exit_code == 0 and "Usage:" in result.output


def test_usage_error_is_exit_2(runner):
    assert invoke(runner, "run").exit_code == 2


def _non_default_arguments(command):
    """Command-line words giving every parameter of `command` a value other than its default (options with
    multiple=True twice), chosen from each parameter's type, so that an option added later is covered too."""
    import click

    def value(param):
        kind = param.type
        if isinstance(kind, click.Tuple):
            return [value_of(t) for t in kind.types]
        return [value_of(kind)]

    def value_of(kind):
        if isinstance(kind, click.Choice):
            return kind.choices[-1]
        if isinstance(kind, click.types.IntParamType):
            return "7"
        if isinstance(kind, click.types.FloatParamType):
            return "0.5"
        return "some dir/with 'quotes'"

    words = []
    for param in command.params:
        if isinstance(param, click.Argument):
            words += value(param)
        elif param.is_flag:
            words.append(param.opts[-1])
        else:
            for _ in range(2 if param.multiple else 1):
                words += [param.opts[-1], *value(param)]
    return words


@pytest.mark.parametrize("name", ["run", "eval"])
def test_the_resume_hint_repeats_every_parameter_given_but_fresh(name):
    """The hint printed on SIGINT/SIGTERM is built from the command's own parameter list: parsed again, it gives
    the same parameters as the interrupted command (for every option the command has, including ones added
    later), except --fresh (it would start over) and the output folder (always the one actually used)."""
    import shlex

    from harness.cli import rerun_command

    command = cli.commands[name]
    given = command.make_context(name, _non_default_arguments(command))
    again = rerun_command(given, drop=("fresh",), replace={"out_dir": "/the/out dir"})
    assert again[:2] == ["harness", name]
    assert shlex.split(shlex.join(again)) == again
    parsed = command.make_context(name, again[2:])
    expected = dict(given.params, out_dir="/the/out dir")
    if "fresh" in expected:
        assert given.params["fresh"] is True
        expected["fresh"] = False
    assert {k: str(v) if k == "out_dir" else v for k, v in parsed.params.items()} == expected
