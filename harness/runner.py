"""Plan the cells of a spec (model x defensive strength), run each, and assemble the report.

Each cell's result is written to <out>/cells/<cell id>.json as soon as it is known, and report.json is
assembled from those files, so a failure in one cell never touches the results of the others.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import platform
import random
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape as rich_escape

import harness
from harness import registry
from harness import paper
from harness import smoke as smoke_mod
from harness import analysis as analysis_mod
from harness.analysis import analyze_cell
from harness import checks as checks_mod
from harness.errors import BadInput, DatasetNotFound, HarnessError, RunFailure
from harness.evaluate import batch_count as eval_batch_count, evaluate
from harness.plugin import ADVERSARY_POLICY, DEFAULT_DATA_ROOT, DataSplits, to_unit
from harness.report import render_cell_summary, validate_report, write_json_atomic
from harness.distributed import Distributed
from harness.performance import Performance, Runtime
from harness.train import steps_per_epoch, train
from harness import checkpoint, integrity, merge
from harness import spec as spec_mod
from harness import threads
from harness import tracking
from harness.interrupt import InterruptGuard, TrainingStopped
from harness.progress import Overall, Phases, batch_hook
from harness.paths import (WriteFailed, check_dataset_root, check_writable, inside, locked, remove_stale_temps,
                           report_lock)


@dataclass(frozen=True)
class Cell:
    model: dict  # the spec's model entry (resolved: has label, name, options)
    strength: float  # 0-255 scale

    @property
    def id(self) -> str:
        return spec_mod.cell_id(self.model["label"], self.strength)


def plan(spec: dict) -> list[Cell]:
    """The spec's cells, model by model. Their ids are unique, also ignoring case (spec.colliding_cells, checked
    here too for a spec that did not come through spec.validate): two cells never share a file."""
    collisions = spec_mod.colliding_cells(spec)
    if collisions:
        raise BadInput("two cells of the spec would have the same id, and so the same files:\n  "
                       + "\n  ".join(collisions), fix="correct each value at the JSON path shown")
    return [Cell(model, float(s)) for model in spec["models"] for s in spec["defense"]["strengths"]]


def select(cells: list[Cell], ids: list[str] | None) -> list[Cell]:
    """The cells named by `--cell` (all of them when none is named), in plan order."""
    if not ids:
        return cells
    valid = [c.id for c in cells]
    unknown = [i for i in ids if i not in valid]
    if unknown:
        raise BadInput(f"unknown cell id{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)}",
                       fix=f"the spec's cells are: {', '.join(valid)}")
    return [c for c in cells if c.id in ids]


def spec_digest(spec: dict) -> str:
    """Identifies the spec a cell file belongs to (every field but `performance` and `description`), so that
    separate `--cell` jobs writing into one folder merge. `performance` is left out because what of it changes
    the numbers (precision, TF32) is resolved per machine and model: run() compares each other job's cell with
    what this run resolves for it instead (check_mergeable), and refuses a mix."""
    core = {k: v for k, v in spec.items() if k not in ("performance", "description")}
    return checkpoint.fingerprint(core)[:16]


def collect_cells(out_dir: Path, spec: dict, notes: list[str] | None = None) -> list[dict]:
    """Every cell file under out_dir/cells/ of this spec (same digest), in plan order. A file that is not a cell
    result (harness.integrity.Unusable) is left out, and named in `notes`; a damaged one is BadInput."""
    digest, order = spec_digest(spec), {c.id: i for i, c in enumerate(plan(spec))}
    found = []
    for path in sorted((out_dir / "cells").glob("*.json")):
        try:
            cell = integrity.read_cell(path)
        except integrity.Unusable as exc:
            if notes is not None and path.stem in order:
                notes.append(f"left out {path}: {exc.reason}")
            continue
        if isinstance(cell, dict) and cell.get("spec_digest") == digest and cell.get("id") in order:
            found.append(cell)
    return sorted(found, key=lambda c: order[c["id"]])


def merge_cells(found: list[dict], this_run: list[dict], spec: dict) -> list[dict]:
    """The report's cells: those this run ran or kept, over the cell files of other jobs of the same spec."""
    by_id = {c["id"]: c for c in found}
    by_id.update({c["id"]: c for c in this_run})
    order = {c.id: i for i, c in enumerate(plan(spec))}
    return sorted(by_id.values(), key=lambda c: order.get(c["id"], len(order)))


