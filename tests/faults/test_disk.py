"""Fault injection, disks (issue 12: 5): a read-only --out, a disk that fills up mid-run, a write refused.

A read-only --out is refused before anything trains (exit 2). A write that fails later (no space left, read-only,
permission denied) is exit 1 with a message, never a traceback: which file, how many bytes it needed, and the
cell's last good checkpoint, which stays intact (writes are atomic); once space is back, the same command
resumes and ends with the report an uninterrupted run gives.

Real file systems where the machine lets us mount a small tmpfs (root on Linux); simulated OSErrors
(monkeypatched os.replace, in-process through the CLI) everywhere.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import TINY_SPEC, finished_run, invoke, without_timings

CELL = "lenet__s0"


def disk_spec() -> dict:
    spec = copy.deepcopy(TINY_SPEC)
    spec["dataset"].update(max_train=32, max_test=16)
    spec["defense"]["strengths"] = [0]
    spec["training"].update(epochs=2, batch_size=16, max_batches=1)
    spec["evaluation"]["checks"] = {"enabled": False}
    spec["analysis"] = {"enabled": False}
    return spec


def flat(text: str) -> str:
    return text.replace("\n", "")  # rich folds long paths at 80 columns


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted run of disk_spec: (its report, the size of its checkpoint)."""
    out = finished_run(tmp_path_factory.mktemp("straight"), disk_spec())
    return json.loads((out / "report.json").read_text()), (out / "checkpoints" / f"{CELL}.pt").stat().st_size


@pytest.fixture
def tmpfs():
    """mount(path, size, read_only=False): a tmpfs of `size` bytes at path; skips where mounting is not allowed."""
    mounted = []

    def mount(path, size, read_only=False):
        if sys.platform != "linux" or shutil.which("mount") is None:
            pytest.skip("needs Linux's mount to make a small file system")
        path.mkdir(parents=True, exist_ok=True)
        options = f"size={size}" + (",ro" if read_only else "")
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode}); the simulated "
                        "disk errors below still run")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def no_temp_files(folder) -> bool:
    return not [p for p in folder.rglob("*.tmp")]


def test_a_read_only_out_is_refused_before_anything_trains(tmpfs, write_spec, tmp_path):
    spec = write_spec(disk_spec())
    read_only = tmpfs(tmp_path / "ro", 1 << 20, read_only=True)
    for out in (read_only, read_only / "sub"):
        result = invoke("run", spec, "--out", out)
        assert result.exit_code == 2, result.output
        assert f"--out {out} cannot be written: the file system is read-only" in flat(result.output)
        assert "fix: choose a writable folder for --out" in result.output
        assert "cell lenet__s0" not in result.output, "nothing ran"


def test_a_disk_that_fills_up_mid_training_keeps_the_last_checkpoint_and_resumes(tmpfs, straight, write_spec,
                                                                                   tmp_path):
    """A tmpfs of 1.5 checkpoints: epoch 1's checkpoint fits, epoch 2's temporary file (written beside it before the
    rename) does not. The run stops with exit 1 naming epoch 1's checkpoint; with space back, it resumes."""
    report, ckpt_size = straight
    spec = write_spec(disk_spec())
    out = tmpfs(tmp_path / "small", ckpt_size * 3 // 2)
    result = invoke("run", spec, "--out", out)
    assert result.exit_code == 1, result.output
    text = flat(result.output)
    ckpt = out / "checkpoints" / f"{CELL}.pt"
    assert f"error: no space left on the device of {out / 'checkpoints'} (writing {CELL}.pt); " in text
    needed = int(text.split(f"(writing {CELL}.pt); ")[1].split(" bytes needed")[0])
    assert abs(needed - ckpt_size) < 1024, (needed, ckpt_size)  # the whole file's size, not what fitted
    assert f"the last good checkpoint is {ckpt} (cell {CELL}, epoch 1, step 0): the same command resumes from it" \
           in text
    assert "fix: free some space" in text
    assert no_temp_files(out)

    subprocess.run(["mount", "-o", f"remount,size={ckpt_size * 8}", str(out)], check=True)  # space is back
    result = invoke("run", spec, "--out", out)
    assert result.exit_code == 0, result.output
    resumed = json.loads((out / "report.json").read_text())
    assert resumed["cells"][0]["resumed_from"] == {"epoch": 1, "step": 0}
    assert without_timings(resumed["cells"]) == without_timings(report["cells"])


@pytest.fixture
def refuse(monkeypatch):
    """refuse(name, err): os.replace raises OSError(err) when it would put a file called `name` in place, as it
    does on a full (ENOSPC), read-only (EROFS) or forbidden (EACCES) file system; every other write goes through
    (refuse(None, 0): every write goes through)."""
    real = os.replace
    refused = []

    def install(name, err):
        def replace(src, dst, *args, **kwargs):
            if os.path.basename(dst) == name:
                refused.append(dst)
                raise OSError(err, os.strerror(err), str(dst))
            return real(src, dst, *args, **kwargs)

        monkeypatch.setattr(os, "replace", replace)
        return refused

    yield install


def test_no_space_for_a_cell_result_keeps_its_trained_checkpoint_and_resumes_by_re_evaluating(
        refuse, straight, write_spec, tmp_path):
    report, _ = straight
    spec, out = write_spec(disk_spec()), tmp_path / "out"
    refused = refuse(f"{CELL}.json", errno.ENOSPC)
    result = invoke("run", spec, "--out", out)
    assert refused and result.exit_code == 1, result.output
    text = flat(result.output)
    size = len(json.dumps(report["cells"][0], indent=2))  # about what the cell file holds
    assert f"no space left on the device of {out / 'cells'} (writing {CELL}.json); " in text
    needed = int(text.split(f"(writing {CELL}.json); ")[1].split(" bytes needed")[0])
    assert 0.5 * size < needed < 2 * size, (needed, size)
    assert f"the last good checkpoint is {out / 'checkpoints' / (CELL + '.pt')} (cell {CELL}, epoch 2, step 0)" in text
    assert not (out / "cells" / f"{CELL}.json").exists() and no_temp_files(out)

    refuse(None, 0)  # space is back
    result = invoke("run", spec, "--out", out)
    assert result.exit_code == 0, result.output
    resumed = json.loads((out / "report.json").read_text())
    assert resumed["cells"][0]["resumed_from"] == {"epoch": 2, "step": 0}, "re-evaluated, not retrained"
    assert without_timings(resumed["cells"]) == without_timings(report["cells"])


def test_a_checkpoint_refused_mid_training_and_a_figure_on_a_read_only_disk_are_clear_errors(
        refuse, write_spec, tmp_path):
    spec, out = write_spec(disk_spec()), tmp_path / "out"
    refuse(f"{CELL}.pt", errno.EACCES)
    result = invoke("run", spec, "--out", out)
    assert result.exit_code == 1, result.output
    text = flat(result.output)
    assert f"cannot write {out / 'checkpoints' / (CELL + '.pt')}: permission denied; cell {CELL} has no checkpoint " \
           "yet" in text
    assert "fix: make the folder writable" in text and no_temp_files(out)

    refuse("fig2_ge.png", errno.EROFS)
    result = invoke("run", spec, "--out", out)
    assert result.exit_code == 1, result.output
    assert f"cannot write {out / 'fig2_ge.png'}: the file system is read-only" in flat(result.output)
    report = json.loads((out / "report.json").read_text())  # written before the figures
    assert [c["status"] for c in report["cells"]] == ["done"] and no_temp_files(out)
