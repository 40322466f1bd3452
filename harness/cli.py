"""The `harness` command line.

Exit codes: 0 success; 2 bad input (spec, paths, plugin names or options; Click's usage errors too);
1 a failure while running (a cell failed). Bad input never prints a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from harness import registry
from harness.errors import HarnessError

console = Console()
err_console = Console(stderr=True)


def _fail(exc: HarnessError) -> None:
    err_console.print(f"error: {exc.message}", style="red", highlight=False, markup=False, soft_wrap=True)
    if exc.fix:
        err_console.print(f"fix: {exc.fix}", highlight=False, markup=False, soft_wrap=True)
    sys.exit(exc.exit_code)


class HarnessGroup(click.Group):
    """Turns HarnessError anywhere in a command into its message and exit code, without a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except HarnessError as exc:
            _fail(exc)


@click.group(cls=HarnessGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="harness")
def cli() -> None:
    """Evaluate what adversarial training does to spectrally-normalized networks.

    A JSON spec names a dataset, models, a defense with its defensive strengths and the attacks to evaluate
    with; `harness run SPEC` trains and evaluates every (model, strength) cell and prints the paper's table.
    """


@cli.command()
@click.argument("spec_path", metavar="SPEC", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", type=click.Path(path_type=Path, file_okay=False),
              help="Output folder (default: reports/<spec name>/).")
def run(spec_path: Path, out_dir: Path | None) -> None:
    """Train and evaluate every cell of SPEC; write report.json and print the table."""
    from harness import spec as spec_mod
    from harness.report import render_table
    from harness.runner import run as run_spec

    spec = spec_mod.load(spec_path)
    out_dir = out_dir or Path("reports") / spec["name"]
    report = run_spec(spec, out_dir, console)
    render_table(report, console)
    from harness.report import render_attack_table

    render_attack_table(report, console)
    console.print(f"report: {out_dir / 'report.json'}")
    failed = [c["id"] for c in report["cells"] if c["status"] != "done"]
    if failed:
        err_console.print(f"error: {len(failed)} cell(s) failed: {', '.join(failed)} (see report.json)",
                          style="red", markup=False)
        sys.exit(1)


@cli.command("eval")
@click.argument("spec_path", metavar="SPEC", type=click.Path(path_type=Path))
@click.option("--weights", required=True, type=click.Path(path_type=Path),
              help="A state_dict saved with torch.save; read with torch.load(weights_only=True).")
@click.option("--model", "model_label", help="The label of the spec's model to load into (default: the first).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path, file_okay=False),
              help="Output folder (default: reports/<spec name>-eval/).")
def eval_(spec_path: Path, weights: Path, model_label: str | None, out_dir: Path | None) -> None:
    """Evaluate existing WEIGHTS with SPEC's dataset, model, attacks and checks, without training."""
    from harness.weights import evaluate_checkpoint, read_spec
    from harness.report import render_attack_table

    spec = read_spec(spec_path)
    out_dir = out_dir or Path("reports") / f"{spec['name']}-eval"
    report = evaluate_checkpoint(spec, weights, out_dir, console, model_label)
    render_attack_table(report, console)
    console.print(f"report: {out_dir / 'report.json'}")


@cli.command()
@click.argument("spec_path", metavar="SPEC", type=click.Path(path_type=Path))
def validate(spec_path: Path) -> None:
    """Check SPEC (its JSON, the schema, plugin names and plugin options) without running anything."""
    from harness import spec as spec_mod
    from harness.runner import plan

    spec = spec_mod.load(spec_path)
    cells = plan(spec)
    console.print(f"{spec_path}: valid. {len(cells)} cell(s): " + ", ".join(c.id for c in cells), highlight=False)


@cli.command()
def plugins() -> None:
    """List every plugin of every group with the distribution providing it; try loading each."""
    table = Table(title="harness plugins", title_justify="left")
    for col in ("group", "name", "provided by", "target", "status"):
        table.add_column(col, overflow="fold", min_width=16 if col == "group" else None)  # group names whole
    failures = []
    for kind in registry.KINDS:
        for name, claims in registry.discover(kind).items():
            try:
                registry.load(kind, name)
                status = "ok"
            except HarnessError as exc:
                status = "[red]failed[/red]"
                failures.append(exc.message)
            for info in claims:
                table.add_row(registry.GROUPS[kind], name, info.provider, info.target, status)
    # piped output (grep, tests) gets a wide table: rich's 80-column default would fold names mid-word
    (console if console.is_terminal else Console(width=max(console.width, 160))).print(table)
    for message in failures:
        console.print(f"failed: {message}", style="red", markup=False, highlight=False, soft_wrap=True)


def main() -> None:
    cli(prog_name="harness")


if __name__ == "__main__":
    main()
