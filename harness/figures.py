"""The paper's Figures 2-4 from a report, as PNG (and/or PDF, SVG: `--format png,pdf,svg`) files beside report.json.

- fig2_ge.png: GE (test - train cross-entropy) against defensive strength, a line per model;
- fig3_loss_variation.png: the maximal loss variation in the eps-ball of correctly classified training samples
  (the cells' `analysis`), against defensive strength;
- fig4_pgd.png: PGD accuracy against defensive strength.
Where a cell carries the paper's published values (a `paper` object with `ge` / `pgd`), they are drawn as stars
on a dotted line beside the measured ones.

The x ticks are the trained strengths; an axis of one strength does not extend below 0. Titles describe the
experiment (dataset, model labels, defense), not the spec's file name.

Only matplotlib's object-oriented API with the Agg canvas is used (no pyplot): no display, no global backend switch.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Callable

from harness.errors import BadInput
from harness.paths import write_atomic

STRENGTH_LABEL = "defensive strength ε (L∞, 0–255 scale)"
FORMATS = ("png", "pdf", "svg")  # what matplotlib's Agg/PDF/SVG backends write without extra dependencies
# pdf/svg embed the date by default: leave it out, so the same report draws byte-identical files
_METADATA = {"png": None, "pdf": {"CreationDate": None}, "svg": {"Date": None}}

# Readable names of the built-in datasets and defenses for titles; other plugins appear under their own name.
DATASET_TITLES = {"mnist": "MNIST", "cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "tiny-imagenet": "Tiny ImageNet",
                  "digits": "digits (8×8)", "synthetic": "synthetic data"}
DEFENSE_TITLES = {"none": "standard training", "pgd-at": "PGD adversarial training", "trades": "TRADES",
                  "fgsm-rs": "FGSM training with random start"}


def parse_formats(text: str) -> tuple[str, ...]:
    """`--format png,pdf,svg` -> ('png', 'pdf', 'svg'): a comma list of FORMATS, in order, without repeats."""
    import difflib

    formats: list[str] = []
    for item in (part.strip().lower().lstrip(".") for part in str(text).split(",")):
        if item not in FORMATS:
            close = difflib.get_close_matches(item, FORMATS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise BadInput(f"--format {text!r}: {item!r} is not a figure format{hint}",
                           fix=f"give a comma-separated list of {', '.join(FORMATS)}, e.g. --format png,pdf")
        if item not in formats:
            formats.append(item)
    return tuple(formats)


def describe_experiment(spec: dict) -> str:
    """'MNIST · LeNet, VGG16 · PGD adversarial training': dataset, the models' labels, the defense."""
    dataset = spec["dataset"]["name"]
    models = ", ".join(m.get("label") or m["name"] for m in spec.get("models", []))
    defense = spec.get("defense")
    trained = DEFENSE_TITLES.get(defense["name"], defense["name"]) if defense else "given weights"
    return " · ".join(part for part in (DATASET_TITLES.get(dataset, dataset), models, trained) if part)


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
    _strength_axis(ax, [x for series in (measured, paper or {}) for points in series.values() for x, _ in points])
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


def _strength_axis(ax, strengths: list[float]) -> None:
    """Ticks at the trained strengths (not matplotlib's 0, 5, 10, ...); one strength gets an axis around it that
    does not reach below 0 (matplotlib would centre a lone 0 on -0.05..0.05)."""
    ticks = sorted(set(strengths))
    if not ticks:
        return
    ax.set_xticks(ticks, labels=[f"{t:g}" for t in ticks], rotation=45 if len(ticks) > 10 else 0)
    if len(ticks) == 1:
        (s,) = ticks
        pad = max(1.0, abs(s) * 0.25)
        ax.set_xlim(max(0.0, s - pad) if s >= 0 else s - pad, s + pad)
        for artist in ax.lines:  # a point at the left edge (strength 0) is drawn whole, not cut by the frame
            artist.set_clip_on(False)


def make_figures(report: dict) -> dict[str, object]:
    """file name -> matplotlib Figure, for each figure the report has data for."""
    spec = report["spec"]
    where = describe_experiment(spec)
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
    where = f"{describe_experiment(spec)} · seeds {', '.join(map(str, summary['seeds']))}"
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


def write_figures(report: dict, out_dir: Path, figures: dict[str, object] | None = None,
                  formats: tuple[str, ...] | list[str] = ("png",)) -> list[Path]:
    """Write the report's figures (or the given ones) into out_dir, one file per figure and format (FORMATS;
    fig2_ge.png, fig2_ge.pdf, ...); return their paths."""
    from matplotlib import rc_context
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in (make_figures(report) if figures is None else figures).items():
        FigureCanvasAgg(fig)
        for fmt in formats:
            path = out_dir / f"{Path(name).stem}.{fmt}"
            # atomically through a temporary file of its own (harness.paths): readers never see half a file, and
            # two jobs drawing into one folder never share a temporary file
            # drawn in memory first: the PDF and SVG backends accept only real files or file-likes with
            # tell/seek, not write_atomic's counting wrapper
            # (svg.hashsalt: fixed clip-path ids instead of random ones, for reproducible SVG files)
            buffer = io.BytesIO()
            with rc_context({"svg.hashsalt": "harness"}):
                fig.savefig(buffer, format=fmt, metadata=_METADATA[fmt])
            write_atomic(path, lambda fh, data=buffer.getvalue(): fh.write(data))
            paths.append(path)
    return paths
