"""A third party adds a defense from its own package, without touching this repository.

tests/plugin_pkg is a separate distribution (its own pyproject.toml) registering a defense in `harness.defenses`
and a model that fails on import in `harness.models`. It is built and installed with pip into a folder that goes
on the subprocess's PYTHONPATH: the same discovery path (importlib.metadata over sys.path) as an install into
site-packages, without leaving it in the developer's virtual environment after the test.
"""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(REPO / "tests" / "plugin_pkg")], check=True)
    env = dict(os.environ, PYTHONPATH=str(target), GIT_PYTHON_REFRESH="quiet")
    return env


def harness(env, *args, cwd):
    return subprocess.run([sys.executable, "-m", "harness", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_third_party_defense_runs_through_a_spec(plugin_env, tiny_spec, tmp_path):
    tiny_spec["defense"] = {"name": "gaussian-noise", "strengths": [0, 16], "options": {"sigma_ratio": 0.25}}
    (tmp_path / "spec.json").write_text(json.dumps(tiny_spec))
    done = harness(plugin_env, "run", "spec.json", "--out", "out", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [c["defense"] for c in report["cells"]] == ["gaussian-noise", "gaussian-noise"]
    assert all(c["status"] == "done" for c in report["cells"])
    provenance = {p["name"]: (p["distribution"], p["version"]) for p in report["environment"]["plugins"]}
    assert provenance["gaussian-noise"] == ("harness-extra-defense", "0.3.1")


def test_third_party_options_are_validated(plugin_env, tiny_spec, tmp_path):
    tiny_spec["defense"] = {"name": "gaussian-noise", "strengths": [8], "options": {"sigma": 1}}
    (tmp_path / "spec.json").write_text(json.dumps(tiny_spec))
    done = harness(plugin_env, "validate", "spec.json", cwd=tmp_path)
    assert done.returncode == 2
    assert "$.defense.options: unknown key 'sigma'" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_broken_third_party_plugin_is_named(plugin_env, tiny_spec, tmp_path):
    listing = harness(plugin_env, "plugins", cwd=tmp_path)
    assert listing.returncode == 0
    assert "harness-extra-defense 0.3.1" in listing.stdout and "gaussian-noise" in listing.stdout
    tiny_spec["models"] = [{"name": "broken-net"}]
    (tmp_path / "spec.json").write_text(json.dumps(tiny_spec))
    done = harness(plugin_env, "run", "spec.json", cwd=tmp_path)
    assert done.returncode == 2
    assert "model plugin 'broken-net'" in done.stderr and "harness-extra-defense 0.3.1" in done.stderr
    assert "incompatible CUDA toolkit" in done.stderr and "Traceback" not in done.stderr
