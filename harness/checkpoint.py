"""Checkpoints of one cell's training: what is saved, how it is written and read, and when resuming is allowed.

A checkpoint (OUT/checkpoints/<cell id>.pt) holds everything that decides the rest of the run: the model's
state_dict (spectral-norm `_u`/`_v` power-iteration vectors included: they are buffers), the optimizer's and the
scheduler's state, the history so far, and every random-number state: Python's `random`, numpy's global
generator, torch's CPU generator (advertorch's random start and the initialisation draw from it), every CUDA
device's generator, and the `torch.Generator` that `train()` shuffles (and augments) the data with.

Position: `epoch` epochs are complete and `step` steps of the next one (0 at an epoch boundary, more when a
signal stopped training mid-epoch). The data generator's state at the start of that epoch is kept as well, so a
resume regenerates the epoch's permutation, replays its first `step` batches without training on them (that
consumes the data generator exactly as the interrupted run did, augmentation included) and continues from step
`step + 1`: resumed runs end bit-identical to uninterrupted ones on CPU.

Writes go to a temporary file in the same folder, fsync'ed, then renamed into place (os.replace is atomic on
POSIX and Windows): a crash leaves either the previous checkpoint or the new one, never half a file. Reads use
`torch.load(weights_only=True)`: a checkpoint can hold tensors and plain containers, never code.

Resuming is allowed only while the *training-relevant* part of the spec is unchanged (`training_view`): the
seed, the dataset entry (without `download`, which does not change the data), the cell's model entry, the
defense's name and options and the cell's strength, the whole `training` block, and the training precision and
TF32 as resolved for the cell on this device (harness.performance.Performance.training_view: `precision: auto`
is bf16 on one machine and fp32 on another). The evaluation block (with evaluation's TF32 setting,
`evaluation_view`), the rest of `performance`, the device, `name` and `description` are not in it: changing
the attacks re-evaluates a trained cell without retraining it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from harness.errors import BadInput
from harness.paths import REPORT_MAX_BYTES, inside, read_regular, require_regular, write_atomic

FORMAT = 1
REQUIRED = ("format", "cell", "fingerprint", "spec", "epoch", "step", "history", "model", "optimizer", "scheduler",
            "rng", "order_epoch_start", "partial")


# ------------------------------------------------------------------------------------- what "the same run" means


def training_view(spec: dict, model_entry: dict, strength: float, performance: dict) -> dict:
    """The part of a resolved spec that decides a cell's training; a checkpoint is only resumed under the same.

    `performance` is the cell's resolved precision and TF32 (harness.performance.Performance.training_view, after
    `for_model`): they change the trained weights, so a change shows as `performance.precision: "fp32" -> "bf16"`."""
    return {
        "seed": spec["seed"],
        "dataset": {k: v for k, v in spec["dataset"].items() if k != "download"},
        "model": model_entry,
        "defense": {"name": spec["defense"]["name"], "options": spec["defense"]["options"], "strength": strength},
        "training": spec["training"],
        "performance": performance,
    }


def evaluation_view(spec: dict, eval_tf32: bool) -> dict:
    """What decides a trained cell's metrics: the evaluation block and whether evaluation ran with TF32
    (harness.performance.Performance.evaluation_tf32); a finished cell is kept only under the same."""
    return {**spec["evaluation"], "tf32": eval_tf32}


def fingerprint(document: Any) -> str:
    """sha256 of canonical JSON (sorted keys; 1 and 1.0 compare as JSON numbers, as the spec means them)."""
    canonical = json.dumps(_normalize(document), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _normalize(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _normalize(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_normalize(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


_ABSENT = object()


def diff(old: Any, new: Any, path: str = "") -> list[str]:
    """Changed leaves between two JSON documents, as `path: old -> new` (`training.lr: 0.1 -> 0.05`)."""
    old, new = _normalize(old), _normalize(new)
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in list(old) + [k for k in new if k not in old]:
            out += diff(old.get(key, _ABSENT), new.get(key, _ABSENT), f"{path}.{key}" if path else key)
        return out
    if old == new:
        return []
    return [f"{path or '$'}: {_show(old)} -> {_show(new)}"]


def _show(value: Any) -> str:
    return "(absent)" if value is _ABSENT else json.dumps(value)


# ------------------------------------------------------------------------------------- random-number states


def capture_rng(order: torch.Generator) -> dict:
    """Every RNG state a cell's training draws from, as tensors and plain containers (safe for weights_only)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "order": order.get_state(),
    }


