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

from harness import integrity
from harness.errors import BadInput
from harness.paths import inside, require_regular, write_atomic

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
    """torch.save atomically (harness.paths.write_atomic): a crash mid-write never damages the last checkpoint.
    The state is saved with its content checksum (harness.integrity), which `load` verifies."""
    sealed = {**state, integrity.KEY: integrity.state_checksum(state)}
    write_atomic(path, lambda fh: torch.save(sealed, fh))


def load(path: Path, *, mmap: bool = False) -> dict:
    """Read a checkpoint (tensors and plain containers only). A file torch cannot read, or whose content does not
    match its checksum (harness.integrity), is damaged: BadInput naming it. One that reads but is not a checkpoint
    of this harness (a list, a string, a field of the wrong type) raises integrity.Unusable: treat it as missing.
    A checkpoint without a checksum (written before checksums) is used when it is otherwise valid.

    `mmap=True` maps the tensors instead of reading them (the checksum still reads every byte once)."""
    fix = f"delete {path} (that cell then starts over) or run again with --fresh"
    require_regular(path, "checkpoint", fix=fix)  # torch.load of a FIFO would block forever
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # truncated zip, not a torch file, a pickle with code in it: all "cannot use this"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise BadInput(f"checkpoint {path} cannot be read: {type(exc).__name__}: {reason[:300]}", fix=fix) from exc
    if not isinstance(state, dict):
        raise integrity.Unusable(path, f"it holds a {type(state).__name__}, not a checkpoint")
    integrity.verify(state, integrity.state_checksum(state), path, "checkpoint", "trained again from the start")
    problem = _invalid(state)
    if problem:
        raise integrity.Unusable(path, f"it is not a harness checkpoint of format {FORMAT}: {problem}")
    return state


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# What each field of a checkpoint must be (checked on load: a field of another type would crash mid-resume).
_FIELDS = {
    "format": (lambda v: v == FORMAT and _is_int(v), f"the number {FORMAT}"),
    "cell": (lambda v: isinstance(v, str), "a string"),
    "fingerprint": (lambda v: isinstance(v, str), "a string"),
    "spec": (lambda v: isinstance(v, dict), "a dict"),
    "epoch": (_is_int, "an integer >= 0"),
    "step": (_is_int, "an integer >= 0"),
    "history": (lambda v: isinstance(v, list) and all(isinstance(h, dict) for h in v), "a list of dicts"),
    "model": (lambda v: isinstance(v, dict) and all(isinstance(k, str) and isinstance(t, torch.Tensor)
                                                    for k, t in v.items()), "a dict of tensors"),
    "optimizer": (lambda v: isinstance(v, dict) and isinstance(v.get("state"), dict)
                  and isinstance(v.get("param_groups"), list), "an optimizer state_dict"),
    "scheduler": (lambda v: isinstance(v, dict), "a scheduler state_dict"),
    "rng": (lambda v: isinstance(v, dict) and isinstance(v.get("python"), (tuple, list))
            and isinstance(v.get("numpy"), dict) and isinstance(v["numpy"].get("keys"), torch.Tensor)
            and isinstance(v.get("torch"), torch.Tensor) and isinstance(v.get("cuda"), (list, tuple))
            and isinstance(v.get("order"), torch.Tensor), "the random-number states (capture_rng)"),
    "order_epoch_start": (lambda v: isinstance(v, torch.Tensor), "a generator state (a tensor)"),
    "partial": (lambda v: isinstance(v, dict) and _is_number(v.get("total")) and _is_int(v.get("seen"))
                and _is_number(v.get("seconds")), "a dict of total, seen and seconds"),
}


def _invalid(state: dict) -> str | None:
    """What is wrong with a loaded checkpoint's fields (None when nothing is)."""
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        return f"missing {', '.join(missing)}"
    for key, (valid, expected) in _FIELDS.items():
        if not valid(state[key]):
            value = state[key]
            shown = type(value).__name__ if isinstance(value, (dict, list, torch.Tensor)) else repr(value)
            return f"{key} is {shown[:60]}, not {expected}"
    return None


def mismatch(state: dict, view: dict) -> list[str]:
    """Why `state` may not be resumed under the training view `view` (empty when it may)."""
    if state["fingerprint"] == fingerprint(view):
        return []
    return diff(state["spec"], view) or ["training-relevant settings differ (fingerprints differ)"]


def check_resumable(state: dict, view: dict, path: Path, cell_id: str, *, force: bool) -> None:
    """The check of the cell that is about to resume from `state` (plan_resume checked the file found when the run
    was planned; this one checks the file actually loaded, which may have appeared since: another job's, or that
    of another cell of the same id). BadInput unless it was written under `view` or `force` allows it."""
    changed = mismatch(state, view)
    if changed and not force:
        raise BadInput(f"checkpoint {path} was not written by cell {cell_id} under this spec (it was written by cell "
                       f"{state['cell']!r}); resuming from it would mix two experiments:\n  " + "\n  ".join(changed),
                       fix=f"delete {path} to train cell {cell_id} from the start, or run again with --fresh")


# ------------------------------------------------------------------------------------- what to do with each cell


def cell_paths(out_dir: Path, cell_id: str) -> tuple[Path, Path]:
    """(OUT/cells/<id>.json, OUT/checkpoints/<id>.pt), both checked to stay inside OUT."""
    return (inside(out_dir / "cells", cell_id + ".json", where=f"cell {cell_id!r}"),
            inside(out_dir / "checkpoints", cell_id + ".pt", where=f"cell {cell_id!r}"))


def finished_result(result_path: Path, view: dict, evaluation: dict) -> dict | None:
    """The cell's stored result when it is done under the same training view and evaluation, else None.

    Read by harness.integrity.read_cell: BadInput when the file is damaged, integrity.Unusable when it is not a
    cell result."""
    result = integrity.read_cell(result_path)
    if result is None:
        return None
    fp = result.get("fingerprint")
    if (result.get("status") == "done" and isinstance(fp, dict) and fp.get("training") == fingerprint(view)
            and fp.get("evaluation") == fingerprint(evaluation)):
        return result
    return None


def plan_resume(spec: dict, cells: list, out_dir: Path, *, fresh: bool, force: bool,
                performance: Mapping[str, Any], notes: list[str] | None = None) -> dict[str, str]:
    """For each cell id: 'skip' (finished under this spec), 'resume' (a usable checkpoint) or 'start'.

    A cell file or checkpoint that is not one of this harness (harness.integrity.Unusable) counts as missing; what
    is ignored, and why, is appended to `notes`. A damaged one (its checksum) is BadInput naming it.

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
        try:
            finished = finished_result(result_path, view, evaluation_view(spec, cell_performance.evaluation_tf32))
        except integrity.Unusable as exc:
            finished = None
            if notes is not None:
                notes.append(f"cell {cell.id}: ignoring {result_path}: {exc.reason}; the cell is re-evaluated "
                             "(or trained, without a usable checkpoint)")
        if finished is not None:
            decisions[cell.id] = "skip"
            continue
        if not ckpt_path.exists():
            decisions[cell.id] = "start"
            continue
        try:
            state = load(ckpt_path, mmap=True)
        except integrity.Unusable:
            decisions[cell.id] = "start"  # run_cell says so when it ignores the file
            continue
        changed = mismatch(state, view)
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
