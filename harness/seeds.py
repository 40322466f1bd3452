"""`harness report --across-seeds DIR...`: runs of one spec that differ only in their seed, summarised per cell
(model, defensive strength) as mean, sample standard deviation and the values of every seed.

The paper reports one run per cell. On small data one seed is noisy: on the offline default the GE of one
strength moved by up to 0.009 between seeds 0-2, more than the defense's whole effect on the mean (0.006 from
strength 0 to 48; README). Runs are made
with `harness run SPEC --seed N`; nothing is recomputed here. The runs must agree on everything that changes a
number except the seed (harness.merge's rule), and each seed may appear once.
"""

from __future__ import annotations

import datetime as dt
import statistics
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

import harness
from harness import merge
from harness.errors import BadInput
from harness.figures import max_loss_variation
from harness.report import TABLE_ROWS



def _stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else None,
            "values": values}


def summarize(paths: list[Path]) -> tuple[dict, list[str]]:
    """The across-seeds summary of the run folders (or report files) `paths`, and notes for the user."""
    if len(paths) < 2:
        raise BadInput("--across-seeds needs the reports of at least two seeds",
                       fix="run `harness run SPEC --seed N` for several N and pass each output folder")
    runs, notes = [], []
    for path in paths:
        report, source_notes, _ = merge.load([Path(path)])
        runs.append((report, str(path)))
        notes += source_notes
    first, first_path = runs[0]
    seen: dict[int, str] = {}
    problems = []
    for report, where in runs:
        seed = report["spec"]["seed"]
        if seed in seen:
            problems.append(f"{where} and {seen[seed]} both ran seed {seed}")
        seen.setdefault(seed, where)
        diffs = [d for d in merge.differences(first["spec"], report["spec"]) if d != "seed"]
        diffs += merge.performance_changes(first.get("environment", {}).get("performance"),
                                           report.get("environment", {}).get("performance"))
        if diffs:
            problems.append(f"{where} differs from {first_path} in: {', '.join(diffs)}")
    # a cell's seeds must also agree on precision and TF32 (a bf16 seed beside fp32 ones is another experiment)
    problems += merge.performance_within_models([(c, where) for report, where in runs for c in report["cells"]])
    if problems:
        raise BadInput("these reports are not seeds of one experiment:\n  " + "\n  ".join(problems),
                       fix="pass one output folder per seed of the same spec (`harness run SPEC --seed N`)")

    cells: dict[tuple[str, float], dict] = {}
    for report, _ in runs:
        seed = report["spec"]["seed"]
        for cell in report["cells"]:
            entry = cells.setdefault((cell["model"], cell["strength"]),
                                     {"model": cell["model"], "strength": cell["strength"], "seeds": [],
                                      "failed_seeds": [], "raw": {key: [] for _, key, _ in TABLE_ROWS}})
            if cell["status"] != "done":
                entry["failed_seeds"].append(seed)
                continue
            entry["seeds"].append(seed)
            for _, key, _ in TABLE_ROWS:
                value = cell["metrics"].get(key)
                if value is not None:
                    entry["raw"][key].append(value)
            variation = max_loss_variation(cell)  # Fig. 3
            if variation is not None:
                entry["raw"].setdefault("max_loss_variation", []).append(variation)
    order = {m["label"]: i for i, m in enumerate(first["spec"]["models"])}
    summary_cells = []
    for (model, strength), entry in sorted(cells.items(), key=lambda kv: (order.get(kv[0][0], len(order)), kv[0][1])):
        raw = entry.pop("raw")
        entry["n"] = len(entry["seeds"])
        entry["metrics"] = {key: _stats(values) for key, values in raw.items() if values}
        summary_cells.append(entry)
    spec = {k: v for k, v in first["spec"].items() if k != "seed"}
    return {
        "harness_version": harness.__version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "kind": "across-seeds",
        "spec": spec,
        "seeds": sorted(seen),
        "sources": [where for _, where in runs],
        "smoke": any(r.get("smoke", False) for r, _ in runs),
        "cells": summary_cells,
    }, notes


def render(summary: dict, console: Console) -> None:
    spec = summary["spec"]
    strengths = sorted({c["strength"] for c in summary["cells"]})
    title = (f"{spec['name']}: {spec['dataset']['name']}, defense {spec['defense']['name']}, "
             f"mean ± sd over seeds {', '.join(map(str, summary['seeds']))}")
    if summary["smoke"]:
        title += "  [SMOKE RUNS: not a result]"
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False,
                  collapse_padding=True)  # 4 strengths fit 80 columns
    table.add_column("model")
    table.add_column("")
    for s in strengths:
        table.add_column(f"{s:g}", justify="right")
    by_model: dict[str, dict[float, dict]] = {}
    for cell in summary["cells"]:
        by_model.setdefault(cell["model"], {})[cell["strength"]] = cell
    for model, cells in by_model.items():
        for i, (row_name, key, fmt) in enumerate(TABLE_ROWS):
            values = []
            for s in strengths:
                stats = (cells.get(s) or {}).get("metrics", {}).get(key)
                if stats is None:
                    values.append("")
                    continue
                text = fmt.format(stats["mean"])
                text += f"±{fmt.format(stats['sd'])}" if stats["sd"] is not None else " (1 seed)"
                values.append(text)
            table.add_row(model if i == 0 else "", row_name, *values, end_section=i == len(TABLE_ROWS) - 1)
    console.print(table)
    console.print("columns: defensive strength on the 0-255 scale; sd: sample standard deviation over the seeds "
                  "that finished the cell", highlight=False)
    for cell in summary["cells"]:
        if cell["failed_seeds"]:
            console.print(f"[yellow]{cell['model']} at {cell['strength']:g}: failed for seed(s) "
                          f"{', '.join(map(str, cell['failed_seeds']))}, left out of its statistics[/yellow]",
                          highlight=False)
