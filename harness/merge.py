"""Reading saved reports back for `harness report`: one report, or the cells of several runs merged into one.

A source is a run folder (its report.json, plus any cells/<id>.json that report.json does not hold, such as cells
of an interrupted run) or a report file. Cells of different sources merge into one report when their specs agree
on everything that changes a number: seed, dataset, defense (name and options), training, evaluation, analysis,
and the name and options of every model label they share. Precision and TF32 change the numbers too
(harness.performance.NUMERIC_KEYS), but `precision: auto` resolves per machine and, on CPU, per model: so the runs'
resolved settings (`environment.performance`) must agree, and so must the cells of one model (`performance` of
each cell), e.g. a bf16 GPU run and an fp32 CPU run of the same spec do not merge. Models and strengths are united.
Where two sources hold a cell of the same id, the later source's cell wins and a note says so. Nothing is recomputed.
"""

from __future__ import annotations

import copy
from pathlib import Path

from harness import integrity
from harness.checkpoint import diff
from harness.errors import BadInput
from harness.performance import numeric_view
from harness.report import validate_report
from harness.spec import read_json

# The parts of a spec whose differences change a cell's numbers (models are compared label by label).
MATTERS = ("seed", "dataset", "defense", "training", "evaluation", "analysis")


def _essentials(spec: dict) -> dict:
    out = {key: copy.deepcopy(spec.get(key)) for key in MATTERS}
    if isinstance(out["defense"], dict):
        out["defense"].pop("strengths", None)  # strengths are the columns: they may differ and are united
    return out


def _read_report(path: Path) -> dict:
    report = read_json(path, "report")
    try:
        validate_report(report)
    except ValueError as exc:
        raise BadInput(f"{path} is not a harness report: {exc}",
                       fix="pass a folder written by `harness run` or its report.json") from exc
    for cell in report["cells"]:  # each carries the checksum of its cell file (harness.integrity)
        actual = integrity.json_checksum(cell)
        if integrity.KEY in cell and cell[integrity.KEY] != actual:
            raise BadInput(f"cell {cell['id']} in {path} is damaged: its content does not match the checksum "
                           f"written with it (stored {str(cell[integrity.KEY])[:80]}, content {actual})",
                           fix="run `harness run` into that folder again: it rebuilds report.json from the cell "
                               "files (cells/*.json), verifying each")
    return report


def _read_cell(path: Path) -> dict:
    """A cell file, verified (its checksum: BadInput when damaged) and valid, or BadInput: `harness report`
    recomputes nothing, so it cannot stand in for a file that is not a cell result."""
    try:
        cell = integrity.read_cell(path)
    except integrity.Unusable as exc:
        raise BadInput(f"{path} is not a cell result of harness: {exc.reason}",
                       fix="remove the file from the cells/ folder or pass another folder") from exc
    if cell is None:
        raise BadInput(f"cell file {path} disappeared while it was read", fix="run the command again")
    return cell


def _source(path: Path) -> tuple[dict | None, list[tuple[dict, str]], list[str]]:
    """(report or None, [(cell, where it came from)], notes) of one path."""
    if not path.exists():
        raise BadInput(f"report folder not found: {path}", fix="pass the --out folder of `harness run` "
                       "(default reports/<spec name>/) or a report.json file")
    if path.is_file():
        report = _read_report(path)
        return report, [(c, str(path)) for c in report["cells"]], []
    report_path, cell_paths = path / "report.json", sorted((path / "cells").glob("*.json"))
    if not report_path.exists() and not cell_paths:
        raise BadInput(f"{path} holds neither report.json nor cells/*.json",
                       fix="pass the --out folder of `harness run` (default reports/<spec name>/)")
    report = _read_report(report_path) if report_path.exists() else None
    cells = [(c, str(report_path)) for c in report["cells"]] if report else []
    notes = []
    have = {c["id"] for c, _ in cells}
    for cell_path in cell_paths:
        cell = _read_cell(cell_path)
        if cell["id"] in have:
            continue  # report.json was assembled from these files
        if report is not None and (cell["strength"] not in (report["spec"]["defense"] or {}).get("strengths", [0])
                                   or cell["model"] not in {m.get("label") for m in report["spec"]["models"]}):
            notes.append(f"ignored {cell_path}: cell {cell['id']} is not in the plan of {report_path} "
                         "(left over from an earlier run into the same folder?)")
            continue
        cells.append((cell, str(cell_path)))
        notes.append(f"cell {cell['id']} taken from {cell_path} (not in report.json)")
    return report, cells, notes


def differences(a: dict, b: dict) -> list[str]:
    ea, eb = _essentials(a), _essentials(b)
    diffs = [key for key in MATTERS if key in a and key in b and ea[key] != eb[key]]
    models_a = {m["label"]: (m["name"], m.get("options")) for m in a["models"]}
    for m in b["models"]:
        if m["label"] in models_a and models_a[m["label"]] != (m["name"], m.get("options")):
            diffs.append(f"models[{m['label']}]")
    return diffs


