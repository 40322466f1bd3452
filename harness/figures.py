"""The paper's Figures 2-4 from a report, as PNG files beside report.json.

- fig2_ge.png: GE (test - train cross-entropy) against defensive strength, a line per model;
- fig3_loss_variation.png: the maximal loss variation in the eps-ball of correctly classified training samples
  (the cells' `analysis`), against defensive strength;
- fig4_pgd.png: PGD accuracy against defensive strength.
Where a cell carries the paper's published values (a `paper` object with `ge` / `pgd`), they are drawn as stars
on a dotted line beside the measured ones.

Only matplotlib's object-oriented API with the Agg canvas is used (no pyplot): no display, no global backend switch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from harness.paths import write_atomic

STRENGTH_LABEL = "defensive strength ε (L∞, 0–255 scale)"


def _paper_value(cell: dict, *keys: str) -> float | None:
    paper = cell.get("paper")
    if not isinstance(paper, dict):
        return None
    for key in keys:
        value = paper.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def _series(report: dict, value: Callable[[dict], float | None]) -> dict[str, list[tuple[float, float]]]:
    """model label -> [(strength, value)] over the finished cells that have the value, sorted by strength."""
    out: dict[str, list[tuple[float, float]]] = {}
    for cell in report["cells"]:
        if cell.get("status") != "done":
            continue
        v = value(cell)
        if v is not None:
            out.setdefault(cell["model"], []).append((float(cell["strength"]), float(v)))
    return {model: sorted(points) for model, points in out.items()}


def max_loss_variation(cell: dict) -> float | None:
    """Fig. 3's quantity: the cell analysis' maximal loss variation in the eps-ball (None without analysis)."""
    return ((cell.get("analysis") or {}).get("loss_variation") or {}).get("max")


def _plot(title: str, ylabel: str, measured: dict, paper: dict | None = None, note: str | None = None,
          errors: dict | None = None):
    """`measured`/`paper`: model -> [(strength, value)]; `errors`: model -> [sd] aligned with `measured`
    (drawn as error bars; None entries, cells of a single seed, get none)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    colors = {}
    for model, points in measured.items():
        xs, ys = zip(*points)
        if errors is not None:
            sds = [0.0 if e is None else e for e in errors[model]]
            line = ax.errorbar(xs, ys, yerr=sds, marker="o", capsize=3, label=f"{model} (mean ± sd)").lines[0]
        else:
            (line,) = ax.plot(xs, ys, marker="o", label=model)
        colors[model] = line.get_color()
    for model, points in (paper or {}).items():
        xs, ys = zip(*points)
        ax.plot(xs, ys, linestyle=":", marker="*", markersize=12, color=colors.get(model),
                label=f"{model}: paper")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(STRENGTH_LABEL)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    if note:
        ax.annotate(note, xy=(0, 1), xycoords="axes fraction", xytext=(0, 2), textcoords="offset points",
                    fontsize=7, color="0.35", va="bottom")
        ax.set_title(title + "\n", fontsize=10)
    return fig


def make_figures(report: dict) -> dict[str, object]:
    """file name -> matplotlib Figure, for each figure the report has data for."""
    spec = report["spec"]
    where = f"{spec['name']}: {spec['dataset']['name']}, " + (f"defense {spec['defense']['name']}" if spec.get("defense")
                                                              else "given weights")
    if report.get("smoke"):
        where += " [SMOKE RUN: not a result]"
    figures = {}
    ge = _series(report, lambda c: c["metrics"].get("ge"))
    if ge:
        figures["fig2_ge.png"] = _plot(
            f"Fig. 2: generalization error vs defensive strength\n{where}",
            "GE = test − train cross-entropy (nats)", ge, _series(report, lambda c: _paper_value(c, "ge")))
    variation = _series(report, max_loss_variation)
    if variation:
        radii = sorted({c["analysis"]["eps"] for c in report["cells"] if max_loss_variation(c) is not None})
        figures["fig3_loss_variation.png"] = _plot(
            f"Fig. 3: max loss variation in the ε-ball vs defensive strength\n{where}",
            "max |CE(x′) − CE(x)| (nats)", variation,
            note=f"L∞ ball of radius {', '.join(f'{r:g}' for r in radii)}/255 around correctly classified training "
                 "samples; x′ still classified correctly")
    pgd = _series(report, lambda c: c["metrics"].get("pgd_acc"))
    if pgd:
        attacks = spec["evaluation"]["attacks"]
        label = attacks[0].get("label") or attacks[0]["name"] if attacks else "PGD"
        figures["fig4_pgd.png"] = _plot(
            f"Fig. 4: PGD accuracy vs defensive strength ({label})\n{where}",
            "accuracy under attack (%)", pgd, _series(report, lambda c: _paper_value(c, "pgd", "pgd_acc")))
    return figures


def make_seed_figures(summary: dict) -> dict[str, object]:
    """Figures 2-4 of an across-seeds summary (harness.seeds): the mean over seeds with ± one sd as error bars."""
    spec = summary["spec"]
    where = (f"{spec['name']}: {spec['dataset']['name']}, defense {spec['defense']['name']}, "
             f"seeds {', '.join(map(str, summary['seeds']))}")
    if summary.get("smoke"):
        where += " [SMOKE RUNS: not a result]"

    def series(key: str) -> tuple[dict, dict]:
        means: dict[str, list] = {}
        sds: dict[str, list] = {}
        for cell in sorted(summary["cells"], key=lambda c: c["strength"]):
            stats = cell["metrics"].get(key)
            if stats is not None:
                means.setdefault(cell["model"], []).append((float(cell["strength"]), stats["mean"]))
                sds.setdefault(cell["model"], []).append(stats["sd"])
        return means, sds

    figures = {}
    for name, key, title, ylabel in (
            ("fig2_ge_seeds.png", "ge", "Fig. 2: generalization error vs defensive strength",
             "GE = test − train cross-entropy (nats)"),
            ("fig3_loss_variation_seeds.png", "max_loss_variation",
             "Fig. 3: max loss variation in the ε-ball vs defensive strength", "max |CE(x′) − CE(x)| (nats)"),
            ("fig4_pgd_seeds.png", "pgd_acc", "Fig. 4: PGD accuracy vs defensive strength", "accuracy under attack (%)")):
        means, sds = series(key)
        if means:
            figures[name] = _plot(f"{title}\n{where}", ylabel, means, errors=sds)
    return figures


def write_figures(report: dict, out_dir: Path, figures: dict[str, object] | None = None) -> list[Path]:
    """Write the report's figures (or the given ones) as PNG into out_dir; return their paths."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in (make_figures(report) if figures is None else figures).items():
        FigureCanvasAgg(fig)
        path = out_dir / name
        # atomically through a temporary file of its own (harness.paths): readers never see half a file, and two
        # jobs drawing into one folder never share a temporary file
        write_atomic(path, lambda fh, fig=fig: fig.savefig(fh, format="png"))
        paths.append(path)
    return paths