def restore_global_rng(rng: dict) -> None:
    """Restore Python's, numpy's, torch's CPU and (when the same devices exist) CUDA generators."""
    random.setstate(rng["python"])
    n = rng["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])


# ------------------------------------------------------------------------------------- training state


def training_state(model, optimizer, scheduler, order, epoch, step, history, order_epoch_start, partial=None) -> dict:
    """Everything train() needs to continue after `epoch` complete epochs and `step` steps of the next one."""
    return {
        "format": FORMAT, "epoch": epoch, "step": step, "history": copy.deepcopy(history),
        "partial": partial or {"total": 0.0, "seen": 0, "seconds": 0.0},
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "rng": capture_rng(order), "order_epoch_start": order_epoch_start,
    }


def resume_training(state, model, optimizer, scheduler, order) -> tuple[list[dict], int, int]:
    """Load a training state; return (history, first epoch to run, steps of it already done)."""
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise BadInput(f"the checkpoint does not fit this model: {str(exc).strip().splitlines()[0][:300]}",
                       fix="run again with --fresh (the checkpoint was written for another model)") from exc
    scheduler.load_state_dict(state["scheduler"])
    if state["step"]:
        # The saved run did step this optimizer; torch's scheduler would warn "lr_scheduler.step() before
        # optimizer.step()" when a resume replays a whole first epoch. The flag is the one its check reads.
        optimizer._opt_called = True
    restore_global_rng(state["rng"])
    # mid-epoch, the epoch's permutation is drawn again from its start state and its first `step` batches replayed
    order.set_state(state["order_epoch_start"] if state["step"] else state["rng"]["order"])
    return copy.deepcopy(state["history"]), state["epoch"] + 1, state["step"]


# ------------------------------------------------------------------------------------- files


def save(path: Path, state: dict) -> None:
    """torch.save atomically (harness.paths.write_atomic): a crash mid-write never damages the last checkpoint."""
    write_atomic(path, lambda fh: torch.save(state, fh))


def load(path: Path, *, mmap: bool = False) -> dict:
    """Read a checkpoint (tensors and plain containers only); a damaged or foreign file is a BadInput naming it.

    `mmap=True` maps the tensors instead of reading them: checking a large checkpoint's fingerprint costs little."""
    fix = f"delete {path} (that cell then starts over) or run again with --fresh"
    require_regular(path, "checkpoint", fix=fix)  # torch.load of a FIFO would block forever
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # truncated zip, not a torch file, a pickle with code in it: all "cannot use this"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise BadInput(f"checkpoint {path} cannot be read: {type(exc).__name__}: {reason[:300]}", fix=fix) from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT or any(k not in state for k in REQUIRED):
        missing = [k for k in REQUIRED if not isinstance(state, dict) or k not in state]
        raise BadInput(f"checkpoint {path} is not a harness checkpoint of format {FORMAT}"
                       + (f" (missing {', '.join(missing)})" if missing else ""), fix=fix)
    return state


def mismatch(state: dict, view: dict) -> list[str]:
    """Why `state` may not be resumed under the training view `view` (empty when it may)."""
    if state["fingerprint"] == fingerprint(view):
        return []
    return diff(state["spec"], view) or ["training-relevant settings differ (fingerprints differ)"]


# ------------------------------------------------------------------------------------- what to do with each cell


def cell_paths(out_dir: Path, cell_id: str) -> tuple[Path, Path]:
    """(OUT/cells/<id>.json, OUT/checkpoints/<id>.pt), both checked to stay inside OUT."""
    return (inside(out_dir / "cells", cell_id + ".json", where=f"cell {cell_id!r}"),
            inside(out_dir / "checkpoints", cell_id + ".pt", where=f"cell {cell_id!r}"))


def read_result(result_path: Path) -> Any:
    """A cell file's JSON, or None when it is absent or not JSON (it is written atomically, so never half-written by
    us). Anything but a regular file there (a FIFO would block the read forever) is BadInput naming it."""
    if not result_path.exists() and not result_path.is_symlink():
        return None
    try:
        data = read_regular(result_path, "cell", REPORT_MAX_BYTES,
                            fix=f"remove {result_path} (that cell is then evaluated again)")
        return json.loads(data.decode("utf-8"))
    except ValueError:
        return None


def finished_result(result_path: Path, view: dict, evaluation: dict) -> dict | None:
    """The cell's stored result when it is done under the same training view and evaluation, else None."""
    result = read_result(result_path)
    if result is None:
        return None
    fp = result.get("fingerprint") if isinstance(result, dict) else None
    if (result.get("status") == "done" and isinstance(fp, dict) and fp.get("training") == fingerprint(view)
            and fp.get("evaluation") == fingerprint(evaluation)):
        return result
    return None


def plan_resume(spec: dict, cells: list, out_dir: Path, *, fresh: bool, force: bool,
                performance: Mapping[str, Any]) -> dict[str, str]:
    """For each cell id: 'skip' (finished under this spec), 'resume' (a usable checkpoint) or 'start'.

    `performance` maps each cell id to its resolved harness.performance.Performance (after `for_model`).
    --fresh deletes the cells' results and checkpoints first. A checkpoint written under another training view is
    refused (BadInput listing every changed field of every cell) unless `force`; an unreadable one always is.
    Nothing is trained before this check has passed for every cell.
    """
    decisions, refused = {}, []
    for cell in cells:
        result_path, ckpt_path = cell_paths(out_dir, cell.id)
        if fresh:
            result_path.unlink(missing_ok=True)
            ckpt_path.unlink(missing_ok=True)
            decisions[cell.id] = "start"
            continue
        cell_performance = performance[cell.id]
        view = training_view(spec, cell.model, cell.strength, cell_performance.training_view())
        if finished_result(result_path, view, evaluation_view(spec, cell_performance.evaluation_tf32)) is not None:
            decisions[cell.id] = "skip"
            continue
        if not ckpt_path.exists():
            decisions[cell.id] = "start"
            continue
        changed = mismatch(load(ckpt_path, mmap=True), view)
        if changed and not force:
            refused.append(f"cell {cell.id} ({ckpt_path}):\n    " + "\n    ".join(changed))
        decisions[cell.id] = "resume"
    if refused:
        raise BadInput("the training-relevant part of the spec changed since these checkpoints were written; "
                       "resuming would mix two experiments:\n  " + "\n  ".join(refused),
                       fix="run again with --fresh to start these cells over, or with --force to resume from the "
                       "checkpoints anyway (their model, optimizer and scheduler state are kept as saved, the "
                       "learning rate included)")
    return decisions