def performance_changes(recorded: dict | None, other: dict | None) -> list[str]:
    """How two recorded `performance` objects (Performance.describe) differ in what changes the numbers, as
    `performance.precision: "fp32" -> "bf16"`; keys only one of them records are not compared (older reports
    lack `eval_tf32`), and a record that is absent (a failed cell) differs from nothing."""
    a, b = numeric_view(recorded or {}), numeric_view(other or {})
    common = [k for k in a if k in b]
    return diff({"performance": {k: a[k] for k in common}}, {"performance": {k: b[k] for k in common}})


def performance_against(cells: list[tuple[dict, str]], expected: dict[str, dict]) -> list[str]:
    """For each (cell, where it is) whose id `expected` maps to a performance record: how it differs from it."""
    out = []
    for cell, where in cells:
        if cell["id"] in expected:
            changes = performance_changes(cell.get("performance"), expected[cell["id"]])
            if changes:
                out.append(f"cell {cell['id']} ({where}): {', '.join(changes)}")
    return out


def performance_within_models(cells: list[tuple[dict, str]]) -> list[str]:
    """Cells of one model (a row of the table) that were trained or evaluated differently from its first cell."""
    first: dict[str, tuple[dict, str]] = {}
    out = []
    for cell, where in cells:
        if "performance" not in cell:
            continue
        model = cell["model"]
        if model not in first:
            first[model] = (cell, where)
            continue
        ref, ref_where = first[model]
        changes = performance_changes(ref["performance"], cell["performance"])
        if changes:
            out.append(f"model {model}: cell {ref['id']} ({ref_where}) -> cell {cell['id']} ({where}): "
                       f"{', '.join(changes)}")
    return out


def load(paths: list[Path]) -> tuple[dict, list[str], bool]:
    """The report of `paths`, notes for the user, and whether cells of several sources were merged (a single
    report with nothing added is returned as it is)."""
    if not paths:
        raise BadInput("no report given", fix="harness report DIR [DIR ...]")
    reports: list[tuple[dict, str]] = []
    cells: dict[str, tuple[dict, str]] = {}
    notes: list[str] = []
    for path in paths:
        report, source_cells, source_notes = _source(Path(path))
        notes += source_notes
        if report is not None:
            reports.append((report, str(path)))
        for cell, where in source_cells:
            if cell["id"] in cells and cells[cell["id"]][1] != where:
                notes.append(f"cell {cell['id']} is in {cells[cell['id']][1]} and {where}: using the later, {where}")
            cells[cell["id"]] = (cell, where)
    if not reports:
        raise BadInput("none of " + ", ".join(map(str, paths)) + " holds a report.json, so no spec says what the "
                       "cells were run with", fix="add the folder of one run of the same spec (it holds report.json)")
    first, first_path = reports[0]
    if len(reports) == 1 and [id(c) for c, _ in cells.values()] == [id(c) for c in first["cells"]]:
        return first, notes, False  # one report, nothing added: shown exactly as saved
    spec = copy.deepcopy(first["spec"])
    problems = []
    for report, where in reports[1:]:
        diffs = differences(spec, report["spec"]) + performance_changes(
            first.get("environment", {}).get("performance"), report.get("environment", {}).get("performance"))
        if diffs:
            problems.append(f"{where} differs from {first_path} in: {', '.join(diffs)}")
        labels = {m["label"] for m in spec["models"]}
        spec["models"] += [copy.deepcopy(m) for m in report["spec"]["models"] if m["label"] not in labels]
        if spec.get("defense") and report["spec"].get("defense"):  # null in evaluations of given weights
            spec["defense"]["strengths"] = sorted(set(spec["defense"]["strengths"])
                                                  | set(report["spec"]["defense"]["strengths"]))
    problems += performance_within_models(list(cells.values()))
    if problems:
        raise BadInput("the reports were run with specs (or precisions) that differ in what changes the numbers, "
                       "so their cells cannot share a table:\n  " + "\n  ".join(problems),
                       fix="merge only reports of the same spec run in the same precision and TF32 setting "
                       "(models and strengths may differ); rerun the odd cells with the others' `performance` "
                       "settings, e.g. \"precision\": \"fp32\"")
    if spec.get("defense"):
        spec["defense"]["strengths"] = sorted(set(spec["defense"]["strengths"]) | {c["strength"] for c, _ in cells.values()})
    order = {m["label"]: i for i, m in enumerate(spec["models"])}
    merged_cells = sorted((c for c, _ in cells.values()), key=lambda c: (order.get(c["model"], len(order)), c["strength"]))
    merged = {key: copy.deepcopy(value) for key, value in first.items() if key != "cells"}
    merged.update(spec=spec, cells=merged_cells, smoke=any(r.get("smoke", False) for r, _ in reports),
                  merged_from=list(dict.fromkeys(where for _, where in cells.values())))
    validate_report(merged)
    return merged, notes, True
