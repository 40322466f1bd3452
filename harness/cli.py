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
@click.option("--fresh", is_flag=True, help="Start over: delete this spec's cell results and checkpoints in the "
              "output folder first (by default finished cells are kept and interrupted ones resume).")
@click.option("--force", is_flag=True, help="Resume from checkpoints even though the training-relevant part of "
              "the spec changed since they were written (refused by default, exit 2).")
def run(spec_path: Path, out_dir: Path | None, fresh: bool, force: bool) -> None:
    """Train and evaluate every cell of SPEC; write report.json and print the table.

    Every epoch of every cell is checkpointed under OUT/checkpoints/. Running the same command again skips the
    finished cells and resumes the interrupted ones exactly; SIGINT/SIGTERM stop at the next step boundary after
    writing a checkpoint (exit 130/143).
    """
    import shlex

    from harness import spec as spec_mod
    from harness.interrupt import Interrupted
    from harness.paths import inside
    from harness.report import render_table
    from harness.runner import run as run_spec

    spec = spec_mod.load(spec_path)
    out_dir = out_dir or inside(Path("reports"), spec["name"], where="$.name")
    try:
        report = run_spec(spec, out_dir, console, fresh=fresh, force=force)
    except Interrupted as exc:
        exc.fix = f"resume with: harness run {shlex.quote(str(spec_path))} --out {shlex.quote(str(out_dir))}"
        raise
    render_table(report, console)
    console.print(f"report: {out_dir / 'report.json'}")
    failed = [c["id"] for c in report["cells"] if c["status"] != "done"]
    if failed:
        err_console.print(f"error: {len(failed)} cell(s) failed: {', '.join(failed)} (see report.json)",
                          style="red", markup=False)
        sys.exit(1)


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
        table.add_column(col, overflow="fold")
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
    console.print(table)
    for message in failures:
        console.print(f"failed: {message}", style="red", markup=False, highlight=False, soft_wrap=True)


def main() -> None:
    cli(prog_name="harness")


if __name__ == "__main__":
    main()
