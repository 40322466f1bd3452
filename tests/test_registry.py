"""Plugin discovery and loading through entry points."""

import subprocess
import sys
import textwrap

import pytest

from harness import registry
from harness.errors import BadInput


def make_distribution(root, name, version, entry_points: str, modules: dict[str, str]):
    """A real installed distribution: a .dist-info folder plus modules, on a folder that goes on sys.path."""
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))
    for module, source in modules.items():
        (root / f"{module}.py").write_text(textwrap.dedent(source))


def test_builtins_registered_in_every_group():
    assert {"lenet"} <= set(registry.discover("model"))
    assert {"digits", "synthetic"} <= set(registry.discover("dataset"))
    assert {"none", "pgd-at"} <= set(registry.discover("defense"))
    assert {"foolbox-pgd"} <= set(registry.discover("attack"))
    info = registry.discover("model")["lenet"][0]
    assert (info.distribution, info.target) == ("harness", "harness_plugins.lenet:LeNet")


def test_discovery_imports_nothing():
    code = ("import sys; from harness import registry; "
            "[registry.discover(k) for k in registry.KINDS]; "
            "print(sorted(m for m in sys.modules if m.startswith('harness_plugins') or m in ('foolbox', 'advertorch')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_unknown_name_suggests(monkeypatch):
    with pytest.raises(BadInput) as info:
        registry.load("defense", "pgd_at")
    assert "Did you mean 'pgd-at'?" in info.value.message
    assert "Available defenses:" in info.value.message


def test_plugin_failing_on_import_is_one_clear_error(tmp_path, monkeypatch):
    make_distribution(tmp_path, "acme-attacks", "2.0.1",
                      "[harness.attacks]\nacme = acme_attack_mod:Acme\n",
                      {"acme_attack_mod": "raise RuntimeError('needs libacme.so')"})
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(BadInput) as info:
        registry.load("attack", "acme")
    message = info.value.message
    assert "attack plugin 'acme'" in message and "acme-attacks 2.0.1" in message
    assert "RuntimeError: needs libacme.so" in message


def test_name_claimed_twice_is_an_error(tmp_path, monkeypatch):
    make_distribution(tmp_path, "rival", "1.0", "[harness.models]\nlenet = rival_mod:LeNet\n", {"rival_mod": ""})
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(BadInput, match="registered by several distributions"):
        registry.load("model", "lenet")


def test_load_caches_and_records_provenance():
    first = registry.load("model", "lenet")
    assert registry.load("model", "lenet") is first
    assert [(p.kind, p.name, p.distribution) for p in registry.loaded_plugins()] == [("model", "lenet", "harness")]
