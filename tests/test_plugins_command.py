"""`harness plugins NAME`: one plugin's options from its options_schema, with types, defaults and descriptions."""

import json

import pytest
from click.testing import CliRunner

from harness import registry
from harness.cli import cli


def invoke(*args):
    result = CliRunner().invoke(cli, ["plugins", *args], catch_exceptions=False)
    assert "Traceback" not in result.output
    return result


def row_of(output: str, option: str) -> list[str]:
    """The cells of the table row that starts with `option` (rich's box characters as separators)."""
    for line in output.splitlines():
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if cells and cells[0] == option:
            return cells
    raise AssertionError(f"no row for {option!r} in:\n{output}")


def test_an_attack_shows_each_option_with_type_default_and_description():
    result = invoke("autoattack")
    assert result.exit_code == 0, result.output
    assert "attack autoattack" in result.output and "harness 0.1.0" in result.output
    plugin = registry.load("attack", "autoattack")
    schema = plugin.options_schema["properties"]
    assert set(schema) == {"version", "seed"}
    version = row_of(result.output, "version")
    assert version[1] == 'one of "standard", "plus", "rand"' and version[2] == '"standard"'
    assert version[3].startswith("The reference's versions.")
    seed = row_of(result.output, "seed")
    assert seed[1] == "integer >= 0, <= 4294967295" and seed[2] == "0"
    assert seed[3].startswith("Seed of every component's random starts")


@pytest.mark.parametrize("kind,name", [("defense", "trades"), ("dataset", "digits"), ("model", "lenet")])
def test_every_option_of_a_plugin_is_listed_with_its_schema_default(kind, name):
    result = invoke(name)
    assert result.exit_code == 0, result.output
    assert f"{kind} {name}" in result.output
    properties = registry.load(kind, name).options_schema["properties"]
    assert properties
    for option, sub in properties.items():
        assert row_of(result.output, option)[2] == (json.dumps(sub["default"]) if "default" in sub else "-")


def test_a_variant_shows_its_own_schema():
    result = invoke("timm:resnet18")
    assert result.exit_code == 0, result.output
    assert "model timm:resnet18" in result.output
    assert row_of(result.output, "spectral_norm")[1:3] == ["boolean", "true"]
    assert "arch" not in [line.split("│")[1].strip() for line in result.output.splitlines() if line.count("│") > 2]


def test_unknown_name_is_exit_2_with_a_suggestion():
    result = invoke("autoatack")
    assert result.exit_code == 2
    assert "unknown plugin 'autoatack'" in result.output and "Did you mean 'autoattack'?" in result.output


def test_type_text_of_bounds_arrays_and_required():
    schema = {"type": "object", "required": ["arch"], "properties": {
        "arch": {"type": "string", "description": "the\n   architecture"},
        "p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "default": 0.8},
        "size": {"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 2, "maxItems": 2},
        "kwargs": {"type": "object"},
    }}
    assert registry.option_rows(schema) == [
        ("arch", "string", "(required)", "the architecture"),
        ("p", "number > 0, <= 1", "0.8", ""),
        ("size", "array of integer >= 1 (exactly 2)", "-", ""),
        ("kwargs", "object", "-", ""),
    ]
