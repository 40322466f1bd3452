"""Plan the cells of a spec (model x defensive strength), run each, and assemble the report.

Each cell's result is written to <out>/cells/<cell id>.json as soon as it is known, and report.json is
assembled from those files, so a failure in one cell never touches the results of the others.
"""

from __future__ import annotations

import datetime as dt
import platform
import random
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape as rich_escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

import harness
from harness import registry
from harness.errors import BadInput, RunFailure
from harness.evaluate import evaluate
from harness.plugin import ADVERSARY_POLICY, DataSplits, to_unit
from harness.report import validate_report, write_json_atomic
from harness.train import steps_per_epoch, train


@dataclass(frozen=True)
class Cell:
    model: dict  # the spec's model entry (resolved: has label, name, options)
    strength: float  # 0-255 scale

    @property
    def id(self) -> str:
        return f"{self.model['label']}__s{self.strength:g}"


def plan(spec: dict) -> list[Cell]:
    return [Cell(model, float(s)) for model in spec["models"] for s in spec["defense"]["strengths"]]


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
        "git_revision": git_revision(),
        "adversary_policy": ADVERSARY_POLICY,
        "plugins": [{"kind": p.kind, "name": p.name, "distribution": p.distribution, "version": p.version,
                     "target": p.target} for p in registry.loaded_plugins()],
    }


def load_data(spec: dict) -> DataSplits:
    ds = spec["dataset"]
    plugin = registry.load("dataset", ds["name"])(**ds["options"])
    data = plugin.load(ds["root"], ds["download"])
    data.train = data.train.subset(ds["max_train"], spec["seed"])
    data.test = data.test.subset(ds["max_test"], spec["seed"] + 1)
    return data


def run_cell(cell: Cell, spec: dict, data: DataSplits, device: torch.device, progress: Progress) -> dict:
    seed_everything(spec["seed"])  # the same initialisation for every strength: cells differ only by strength
    model_cls = registry.load("model", cell.model["name"])
    model = model_cls(**cell.model["options"]).build(data.num_classes, data.input_shape).to(device)
    defense_entry = spec["defense"]
    defense = registry.load("defense", defense_entry["name"])(eps=to_unit(cell.strength), **defense_entry["options"])
    attacks = [(a, registry.load("attack", a["name"])(eps=to_unit(a["eps"]), **a["options"]))
               for a in spec["evaluation"]["attacks"]]
    cfg = spec["training"]
    started = time.perf_counter()

    task = progress.add_task(f"train {cell.id}", total=cfg["epochs"] * steps_per_epoch(data, cfg))
    history = train(model, defense, data, cfg, device, spec["seed"], on_step=lambda: progress.advance(task))
    progress.update(task, visible=False)

    eval_bs = spec["evaluation"]["batch_size"]
    eval_batches = sum((len(s) + eval_bs - 1) // eval_bs for s in (data.train, data.test, *([data.test] * len(attacks))))
    task = progress.add_task(f"evaluate {cell.id}", total=eval_batches)
    metrics = evaluate(model, data, attacks, eval_bs, device, on_batch=lambda: progress.advance(task),
                       checks=spec["evaluation"].get("checks"))
    progress.update(task, visible=False)
    return {
        "id": cell.id, "model": cell.model["label"], "model_name": cell.model["name"],
        "defense": defense_entry["name"], "strength": cell.strength, "status": "done",
        "seconds": time.perf_counter() - started,
        "parameters": sum(p.numel() for p in model.parameters()),
        "history": history, "metrics": metrics,
    }


def make_progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=console, transient=True)


def run(spec: dict, out_dir: Path, console: Console, *, smoke: bool = False) -> dict:
    """Run every cell of a validated spec; write cells/<id>.json and report.json under out_dir; return the report."""
    device = pick_device(spec["device"])
    data = load_data(spec)
    console.print(f"[bold]{spec['name']}[/bold]: {len(plan(spec))} cells on {device}; data: {data.source or spec['dataset']['name']} "
                  f"({len(data.train)} train / {len(data.test)} test, {data.num_classes} classes, input {data.input_shape})")
    if data.stand_in:
        console.print("[yellow]stand-in data: synthetic images replace the real dataset; numbers are not results[/yellow]")
    cells = []
    with make_progress(console) as progress:
        for cell in plan(spec):
            try:
                result = run_cell(cell, spec, data, device, progress)
            except RunFailure as exc:
                console.print(f"[red]cell {cell.id} failed:[/red] {exc}")
                result = {"id": cell.id, "model": cell.model["label"], "model_name": cell.model["name"],
                          "defense": spec["defense"]["name"], "strength": cell.strength, "status": "failed",
                          "error": str(exc)}
            write_json_atomic(out_dir / "cells" / f"{cell.id}.json", result)
            cells.append(result)
            if result["status"] == "done":
                m = result["metrics"]
                console.print(f"cell {cell.id}: acc {m['clean_acc']:.2f}%  GE {m['ge']:.4f}  "
                              f"PGD {m['pgd_acc']:.2f}%  ({result['seconds']:.1f} s)")
                for flag, value in (m.get("checks") or {}).get("flags", {}).items():
                    if value["ok"] is False:
                        console.print(f"[yellow]cell {cell.id}: check {flag} raised:[/yellow] "
                                      f"{rich_escape(value['detail'])}", highlight=False)
    report = {
        "schema_version": 1,
        "harness_version": harness.__version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "spec": spec,
        "smoke": smoke or data.stand_in,
        "data": {"source": data.source, "stand_in": data.stand_in, "train_size": len(data.train),
                 "test_size": len(data.test), "num_classes": data.num_classes, "input_shape": list(data.input_shape),
                 "notes": data.notes},
        "environment": environment(device),
        "cells": cells,
    }
    validate_report(report)
    write_json_atomic(out_dir / "report.json", report)
    return report
