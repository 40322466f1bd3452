"""Fault injection, special files (issue 12: 4): a FIFO or a device file where harness expects a regular file.

Reading a FIFO blocks until someone writes to it (forever, in a batch job); reading /dev/zero never ends. harness
reads only regular files (harness.paths.read_regular / require_regular), and specs and reports only up to a size
cap: anything else is exit 2 with a message naming the file and what it is, without a traceback.

A regression must fail these tests, not hang the suite: every FIFO a test creates is unblocked by a watchdog
after a minute (it writes garbage into it), and /dev/zero is read in a subprocess with a memory limit.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import threading
import time

import pytest

from harness.paths import SPEC_MAX_BYTES

from conftest import REPO, TINY_SPEC, invoke

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are POSIX")


@pytest.fixture
def fifo(tmp_path):
    """make(path): a FIFO at path. After 60 s a watchdog writes into every one that a reader opens, so that code
    that wrongly opens one fails on what it reads instead of blocking the test run forever."""
    made, done = [], threading.Event()

    def make(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(path)
        made.append(path)
        return path

    def watchdog():
        if done.wait(60):
            return
        while not done.wait(0.5):
            for path in list(made):
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)  # fails (ENXIO) unless a reader has it open
                except OSError:
                    continue
                os.write(fd, b"not json, from the watchdog")
                os.close(fd)

    thread = threading.Thread(target=watchdog, daemon=True)
    thread.start()
    yield make
    done.set()


def small_spec() -> dict:
    spec = copy.deepcopy(TINY_SPEC)
    spec["dataset"].update(max_train=32, max_test=16)
    spec["defense"]["strengths"] = [0]
    spec["training"].update(batch_size=16, max_batches=1)
    spec["evaluation"]["checks"] = {"enabled": False}
    spec["analysis"] = {"enabled": False}
    return spec


def exit_2_naming(result, *words):
    assert "Traceback" not in result.output
    assert result.exit_code == 2, result.output
    text = result.output.replace("\n", "")  # rich folds long paths at 80 columns
    for word in words:
        assert word in text, (word, result.output)


def test_a_fifo_given_as_the_spec_is_refused_without_reading_it(fifo, tmp_path):
    path = fifo(tmp_path / "spec.json")
    exit_2_naming(invoke("validate", path), f"spec file {path} is a FIFO (named pipe), not a regular file")
    exit_2_naming(invoke("run", path, "--out", tmp_path / "out"), "is a FIFO")
    assert not (tmp_path / "out").exists()


def test_a_device_file_given_as_the_spec_is_refused_without_reading_it(tmp_path):
    """In a subprocess limited to 6 GB of address space: reading /dev/zero to its end would otherwise fill the
    machine's memory."""
    def limit():
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (6 * 2**30, 6 * 2**30))

    env = dict(os.environ, GIT_PYTHON_REFRESH="quiet", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "harness", "validate", "/dev/zero"], capture_output=True, text=True,
                          env=env, timeout=300, preexec_fn=limit if sys.platform.startswith("linux") else None)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "spec file /dev/zero is a character device, not a regular file" in proc.stderr.replace("\n", "")
    assert "Traceback" not in proc.stdout + proc.stderr


def test_a_spec_larger_than_the_cap_is_refused(write_spec, tmp_path):
    text = json.dumps(small_spec())
    path = write_spec(text + " " * (SPEC_MAX_BYTES + 1 - len(text)))  # valid JSON, one byte too many
    exit_2_naming(invoke("validate", path), f"spec file {path} is larger than {SPEC_MAX_BYTES} bytes")


def test_fifos_in_the_output_folder_are_refused_naming_them(fifo, write_spec, tmp_path):
    """Where a cell result, a checkpoint or a report is expected in --out: exit 2 before anything trains."""
    spec = write_spec(small_spec())
    out = tmp_path / "out"

    cell = fifo(out / "cells" / "lenet__s0.json")
    exit_2_naming(invoke("run", spec, "--out", out), f"cell file {cell} is a FIFO (named pipe), not a regular file",
                  f"fix: remove {cell}")
    assert not (out / "checkpoints").exists(), "refused before training"
    cell.unlink()

    ckpt = fifo(out / "checkpoints" / "lenet__s0.pt")
    exit_2_naming(invoke("run", spec, "--out", out), f"checkpoint {ckpt} is a FIFO (named pipe), not a regular file",
                  f"delete {ckpt}")
    ckpt.unlink()

    report = fifo(out / "report.json")
    exit_2_naming(invoke("report", out), f"report file {report} is a FIFO (named pipe), not a regular file")


def test_a_fifo_given_as_weights_is_refused(fifo, write_spec, tmp_path):
    weights = fifo(tmp_path / "weights.pt")
    started = time.monotonic()
    exit_2_naming(invoke("eval", write_spec(small_spec()), "--weights", weights, "--out", tmp_path / "out"),
                  f"checkpoint {weights} is a FIFO (named pipe), not a regular file")
    assert time.monotonic() - started < 60, "refused, not unblocked by the watchdog"
