"""Reports: the JSON document of a run (validated against schemas/report.schema.json, written atomically) and
its rendering in the layout of the paper's Tables 1-2: a block per model, rows Acc. / GE / PGD, a column per
defensive strength.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from harness.errors import RunFailure
from harness.paths import write_atomic
from harness.spec import load_schema, non_finite_numbers

REPORT_SCHEMA = load_schema("report.schema.json")
# The report schema with only `cells` required: validates one cell (a cell file) as the report's cells[0].
_CELLS_ONLY = dict(REPORT_SCHEMA, required=["cells"])


def validate_report(report: dict) -> None:
    errors = sorted(Draft202012Validator(REPORT_SCHEMA).iter_errors(report), key=lambda e: e.json_path)
    if errors:
        raise ValueError("report does not match its schema:\n  " +
                         "\n  ".join(f"{e.json_path}: {e.message}" for e in errors))


def cell_errors(cell: Any) -> list[str]:
    """How `cell` fails the report schema's cell definition, as `$.metrics.ge: 'x' is not of type 'number'`."""
    errors = sorted(Draft202012Validator(_CELLS_ONLY).iter_errors({"cells": [cell]}), key=lambda e: e.json_path)
    return ["$" + e.json_path[len("$.cells[0]"):] + f": {e.message[:200]}" for e in errors]


def strict_json(document: Any, path: Path) -> str:
    """`document` as JSON text. JSON has no NaN or Infinity (Python's json would write them as bare NaN, which no
    strict parser reads): a non-finite number is refused here, naming its JSON path, instead of being written.
    The harness never hands one over: non-finite weights are refused at load and a cell whose results are not
    finite fails; so this is RunFailure (exit 1), the report of a bug, not of bad input."""
    try:
        return json.dumps(document, indent=2, sort_keys=False, allow_nan=False) + "\n"
    except ValueError as exc:
        raise RunFailure(f"{path} not written: it would hold non-finite numbers, which JSON cannot: "
                         + "; ".join(non_finite_numbers(document)[:10]),
                         fix="report this as a bug of the harness or of the plugin that computed the value") from exc


def write_json_atomic(path: Path, document: Any) -> None:
    """Write a JSON document atomically (harness.paths.write_atomic): readers never see half a file, and never
    NaN or Infinity (strict_json)."""
    text = strict_json(document, path)
    write_atomic(path, lambda fh: fh.write(text.encode("utf-8")))


# The rows of the paper's Tables 1-2: (row name, metric key, format).
TABLE_ROWS = [("Acc.", "clean_acc", "{:.2f}"), ("GE", "ge", "{:.4f}"), ("PGD", "pgd_acc", "{:.2f}")]


def _fmt_strength(s: float) -> str:
    return f"{s:.1f}" if s != int(s) else f"{int(s)}"


def render_table(report: dict, console: Console) -> None:
    """Print the paper's table layout for the report's cells."""
    spec = report["spec"]
    strengths = sorted({c["strength"] for c in report["cells"]})
    title = f"{spec['name']}: {spec['dataset']['name']}, " + (f"defense {spec['defense']['name']}" if spec.get("defense")
                                                              else "evaluation of given weights (no training)")
    stand_in = bool((report.get("data") or {}).get("stand_in"))
    if report.get("smoke"):
        title += "  [SMOKE RUN on STAND-IN synthetic data: not a result]" if stand_in else "  [SMOKE RUN: not a result]"
    table = Table(title=title, title_justify="left")
    table.add_column("model")
    table.add_column("")
    for s in strengths:
        table.add_column(_fmt_strength(s), justify="right")
    by_model: dict[str, dict[float, dict]] = {}
    for cell in report["cells"]:
        by_model.setdefault(cell["model"], {})[cell["strength"]] = cell
    paper_key = {"clean_acc": "acc", "ge": "ge", "pgd_acc": "pgd"}
    with_paper = any(c.get("paper") for c in report["cells"])
    footnotes: dict[str, str] = {}  # "GE n/a": why (a metric null in the report, e.g. no training split)
    for model, cells in by_model.items():
        lines = []
        for row_name, key, fmt in TABLE_ROWS:
            values = []
            for s in strengths:
                cell = cells.get(s)
                if cell is None:
                    values.append("")
                elif cell["status"] != "done":
                    values.append("[red]failed[/red]")
                else:
                    value = cell["metrics"].get(key)
                    why = (cell["metrics"].get("unavailable") or {}).get(key)
                    if value is None and why:
                        footnotes.setdefault(f"{row_name} n/a", why)
                    text = ("n/a*" if why else "—") if value is None else fmt.format(value)
                    if cell.get("paper"):  # the published value on a second line of the cell
                        text += f"\n[dim]{fmt.format(cell['paper'][paper_key[key]])} (paper)[/dim]"
                    values.append(text)
            lines.append((row_name, values))
        for i, (row_name, values) in enumerate(lines):
            table.add_row(model if i == 0 else "", row_name, *values, end_section=(i == len(lines) - 1))
    console.print(table)
    console.print("columns: defensive strength on the 0-255 scale; Acc. and PGD in %; GE = test loss - train loss")
    for what, why in footnotes.items():
        console.print(f"* {what}: {why}", markup=False, highlight=False, soft_wrap=True)
    if with_paper:
        console.print("each cell: ours, and below it the paper's published value (Tables 1-2); differences in report.json")
    precisions = {c["id"]: c["performance"]["precision"] for c in report["cells"] if "performance" in c}
    if len(set(precisions.values())) > 1:
        console.print("[yellow]cells were trained in different precisions: "
                      + ", ".join(f"{k} {v}" for k, v in precisions.items()) + "[/yellow]", highlight=False)
    if report.get("smoke"):
        console.print(f"[bold yellow]SMOKE RUN{' on STAND-IN synthetic data' if stand_in else ''}: a pipeline check "
                      "with capped sizes, not a result[/bold yellow]")