def cell_performance(performance: Performance, cell: Cell, data: DataSplits) -> Performance:
    """The performance options `cell` will train with: `performance`, or its fp32 fallback where the CPU bf16
    guard applies to the cell's model (Performance.for_model, decided by one forward pass of a freshly built
    model, as run_cell decides it again on the model it trains). Known before anything trains, so that the
    resolved precision can take part in resume and merge decisions."""
    if not performance.depends_on_model:
        return performance
    model = build_model(cell.model, data.num_classes, data.input_shape)
    return performance.for_model(model, data.input_shape)


def check_mergeable(out_dir: Path, spec: dict, selected: list[Cell], performance: dict[str, Performance],
                    console: Console, *, force: bool) -> None:
    """Refuse (unless `force`) to merge other jobs' cell files of this spec into this run's report when they were
    trained or evaluated in another precision or TF32 setting than this run gives their cells."""
    ids = {c.id for c in selected}
    others = [(c, str(checkpoint.cell_paths(out_dir, c["id"])[0])) for c in collect_cells(out_dir, spec)
              if c["id"] not in ids]
    problems = merge.performance_against(others, {k: p.describe() for k, p in performance.items()})
    if not problems:
        return
    if force:
        console.print("[yellow]--force: merging cells of other precision or TF32 settings:[/yellow]\n  "
                      + "\n  ".join(problems), highlight=False)
        return
    raise BadInput("other jobs' cells in this folder were trained or evaluated in another precision or TF32 setting "
                   "than this run gives them (theirs -> this run's); one table would mix two experiments:\n  "
                   + "\n  ".join(problems),
                   fix="run this job with the same `performance` settings as theirs (e.g. \"precision\": "
                   "\"fp32\"), write it to another --out, or pass --force to merge anyway (each cell records its "
                   "precision)")


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise BadInput("the spec asks for device 'cuda' but no CUDA device is available",
                       fix='set "device": "auto" (uses CUDA when present) or "cpu"')
    if choice == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(harness.__file__).parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment(device: torch.device) -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "cpu": threads.describe(),  # the CPU model, how the thread count was chosen, OpenMP's wait policy
        "git_revision": git_revision(),
        "adversary_policy": ADVERSARY_POLICY,
        "plugins": [{"kind": p.kind, "name": p.name, "distribution": p.distribution, "version": p.version,
                     "target": p.target} for p in registry.loaded_plugins()],
    }


def load_data(spec: dict, smoke: bool = False) -> DataSplits:
    ds = spec["dataset"]
    plugin = registry.create("dataset", ds["name"], **ds["options"])
    try:
        with registry.plugin_boundary("dataset", ds["name"], "load"):  # the documented default root, never None
            data = plugin.load(ds["root"] if ds["root"] is not None else DEFAULT_DATA_ROOT, ds["download"])
    except DatasetNotFound as missing:
        if not smoke:
            raise
        data = smoke_mod.stand_in(plugin, spec, missing)  # smoke runs go on with synthetic stand-in data
    if data.train is not None:  # a test-only dataset has none (evaluation only: require_train_split)
        data.train = data.train.subset(ds["max_train"], spec["seed"])
    data.test = data.test.subset(ds["max_test"], spec["seed"] + 1, first=ds.get("test_subset") == "first")
    return data


def require_train_split(data: DataSplits, spec: dict, command: str) -> None:
    """Training (`harness run`, `harness bench`) needs a training split; a test-only dataset plugin (DataSplits.train
    None) serves only `harness eval` / `harness.evaluate`. Checked right after loading, before anything trains."""
    if data.train is not None:
        return
    who, _ = registry.describe("dataset", spec["dataset"]["name"])
    raise BadInput(f"{who} returned no training split (DataSplits.train is None): `harness {command}` trains, and "
                   "training needs one",
                   fix="train on a dataset whose plugin returns a training split; evaluate trained weights on this "
                       "test-only dataset with `harness eval SPEC --weights FILE` (or harness.evaluate)")


def build_attacks(spec: dict) -> list[tuple[dict, object]]:
    """The spec's evaluation attacks as (entry, plugin instance), eps converted from the 0-255 scale."""
    return [(a, registry.create("attack", a["name"], eps=to_unit(a["eps"]), **a["options"]))
            for a in spec["evaluation"]["attacks"]]


