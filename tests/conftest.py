"""Shared fixtures: tiny real specs (CPU, seconds) and a clean plugin cache per test."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch

from click.testing import CliRunner

from harness import registry
from harness.cli import cli

os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
# One intra-op thread: tests use tiny models, for which two threads on a 2-core machine (often shared with other
# work) only spin against each other (measured up to 10x slower); every test module inherits this.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]

TINY_SPEC = {
    "name": "tiny",
    "seed": 0,
    "device": "cpu",
    "dataset": {"name": "digits", "max_train": 256, "max_test": 64},
    "models": [{"name": "lenet", "options": {"spectral_norm": True}}],
    "defense": {"name": "pgd-at", "strengths": [0, 32], "options": {"steps": 2, "step_size": 16}},
    "training": {"epochs": 1, "batch_size": 64, "lr": 0.1},
    "evaluation": {"batch_size": 128, "attacks": [{"name": "foolbox-pgd", "eps": 32, "options": {"steps": 2, "step_size": 16}}]},
}


@pytest.fixture
def tiny_spec() -> dict:
    return copy.deepcopy(TINY_SPEC)


@pytest.fixture
def write_spec(tmp_path):
    def write(spec, name: str = "spec.json") -> Path:
        path = tmp_path / name
        path.write_text(spec if isinstance(spec, str) else json.dumps(spec))
        return path

    return write


@pytest.fixture(autouse=True)
def fresh_plugin_cache():
    registry._LOADED.clear()
    yield
    registry._LOADED.clear()


def invoke(*args):
    """Run the CLI in-process as a user would; bad input must never reach the user as a traceback."""
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert "Traceback" not in result.output
    return result