def render_cell_summary(cell: dict, console: Console) -> None:
    """The lines `harness run` prints as a cell finishes, and `harness report` / `harness eval` print again from
    the report: its clean accuracy, GE, first attack's accuracy and time, and the detail of every sanity check
    raised (or the error of a failed cell)."""
    if cell["status"] != "done":
        console.print(f"[red]cell {escape(cell['id'])} failed:[/red] {escape(str(cell.get('error', '')))}",
                      highlight=False)
        return
    m = cell["metrics"]
    pgd = "—" if m.get("pgd_acc") is None else f"{m['pgd_acc']:.2f}%"
    ge = "n/a*" if m.get("ge") is None else f"{m['ge']:.4f}"  # null without a training split (m["unavailable"])
    console.print(f"cell {cell['id']}: acc {m['clean_acc']:.2f}% (clean)  GE {ge}  PGD {pgd}  "
                  f"({cell['seconds']:.1f} s)", markup=False, highlight=False)
    if m.get("ge") is None:
        why = (m.get("unavailable") or {}).get("ge", "not computed")
        console.print(f"  * GE n/a: {why}", markup=False, highlight=False, soft_wrap=True)
    for flag, value in (m.get("checks") or {}).get("flags", {}).items():
        if value["ok"] is False:
            console.print(f"[yellow]cell {escape(cell['id'])}: check {flag} raised:[/yellow] "
                          f"{escape(value['detail'])}", highlight=False)


def render_attack_table(report: dict, console: Console) -> None:
    """A row per cell, a column per attack, the per-sample worst case, and the sanity checks that were raised."""
    cells = [c for c in report["cells"] if c["status"] == "done"]
    if not cells:
        return
    labels = list(cells[0]["metrics"]["attacks"])
    table = Table(title="attacks (accuracy in %; worst case: a sample must survive every attack at that eps)",
                  title_justify="left")
    table.add_column("cell")
    for label in labels:
        table.add_column(label, justify="right")
    table.add_column("worst case", justify="right")
    table.add_column("checks raised")
    for cell in cells:
        m = cell["metrics"]
        worst = " / ".join(f"{v['acc']:.2f}@{eps}" for eps, v in (m.get("worst_case") or {}).items())
        checks = m.get("checks")
        raised = "not run" if checks is None else (
            ", ".join(k for k, v in checks["flags"].items() if v["ok"] is False) or "none")
        table.add_row(cell["id"], *(f"{m['attacks'][lab]['acc']:.2f}" if lab in m["attacks"] else "" for lab in labels),
                      worst, raised)
    console.print(table)
    for cell in cells:
        for label, entry in cell["metrics"]["attacks"].items():
            if "curve" in entry:
                points = "  ".join(f"{e:g}: {a:.1f}" for e, a in zip(entry["curve"]["eps"], entry["curve"]["acc"]))
                console.print(f"{cell['id']} {label} curve (eps: acc %)  {points}", highlight=False)