def build_model(entry: dict, num_classes: int, input_shape) -> torch.nn.Module:
    """The model plugin of a spec's model entry, built; its exceptions are the plugin's (registry.plugin_boundary)."""
    plugin = registry.create("model", entry["name"], **entry["options"])
    with registry.plugin_boundary("model", entry["name"], "build"):
        return plugin.build(num_classes, input_shape)


def report_document(spec: dict, data: DataSplits, env: dict, cells: list[dict], *, smoke: bool, **extra) -> dict:
    """The report.json document of a run (schemas/report.schema.json): the resolved spec, the data, the
    environment and the cells; `extra` adds top-level fields (smoke_overrides, checkpoint)."""
    return {
        "schema_version": 1,
        "harness_version": harness.__version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "spec": spec,
        "smoke": smoke or data.stand_in,
        "data": {"source": data.source, "stand_in": data.stand_in,
                 "train_size": len(data.train) if data.train is not None else None,  # None: a test-only dataset
                 "test_size": len(data.test), "num_classes": data.num_classes, "input_shape": list(data.input_shape),
                 "notes": data.notes},
        "environment": env,
        "cells": cells,
        **extra,
    }


def run_cell(cell: Cell, spec: dict, data: DataSplits, device: torch.device, progress: Phases,
             runtime: Runtime | None = None, out_dir: Path | None = None,
             guard: InterruptGuard | None = None, force: bool = False,
             tracker: tracking.Trackers | None = None) -> dict | None:
    seed_everything(spec["seed"])  # the same initialisation for every strength: cells differ only by strength
    model = build_model(cell.model, data.num_classes, data.input_shape).to(device)
    performance = Performance(device)  # a plain fp32 loop when no runtime is given
    if runtime is not None and runtime.performance is not None:
        performance = runtime.performance.for_model(model, data.input_shape)  # bf16 -> fp32 where oneDNN fails
        if performance is not runtime.performance:
            runtime = dataclasses.replace(runtime, performance=performance)
            # markup off: the note may quote a model's own error message, brackets included
            progress.console.print(f"cell {cell.id}: {performance.note}", style="yellow", markup=False,
                                   highlight=False)
        performance.prepare_model(model)
    defense_entry = spec["defense"]
    defense = registry.create("defense", defense_entry["name"], eps=to_unit(cell.strength), **defense_entry["options"])
    attacks = build_attacks(spec)
    cfg = spec["training"]
    started = time.perf_counter()

    # Checkpoints (harness.checkpoint): resume from OUT/checkpoints/<id>.pt when run() decided so, save every epoch
    # (under torchrun every rank resumes from the same file and rank 0 alone writes it).
    view = checkpoint.training_view(spec, cell.model, cell.strength, performance.training_view())
    ckpt_path = checkpoint.cell_paths(out_dir, cell.id)[1] if out_dir is not None else None
    resume = None
    if ckpt_path is not None and ckpt_path.exists():
        try:
            resume = checkpoint.load(ckpt_path)
        except integrity.Unusable as exc:  # not a checkpoint of this harness: as if there were none
            progress.console.print(f"cell {cell.id}: ignoring {ckpt_path}: {exc.reason}; training from the start",
                                   style="yellow", markup=False, highlight=False, soft_wrap=True)
        else:  # checked again here: the file may have appeared since the run was planned
            checkpoint.check_resumable(resume, view, ckpt_path, cell.id, force=force)
    ident = {"cell": cell.id, "fingerprint": checkpoint.fingerprint(view), "spec": view}
    writes = runtime is None or runtime.distributed is None or runtime.distributed.is_main
    save = (lambda state: checkpoint.save(ckpt_path, {**state, **ident})) if ckpt_path is not None and writes else None
    if ckpt_path is not None and runtime is not None and runtime.distributed is not None:
        save = runtime.distributed.agreed_write(save)  # every rank learns whether rank 0 could write it
    stop = (runtime or Runtime()).stop_check(guard) if guard is not None else None
    done = 0 if resume is None else resume["epoch"] * steps_per_epoch(data, cfg) + resume["step"]
    if tracker:  # harness.tracking (rank 0 only): the history resumed from now, then each epoch as it ends
        tracker.start_cell(cell.id, resume["history"] if resume is not None else [], hparams(cell))

    progress.start(f"cell {cell.id}", "training", cfg["epochs"] * steps_per_epoch(data, cfg), completed=done,
                   unit="steps")
    try:
        history = train(model, defense, data, cfg, device, spec["seed"], on_step=progress.advance,
                        runtime=runtime, resume=resume, on_checkpoint=save, should_stop=stop,
                        on_epoch=tracker.epoch if tracker else None)
    except TrainingStopped as exc:
        if runtime is not None and runtime.distributed is not None:
            runtime.distributed.barrier()  # no rank exits before rank 0 has written the checkpoint
        raise guard.interrupted(f"cell {cell.id} stopped after step {exc.step} of epoch {exc.epoch}; "
                                f"checkpoint written to {ckpt_path}") from None
    progress.finish()
    if runtime is not None and runtime.distributed is not None:
        if not runtime.distributed.is_main:
            return None  # rank 0 evaluates and writes; the others wait in Distributed.follow (run's cell loop)
        runtime.distributed.alone()  # from here on, how rank 0's part ends is told to the others (leading)

    eval_bs = spec["evaluation"]["batch_size"]
    label = f"cell {cell.id}"
    # one callback per phase after training: progress (harness.progress) and the stop check (phase_check)
    evaluating = batch_hook(progress, label, "evaluating", eval_batch_count(data, len(attacks), eval_bs),
                            phase_check(cell, "evaluating", guard, ckpt_path))
    checking = batch_hook(progress, label, "running the sanity checks",
                          lambda: checks_mod.batch_count(attacks, spec["evaluation"].get("checks"), len(data.test),
                                                         eval_bs),
                          phase_check(cell, "running the sanity checks", guard, ckpt_path))
    analysing = batch_hook(progress, label, "analysing", lambda: analysis_mod.batch_count(data, spec),
                           phase_check(cell, "analysing", guard, ckpt_path))
    timings: dict = {"train": sum(h["seconds"] for h in history)}
    evaluating()
    evaluated = time.perf_counter()
    with performance.evaluation():  # fp32, and on CUDA without TF32 unless the spec's eval_tf32 asks for it
        metrics = evaluate(model, data, attacks, eval_bs, device, on_batch=evaluating,
                           checks=spec["evaluation"].get("checks"), timings=timings,
                           on_checks_batch=checking, seed=spec["seed"])
        timings["evaluate"] = time.perf_counter() - evaluated
        progress.finish()
        analysed = time.perf_counter()
        if (spec.get("analysis") or {}).get("enabled", False):
            analysing()
        # the paper's section 4 quantities (None when disabled); the stop request is polled after every batch and
        # after the spectral norms
        analysis = analyze_cell(model, data, spec, device, on_batch=analysing)
        progress.finish()
    if analysis is not None:
        timings["analysis"] = time.perf_counter() - analysed
    result = {
        "id": cell.id, "model": cell.model["label"], "model_name": cell.model["name"],
        "defense": defense_entry["name"], "strength": cell.strength, "status": "done",
        "spec_digest": spec_digest(spec),
        "seconds": time.perf_counter() - started, "timings": timings,
        "parameters": sum(p.numel() for p in model.parameters()),
        **({"performance": performance.describe()} if runtime is not None and runtime.performance else {}),
        "history": history, "metrics": metrics, **({"analysis": analysis} if analysis is not None else {}),
        "fingerprint": {"training": ident["fingerprint"], "evaluation": checkpoint.fingerprint(
            checkpoint.evaluation_view(spec, performance.evaluation_tf32))},
        **({"resumed_from": {"epoch": resume["epoch"], "step": resume["step"]}} if resume is not None else {}),
    }
    non_finite = spec_mod.non_finite_numbers(result)
    if non_finite:  # JSON has no NaN: a result that is not finite fails its cell, as a non-finite loss does
        raise RunFailure(f"cell {cell.id}: its results hold non-finite numbers (the model's outputs overflow or are "
                         "NaN): " + "; ".join(m.split(":")[0] for m in non_finite[:10]))
    return result


def hparams(cell: Cell) -> dict:
    """What a cell varies, for a tracker's hyperparameter view (harness.tracking)."""
    return {"model": cell.model["label"], "strength": cell.strength}


def phase_check(cell: Cell, phase: str, guard: InterruptGuard | None, ckpt_path: Path | None) -> Callable[[], None]:
    """The stop check of one phase after a cell's training (evaluating, the sanity checks, the analysis): called
    at the phase's start and after each of its batches (through harness.progress.batch_hook, which also shows the
    phase's progress and announces it only after this check), it raises Interrupted once a signal came. A signal
    is thus honoured within one batch: one attack call on at most `evaluation.batch_size` samples (an attack
    plugin cannot be stopped inside its call). The cell's final training checkpoint is already written, so
    resuming only re-evaluates."""

    def check() -> None:
        if guard is not None and guard.requested():
            raise guard.interrupted(f"cell {cell.id} stopped while {phase}; its trained state is in {ckpt_path}")

    return check


@contextlib.contextmanager
def cell_lock(out_dir: Path, cell: Cell, console: Console, guard: InterruptGuard, distributed) -> Iterator[None]:
    """Hold cell's lock (out_dir/.locks/<id>.lock) while it runs, so that two jobs never train one cell: the second
    says so and waits (honouring SIGINT/SIGTERM while it waits), then takes the cell as the first left it. Under
    torchrun, rank 0 holds it for the job and the other ranks wait for it (Distributed.follow: when rank 0 is
    stopped while it waits, they stop with it)."""
    if distributed is not None and not distributed.is_main:
        distributed.follow(guard, f"while it waited for cell {cell.id}'s lock")
        yield
        return
    def waiting(holder: str) -> None:
        console.print(f"cell {cell.id}: another job (pid {holder}) is running it; waiting for it to finish "
                      f"({path})", markup=False, highlight=False, soft_wrap=True)

    def poll() -> None:
        if guard.requested():
            raise guard.interrupted(f"stopped while waiting for cell {cell.id}, which another job is running")

    with contextlib.ExitStack() as stack:
        with distributed.leading() if distributed is not None else contextlib.nullcontext():
            path = inside(out_dir / ".locks", cell.id + ".lock", where=f"cell {cell.id!r}")
            waited = stack.enter_context(locked(path, on_wait=waiting, poll=poll))
        if waited:
            console.print(f"cell {cell.id}: the other job is done with it", markup=False, highlight=False)
        yield


def trained_fully(ckpt_path: Path, training: dict) -> bool:
    """Whether the checkpoint holds a cell's finished training (written after its last epoch): resuming from it
    only evaluates again, as after a change of the evaluation or an interruption after training."""
    try:
        state = checkpoint.load(ckpt_path, mmap=True)
    except HarnessError:
        return False
    return state["epoch"] >= training["epochs"] and state["step"] == 0


@contextlib.contextmanager
def saying_last_good_checkpoint(cell: Cell, ckpt_path: Path) -> Iterator[None]:
    """A WriteFailed (full or read-only disk) while running `cell` names the cell's last good checkpoint."""
    try:
        yield
    except WriteFailed as exc:
        try:
            state = checkpoint.load(ckpt_path, mmap=True) if ckpt_path.exists() else None
        except HarnessError:
            state = None
        if state is None:
            raise exc.add_context(f"cell {cell.id} has no checkpoint yet (no good one to lose)")
        raise exc.add_context(f"the last good checkpoint is {ckpt_path} (cell {cell.id}, epoch {state['epoch']}, "
                              f"step {state['step']}): the same command resumes from it")


def run(spec: dict, out_dir: Path, console: Console, *, smoke: bool = False, cell_ids: list[str] | None = None,
        fresh: bool = False, force: bool = False, on_report: Callable[[dict], None] | None = None,
        overrides: list[str] | None = None, keep_checkpoints: bool = False,
        tracker: tracking.Trackers | None = None) -> dict | None:
    """Run every cell of a validated spec (or those of `cell_ids`); write cells/<id>.json and report.json under
    out_dir; return the report.

    Cells finished under the same spec are skipped, interrupted ones resume from their checkpoints
    (harness.checkpoint.plan_resume; `fresh` starts over, `force` resumes despite training-relevant changes).
    The report holds this run's cells and every other cell file of the same spec in out_dir/cells/ (separate
    `--cell` jobs merge). Under torchrun, only rank 0 evaluates and writes; the other ranks return None.
    `on_report(report)` is called while report.json is still locked (the CLI writes the figures there).
    `overrides`: the `--set PATH=VALUE` overrides the spec was validated with, recorded in the report.
    A smoke run deletes each cell's checkpoint once the cell's result is written (a pipeline check need not keep
    hundreds of MB of weights), unless `keep_checkpoints`; until then an interrupted smoke run resumes as any run.
    `tracker` (harness.tracking.create; `--log`): each cell's epochs and metrics, logged by rank 0.

    Several jobs may share out_dir: a cell is run by one job at a time (`cell_lock`; a second job on the same
    cell waits, then keeps or resumes what the first left), and report.json is rebuilt under a lock.
    """
    smoke_overrides: list[dict] = []
    if smoke:
        spec, smoke_overrides = smoke_mod.apply(spec)
    else:
        check_dataset_root(spec)  # smoke mode replaces a missing dataset by stand-in data instead
    selected = select(plan(spec), cell_ids)
    check_writable(out_dir)  # a read-only or full --out is refused before anything is trained
    device = pick_device(spec["device"])
    distributed = Distributed.from_env()
    if distributed is not None:
        distributed.check_batch_size(spec["training"]["batch_size"])
        device = distributed.device(device)
    performance = Performance.from_spec(spec.get("performance"), device)
    data = load_data(spec, smoke)
    require_train_split(data, spec, "run")
    # The precision each cell trains in is part of its experiment (checkpoint.training_view): resolve it per cell
    # before deciding to skip, resume or merge anything.
    by_model: dict[str, Performance] = {}
    for c in plan(spec):
        if c.model["label"] not in by_model:
            by_model[c.model["label"]] = cell_performance(performance, c, data)
    per_cell = {c.id: by_model[c.model["label"]] for c in plan(spec)}
    if distributed is None or distributed.is_main:  # rank 0 writes, so rank 0 tidies
        stale = remove_stale_temps(out_dir, out_dir / "cells", out_dir / "checkpoints")
        if stale:
            console.print(f"removed {len(stale)} temporary file{'s' if len(stale) > 1 else ''} left by interrupted "
                          "writers: " + ", ".join(str(p) for p in stale), markup=False, highlight=False,
                          soft_wrap=True)
    notes: list[str] = []
    decisions = checkpoint.plan_resume(spec, selected, out_dir, fresh=fresh, force=force, performance=per_cell,
                                       notes=notes)
    for note in notes:
        console.print(note, style="yellow", markup=False, highlight=False, soft_wrap=True)
    check_mergeable(out_dir, spec, selected, per_cell, console, force=force)
    if distributed is not None:
        distributed.init(device)
        if not distributed.is_main:
            console = Console(quiet=True)
    performance.apply_global()
    runtime = Runtime(performance, distributed)
    if tracker is None or (distributed is not None and not distributed.is_main):
        tracker = tracking.Trackers()  # none asked for; under torchrun rank 0 alone logs
    tracker.run = tracking.run_name(spec, smoke)
    data = performance.prepare_data(data)
    console.print(f"[bold]{spec['name']}[/bold]: {len(plan(spec))} cells on {device}; data: {data.source or spec['dataset']['name']} "
                  f"({len(data.train)} train / {len(data.test)} test, {data.num_classes} classes, input {data.input_shape})")
    if data.stand_in:
        console.print("[yellow]stand-in data: synthetic images replace the real dataset; numbers are not results[/yellow]")
    cells = []
    overall = Overall(len(selected), sum(decisions[c.id] != "skip" for c in selected))
    with distributed.shut_down_on_error() if distributed is not None else contextlib.nullcontext(), \
            Phases(console) as progress, InterruptGuard(hold_after_stop=distributed is not None) as guard, \
            contextlib.ExitStack() as held, contextlib.closing(tracker):
        stop = runtime.stop_check(guard)
        for index, cell in enumerate(selected, start=1):
            result_path, ckpt_path = checkpoint.cell_paths(out_dir, cell.id)
            if stop():
                raise guard.interrupted(f"stopped before cell {cell.id}")
            planned = decisions[cell.id]
            held.close()  # one cell lock at a time, taken in plan order: jobs never wait for each other in a cycle
            held.enter_context(cell_lock(out_dir, cell, console, guard, distributed))
            # decided again under the lock: another job may have finished (or started) this cell since the plan
            decisions[cell.id] = checkpoint.plan_resume(spec, [cell], out_dir, fresh=False, force=force,
                                                        performance=per_cell, notes=[])[cell.id]
            held.enter_context(saying_last_good_checkpoint(cell, ckpt_path))
            if decisions[cell.id] == "skip":
                try:  # verified again: the file may have changed since the run was planned
                    kept = integrity.read_cell(result_path)
                except integrity.Unusable:
                    kept = None
                if kept is not None:
                    cells.append(kept)
                    if tracker:  # logged again as it is: a tracker added after the cell finished still shows it
                        tracker.start_cell(cell.id, kept.get("history") or [], hparams(cell))
                        tracker.finish_cell(kept)
                    if planned != "skip":
                        overall.kept()
                    console.print(f"cell {cell.id}: finished earlier under the same spec, kept ({result_path})")
                    continue
            console.print(overall.starting(index, cell.id), markup=False, highlight=False)
            if decisions[cell.id] == "resume":
                if trained_fully(ckpt_path, spec["training"]):
                    console.print(f"cell {cell.id}: re-evaluating (training unchanged): the trained state in "
                                  f"{ckpt_path} is kept", markup=False, highlight=False, soft_wrap=True)
                else:
                    console.print(f"cell {cell.id}: resuming from {ckpt_path}")
            began = time.perf_counter()
            if distributed is not None and not distributed.is_main:
                try:
                    trained = run_cell(cell, spec, data, device, progress, runtime, out_dir, guard, force=force,
                                       tracker=tracker) is None
                except RunFailure:  # a non-finite loss, agreed: rank 0 failed the cell at the same step
                    trained = False
                if trained:  # rank 0 evaluates and writes it alone: stop as it stops, fail as it fails
                    distributed.follow(guard, f"while it evaluated cell {cell.id}")
                continue
            # under torchrun, rank 0 tells the others how its part of the cell (after training) ended, also when it
            # ends by a signal or an error (Distributed.leading): every rank then exits with the same code
            with distributed.leading(alone=False) if distributed is not None else contextlib.nullcontext():
                try:
                    result = run_cell(cell, spec, data, device, progress, runtime, out_dir, guard, force=force,
                                      tracker=tracker)
                except WriteFailed:
                    raise  # a full or read-only disk stops the run (exit 1): no later cell could be saved either
                except RunFailure as exc:
                    progress.drop()
                    result = {"id": cell.id, "model": cell.model["label"], "model_name": cell.model["name"],
                              "defense": spec["defense"]["name"], "strength": cell.strength, "status": "failed",
                              "error": str(exc), "spec_digest": spec_digest(spec)}
                if result["status"] == "done" and cell.model.get("paper_block"):
                    reference = paper.compare(cell.model["paper_block"], cell.strength, result["metrics"])
                    if reference is not None:
                        result["paper"] = reference
                result = integrity.write_cell(result_path, result)  # with its checksum
                tracker.finish_cell(result)  # its metrics (a failed cell: its curves so far)
                cells.append(result)
                overall.finished(time.perf_counter() - began)
                if smoke and not keep_checkpoints and result["status"] == "done":
                    ckpt_path.unlink(missing_ok=True)  # its result is written: a smoke run keeps no weights unless asked
                render_cell_summary(result, console)
    if distributed is not None:
        distributed.shutdown()
        if not distributed.is_main:
            return None
    env = dict(environment(device), performance=performance.describe(),
               world_size=distributed.world_size if distributed is not None else 1)
    # One job at a time rebuilds report.json, from the cell files as they are while it holds the lock: a job whose
    # cell finished meanwhile waits and rebuilds after it, so no job's write drops another job's cell.
    with locked(report_lock(out_dir)):
        notes = []
        others = collect_cells(out_dir, spec, notes)
        for note in notes:
            console.print(note, style="yellow", markup=False, highlight=False, soft_wrap=True)
        report = report_document(spec, data, env, merge_cells(others, cells, spec), smoke=smoke,
                                 **({"smoke_overrides": smoke_overrides} if smoke else {}),
                                 **({"overrides": list(overrides)} if overrides else {}))
        validate_report(report)
        write_json_atomic(out_dir / "report.json", report)
        if on_report is not None:
            on_report(report)  # the figures, under the same lock: drawn from the report.json just written
    return report
