"""The `harness` command line.

Exit codes: 0 success; 2 bad input (spec, paths, plugin names or options; Click's usage errors too);
1 a failure while running (a cell failed). Bad input never prints a traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from harness import registry
from harness.errors import HarnessError
from harness.tracking import KINDS as TRACKERS

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
        except KeyboardInterrupt as exc:  # Click would print "Aborted!" and exit 1; the shell's convention is 130
            from harness.interrupt import StoppedAtOnce

            if isinstance(exc, StoppedAtOnce):
                err_console.print("second SIGINT: stopped at once, without a checkpoint of the current step; the "
                                  "last checkpoint written stays, and the same command resumes from it",
                                  style="red", highlight=False, markup=False, soft_wrap=True)
            else:
                err_console.print("interrupted by SIGINT", style="red", highlight=False, markup=False)
            sys.exit(130)


@click.group(cls=HarnessGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="harness")
def cli() -> None:
    """Evaluate what adversarial training does to spectrally-normalized networks.

    A JSON spec names a dataset, models, a defense with its defensive strengths and the attacks to evaluate
    with; `harness run SPEC` trains and evaluates every (model, strength) cell and prints the paper's table.
    """


def figure_format_option(command):
    """--format png,pdf,svg of the commands that draw Figures 2-4 (harness.figures.parse_formats checks it)."""
    return click.option("--format", "figure_formats", default="png", show_default=True, metavar="FORMATS",
                        help="The figures' file formats, a comma-separated list of png, pdf and svg (vector "
                             "formats for papers): --format png,pdf.")(command)


def log_option(command):
    """--log KIND DIR (repeatable) of the commands that train: experiment tracking (harness.tracking)."""
    return click.option("--log", "log", multiple=True, nargs=2, metavar="KIND DIR",
                        type=(click.Choice(list(TRACKERS)), click.Path(path_type=Path, file_okay=False)),
                        help="Experiment tracking: `--log tensorboard DIR` writes TensorBoard scalars per epoch and "
                             "per cell, one run per cell under DIR/<spec name>-seed<N>/<cell id>/ (pip install "
                             "'harness[tensorboard]').")(command)


def spec_overrides(command):
    """The options of every command that reads a spec: --set PATH=VALUE (repeatable) and --download
    (harness.spec.apply_overrides; applied before validation and recorded in the report)."""
    command = click.option("--download", is_flag=True, help="Let the dataset plugin download missing data (sets "
                           "the spec's dataset.download; plugins that cannot download say so).")(command)
    return click.option("--set", "overrides", multiple=True, metavar="PATH=VALUE",
                        help="Override a spec value before validation (repeatable): --set training.lr=0.05 --set "
                             "defense.strengths=[0,8] --set models.0.options.spectral_norm=false; VALUE is JSON, "
                             "else a string.")(command)


@cli.command()
@click.argument("spec_path", metavar="SPEC", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", type=click.Path(path_type=Path, file_okay=False),
              help="Output folder (default: reports/<spec name>/, or reports/<spec name>-smoke/ with --smoke).")
@click.option("--smoke", is_flag=True,
              help="A pipeline check, not a result: one epoch of a few batches, few attack steps, small subsets "
                   "(the spec's \"smoke\" caps); synthetic stand-in data when the dataset is not on disk.")
@click.option("--data-root", type=click.Path(path_type=Path, file_okay=False),
              help="Folder holding the datasets (overrides the spec's dataset.root).")
@click.option("--cell", "cell_ids", multiple=True, metavar="ID",
              help="Run only this cell (repeatable); report.json then holds every cell of SPEC found in OUT/cells/.")
@click.option("--fresh", is_flag=True, help="Start over: delete this spec's cell results and checkpoints in the "
              "output folder first (by default finished cells are kept and interrupted ones resume).")
@click.option("--force", is_flag=True, help="Resume from checkpoints even though the training-relevant part of "
              "the spec changed since they were written (refused by default, exit 2).")
@click.option("--seed", type=click.IntRange(min=0, max=2**32 - 1), help="Run with this seed instead of the spec's (default output "
              "folder reports/<spec name>-seed<N>/); `harness report --across-seeds` summarises several seeds.")
@click.option("--keep-checkpoints", is_flag=True, help="With --smoke: keep each cell's checkpoint (by default a "
              "smoke run deletes it once the cell's result is written).")
@log_option
@figure_format_option
@spec_overrides
def run(spec_path: Path, out_dir: Path | None, smoke: bool, data_root: Path | None,
        cell_ids: tuple[str, ...], fresh: bool, force: bool, seed: int | None, keep_checkpoints: bool,
        log: tuple[tuple[str, Path], ...], overrides: tuple[str, ...], download: bool, figure_formats: str) -> None:
    """Train and evaluate every cell of SPEC; write report.json and print the table.

    Every epoch of every cell is checkpointed under OUT/checkpoints/. Running the same command again skips the
    finished cells and resumes the interrupted ones exactly; SIGINT/SIGTERM stop at the next step boundary after
    writing a checkpoint (exit 130/143). Under `torchrun --nproc_per_node=N -m harness run SPEC` each cell trains
    with DistributedDataParallel.
    """
    import shlex

    from harness import api
    from harness.figures import parse_formats
    from harness.interrupt import Interrupted
    from harness.report import render_table

    formats = parse_formats(figure_formats)  # before anything runs: a typo costs no training
    spec, out_dir, applied = api.prepare_run(spec_path, out_dir, overrides=overrides, download=download, smoke=smoke,
                                             data_root=data_root, seed=seed)
    try:  # figures: drawn by the run while it holds report.json's lock, from the report it wrote
        report, figures = api.execute_run(spec, out_dir, console, smoke=smoke, cells=cell_ids, fresh=fresh,
                                          force=force, overrides=applied, keep_checkpoints=keep_checkpoints,
                                          formats=formats, log=log)
    except Interrupted as exc:  # the command as the user ran it, but never --fresh: that would start over
        again = rerun_command(click.get_current_context(), drop=("fresh",), replace={"out_dir": out_dir})
        from harness.distributed import Distributed

        distributed = Distributed.from_env()
        if distributed is None or distributed.is_main:  # under torchrun the hint is printed once, by rank 0
            exc.fix = "resume with: " + " ".join(shlex.quote(a) for a in again)
        raise
    if report is None:  # a torchrun rank other than 0: rank 0 reports
        return
    render_table(report, console)
    from harness.report import render_attack_table

    render_attack_table(report, console)
    console.print(f"report: {out_dir / 'report.json'}")
    _write_figures(report, out_dir, figures)
    failed = [c["id"] for c in report["cells"] if c["status"] != "done"]
    if failed:
        err_console.print(f"error: {len(failed)} cell(s) failed: {', '.join(failed)} (see report.json)",
                          style="red", markup=False)
        sys.exit(1)


def default_out(spec: dict, seed: int | None, smoke: bool) -> Path:
    """`harness run`'s (and `harness submit`'s) output folder when --out is not given (harness.api.default_out)."""
    from harness.api import default_out as api_default_out

    return api_default_out(spec, seed, smoke)


@cli.command("eval")
@click.argument("spec_path", metavar="SPEC", type=click.Path(path_type=Path))
@click.option("--weights", required=True, type=click.Path(path_type=Path),
              help="A state_dict saved with torch.save; read with torch.load(weights_only=True).")
@click.option("--model", "model_label", help="The label of the spec's model to load into (default: the first).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path, file_okay=False),
              help="Output folder (default: reports/<spec name>-eval/).")
@click.option("--data-root", type=click.Path(path_type=Path, file_okay=False),
              help="Folder holding the datasets (overrides the spec's dataset.root; default ./data).")
@spec_overrides
def eval_(spec_path: Path, weights: Path, model_label: str | None, out_dir: Path | None, overrides: tuple[str, ...],
          download: bool, data_root: Path | None) -> None:
    """Evaluate existing WEIGHTS with SPEC's dataset, model, attacks and checks, without training."""
    from harness import api
    from harness.report import render_attack_table

    from harness.paths import inside

    spec, applied = api.prepare_evaluation(weights, spec_path, overrides=overrides, download=download,
                                           data_root=data_root)
    out_dir = out_dir or inside(Path("reports"), f"{spec['name']}-eval", where="$.name")
    from harness.interrupt import Interrupted
    from harness.report import render_cell_summary

    try:
        report = api.execute_evaluation(weights, spec, out_dir, console, model_label=model_label, overrides=applied)
    except Interrupted as exc:  # what was done is in OUT/eval-progress.json: the same command goes on from there
        import shlex

        again = rerun_command(click.get_current_context(), replace={"out_dir": out_dir})
        exc.fix = "resume with: " + shlex.join(again)
        raise
    render_cell_summary(report["cells"][0], console)  # clean accuracy, and the detail of every raised check
    render_attack_table(report, console)
    console.print(f"report: {out_dir / 'report.json'}")


@cli.command()
@click.argument("spec_path", metavar="SPEC", type=click.Path(path_type=Path))
@click.option("--eval", "as_evaluation", is_flag=True, help="Check SPEC as `harness eval` reads it (`defense` and "
              "`training` may be absent); a spec without both is checked so anyway.")
@spec_overrides
def validate(spec_path: Path, overrides: tuple[str, ...], download: bool, as_evaluation: bool) -> None:
    """Check SPEC (its JSON, the schema, plugin names and plugin options) without running anything.

    A spec without `defense` and `training` is an evaluation spec: it is checked as `harness eval` reads it, and
    `harness run` refuses it. Whatever validate accepts, the command it names can run."""
    from harness import api
    from harness.runner import plan
    from harness.spec import EvaluationSpec

    try:
        if as_evaluation:
            raise EvaluationSpec("checked as an evaluation spec")
        spec = api.validate(spec_path, overrides=overrides, download=download)
    except EvaluationSpec:
        from harness import weights

        spec = weights.read_spec(spec_path, api.overrides_list(overrides, download))
        models = ", ".join(m["label"] for m in spec["models"])
        console.print(f"{spec_path}: valid evaluation spec (models: {models}); evaluate weights with `harness eval "
                      f"{spec_path} --weights FILE`" + ("" if spec["training"] and spec["defense"] else
                                                        "; `harness run` needs `defense` and `training`"),
                      highlight=False, markup=False, soft_wrap=True)
        return
    cells = plan(spec)
    console.print(f"{spec_path}: valid. {len(cells)} cell(s): " + ", ".join(c.id for c in cells), highlight=False)


def _write_figures(report: dict, out_dir: Path, paths: list[Path] | None = None,
                   formats: tuple[str, ...] = ("png",)) -> None:
    """The analysis table (when cells have an analysis) and Figures 2-4 beside the report (`paths`: already drawn)."""
    from harness.analysis import render_analysis_table
    from harness.figures import write_figures
    from harness.paths import locked, report_lock

    render_analysis_table(report, console)
    if paths is None:
        with locked(report_lock(out_dir)):  # one writer of a folder's report and figures at a time
            paths = write_figures(report, out_dir, formats=formats)
    if paths:
        console.print("figures: " + ", ".join(str(p) for p in paths), highlight=False, soft_wrap=True)


@cli.command("report")
@click.argument("paths", metavar="DIR [DIR ...]", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", "out_dir", type=click.Path(path_type=Path, file_okay=False),
              help="Folder for the figures (and, when several reports merge, the merged report.json); "
                   "default: DIR itself when nothing is merged, else reports/<spec name>-merged/.")
@click.option("--no-figures", is_flag=True, help="Only print the table.")
@figure_format_option
@click.option("--across-seeds", is_flag=True, help="The DIRs are runs of one spec with different seeds "
              "(`harness run SPEC --seed N`): print mean ± sd per cell and write seeds.json and Figures 2-4 with "
              "error bars (default folder reports/<spec name>-seeds/).")
def report_command(paths: tuple[Path, ...], out_dir: Path | None, no_figures: bool, across_seeds: bool,
                   figure_formats: str) -> None:
    """Print the table and redraw Figures 2-4 of saved reports, without recomputing anything.

    Each DIR is the output folder of `harness run` (or a report.json file). The cells of several DIRs, such as
    cells run separately, merge into one table when their specs agree; a cell present in two DIRs is taken from
    the later one. With --across-seeds the DIRs are seeds of one experiment instead, summarised cell by cell.
    """
    from harness import merge
    from harness.figures import parse_formats
    from harness.report import render_table, write_json_atomic

    formats = parse_formats(figure_formats)

    if across_seeds:
        from harness import seeds
        from harness.paths import inside

        summary, notes = seeds.summarize(list(paths))
        for note in notes:
            err_console.print(f"note: {note}", highlight=False, markup=False, soft_wrap=True)
        seeds.render(summary, console)
        out_dir = out_dir or inside(Path("reports"), summary["spec"]["name"] + "-seeds", where="$.name")
        write_json_atomic(out_dir / "seeds.json", summary)
        console.print(f"across-seeds summary: {out_dir / 'seeds.json'}", highlight=False)
        if not no_figures:
            from harness.figures import make_seed_figures, write_figures

            paths = write_figures(summary, out_dir, make_seed_figures(summary), formats=formats)
            console.print("figures: " + ", ".join(str(p) for p in paths), highlight=False, soft_wrap=True)
        return

    report, notes, merged = merge.load(list(paths))
    if out_dir is None and merged:  # a name read from a file: through the sanitizer, as a spec's name is
        from harness.errors import BadInput
        from harness.paths import inside

        try:
            out_dir = inside(Path("reports"), f"{report['spec']['name']}-merged", where="$.spec.name")
        except BadInput as exc:
            raise BadInput(f"{exc.message} (the merged report's folder reports/<name>-merged is named after the "
                           "spec name of the first report given)",
                           fix="give the folder with --out DIR, or correct $.spec.name in that report") from exc
    for note in notes:
        err_console.print(f"note: {note}", highlight=False, markup=False, soft_wrap=True)
    from harness.report import render_attack_table, render_cell_summary

    for cell in report["cells"]:  # what `harness run` printed as each cell finished
        render_cell_summary(cell, console)
    render_table(report, console)
    render_attack_table(report, console)
    if out_dir is None:
        out_dir = paths[0] if paths[0].is_dir() else paths[0].parent
    if merged:
        from harness.paths import locked, report_lock

        with locked(report_lock(out_dir)):
            write_json_atomic(out_dir / "report.json", report)
        console.print(f"merged report: {out_dir / 'report.json'}", highlight=False)
    if no_figures:
        from harness.analysis import render_analysis_table

        render_analysis_table(report, console)
    else:
        _write_figures(report, out_dir, formats=formats)


@cli.command()
@click.argument("spec_path", metavar="SPEC", type=click.Path(path_type=Path))
@click.option("--out", "out_path", type=click.Path(path_type=Path, dir_okay=False),
              help="JSON file to write (default: reports/<spec name>/bench.json).")
@click.option("--cell", "cell_ids", multiple=True, metavar="ID", help="Benchmark only this cell (repeatable).")
@click.option("--batch-size", type=click.IntRange(min=1), help="Training batch (default: the spec's).")
@click.option("--eval-batch-size", type=click.IntRange(min=1), help="Evaluation batch (default: the spec's).")
@click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True, help="Untimed rounds.")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True, help="Timed rounds (median).")
@spec_overrides
def bench(spec_path: Path, out_path: Path | None, cell_ids: tuple[str, ...], batch_size: int | None,
          eval_batch_size: int | None, warmup: int, repeats: int, overrides: tuple[str, ...], download: bool) -> None:
    """Images/s and FLOPs per image of each cell's training step and evaluation, with the plain advertorch
    call and a hand-written PGD loop timed in the same run as ratios; writes JSON and prints a table."""
    from harness import bench as bench_mod
    from harness import spec as spec_mod
    from harness.paths import inside

    from harness.api import overrides_list

    applied = overrides_list(overrides, download)
    spec = spec_mod.load(spec_path, applied)
    doc = bench_mod.bench(spec, console, cell_ids=list(cell_ids), batch_size=batch_size,
                          eval_batch_size=eval_batch_size, warmup=warmup, repeats=repeats)
    if applied:
        doc["overrides"] = applied
    out_path = out_path or inside(Path("reports"), spec["name"], "bench.json", where="$.name")
    bench_mod.write(doc, out_path)
    bench_mod.render(doc, console)
    console.print(f"bench: {out_path}")


@cli.command()
@click.option("--device", "device_choice", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True, help="Where to check: auto is CUDA when torch sees a GPU, else the CPU.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path, file_okay=False),
              help="Folder for selftest.json (default: reports/selftest/).")
def selftest(device_choice: str, out_dir: Path | None) -> None:
    """Check that the harness computes correctly on this machine, in about a minute: a PGD-AT training run,
    advertorch vs foolbox PGD, bf16 vs fp32 attacks, the on-device data path, every adversary in its ball,
    exact resume, and the training step's speed; prints a table, writes selftest.json, exits 1 if a check fails."""
    from harness import selftest as selftest_mod
    from harness.errors import RunFailure

    out_dir = out_dir or Path("reports") / "selftest"
    doc = selftest_mod.run(device_choice, out_dir, console)
    selftest_mod.render(doc, console)
    console.print(f"selftest: {out_dir / 'selftest.json'}", highlight=False)
    failed = [c["name"] for c in doc["checks"] if c["status"] == "fail"]
    if failed:
        raise RunFailure(f"{len(failed)} selftest check(s) failed: {', '.join(failed)}",
                         fix="see the table and selftest.json; results computed on this machine are not to be "
                             "trusted until every check passes")


@cli.command()
@click.argument("spec_path", metavar="SPEC", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", type=click.Path(path_type=Path, file_okay=False),
              help="Output folder, as for `harness run` (default: reports/<spec name>/).")
@click.option("--executor", type=click.Choice(["slurm", "local"]),
              help="slurm (default): one Slurm array job per unfinished cell; local: the same jobs as processes on "
                   "this machine, in the foreground.")
@click.option("--cell", "cell_ids", multiple=True, metavar="ID",
              help="Submit only this cell (repeatable); a named cell is submitted even if it failed before.")
@click.option("--partition", help="Slurm partition.")
@click.option("--account", help="Slurm account.")
@click.option("--qos", help="Slurm quality of service.")
@click.option("--time", "time_limit", metavar="TIME", help="Time limit of each job: minutes or Slurm's "
              "[D-]HH:MM:SS (Slurm default 24:00:00; local: none). A longer cell is requeued from its checkpoint.")
@click.option("--gpus-per-cell", type=int, help="GPUs per cell (default 0); N > 1 trains the cell with DDP, one "
              "process per GPU.")
@click.option("--cpus-per-cell", type=int, help="CPUs per cell (divided over its processes).")
@click.option("--mem", help="Memory per cell, as Slurm's --mem (32G).")
@click.option("--array-parallelism", type=int, help="Most cells running at once (local default: one per free GPU "
              "slot, 1 without GPUs).")
@click.option("--constraint", help="Slurm node constraint.")
@click.option("--slurm-option", "slurm_options", multiple=True, metavar="KEY=VALUE",
              help="Any further sbatch option (repeatable), e.g. --slurm-option mail-user=me@lab.org.")
@click.option("--executor-config", type=click.Path(path_type=Path, dir_okay=False),
              help="A JSON file of these options (harness/schemas/executor.schema.json); the command line overrides it.")
@click.option("--data-root", type=click.Path(path_type=Path, file_okay=False),
              help="Folder holding the datasets, as for `harness run`.")
@click.option("--smoke", is_flag=True, help="Submit the smoke version of SPEC, as `harness run --smoke`.")
@click.option("--seed", type=click.IntRange(min=0, max=2**32 - 1), help="Run with this seed, as `harness run --seed`.")
@click.option("--dry-run", is_flag=True, help="Print what would be submitted; submit nothing.")
@log_option
@spec_overrides
def submit(spec_path: Path, out_dir: Path | None, executor: str | None, cell_ids: tuple[str, ...],
           partition: str | None, account: str | None, qos: str | None, time_limit: str | None,
           gpus_per_cell: int | None, cpus_per_cell: int | None, mem: str | None, array_parallelism: int | None,
           constraint: str | None, slurm_options: tuple[str, ...], executor_config: Path | None,
           data_root: Path | None, smoke: bool, seed: int | None, dry_run: bool, log: tuple[tuple[str, Path], ...],
           overrides: tuple[str, ...], download: bool) -> None:
    """Run SPEC's unfinished cells as jobs of a Slurm cluster (or of this machine), through submitit.

    Each job runs `harness run SPEC --out DIR --cell ID`. A job that reaches its time limit or is preempted
    writes its checkpoint at the next step boundary and is requeued; the requeued job resumes exactly. A cell
    that fails is not requeued and is not submitted again unless named with --cell. `harness status DIR` shows
    where every cell stands.
    """
    from harness import spec as spec_mod
    from harness import submit as submit_mod

    given = {"executor": executor, "partition": partition, "account": account, "qos": qos,
             "time": int(time_limit) if time_limit and time_limit.isdigit() else time_limit,
             "gpus_per_cell": gpus_per_cell, "cpus_per_cell": cpus_per_cell, "mem": mem,
             "array_parallelism": array_parallelism, "constraint": constraint,
             "slurm_options": submit_mod.parse_slurm_options(slurm_options)}
    options = submit_mod.read_options(executor_config, given)
    from harness.api import overrides_list

    applied = overrides_list(overrides, download)
    spec = spec_mod.load(spec_path, applied)
    out_dir = out_dir or default_out(spec, seed, smoke)
    code = submit_mod.submit(spec_path, spec, out_dir, options, cell_ids=list(cell_ids), data_root=data_root,
                             smoke=smoke, seed=seed, dry_run=dry_run, console=console, overrides=applied,
                             log=list(log))
    sys.exit(code)


@cli.command("status")
@click.argument("out_dir", metavar="DIR", type=click.Path(path_type=Path, file_okay=False))
@click.option("--watch", is_flag=True, help="Redraw every --interval seconds until no cell is queued or running.")
@click.option("--interval", type=click.FloatRange(min=0.1), default=30, show_default=True,
              help="Seconds between redraws with --watch.")
def status_command(out_dir: Path, watch: bool, interval: float) -> None:
    """Where each cell of a sweep stands (done, running, queued, failed, interrupted, not started), from the files
    in DIR alone; the last line counts them and gives the command that submits what is missing."""
    import time

    from harness import status as status_mod

    while True:
        states = status_mod.status(out_dir)
        if watch and console.is_terminal:
            console.clear()
        status_mod.render(states, console, out_dir)
        if not watch or not status_mod.active(states):
            return
        time.sleep(interval)


@cli.command()
@click.argument("name", required=False)
def plugins(name: str | None) -> None:
    """List every plugin of every group with the distribution providing it; try loading each.

    With NAME (a plugin's name, e.g. `harness plugins autoattack` or `harness plugins timm:resnet18`): that
    plugin's options, each with its type, default and description, as a spec's `options` takes them.
    """
    if name is not None:
        _show_plugin(name)
        return
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


def _show_plugin(name: str) -> None:
    """`harness plugins NAME`: each plugin of that name (one per kind) with its options from its options_schema."""
    from harness.errors import BadInput

    kinds = registry.kinds_named(name)
    if not kinds:
        names = sorted({n for kind in registry.KINDS for n in registry.discover(kind)})
        raise BadInput(registry.unknown_name_message("plugin", name, names),
                       fix="run `harness plugins` for every installed plugin with its group")
    wide = console if console.is_terminal else Console(width=max(console.width, 160))  # as the listing's table
    for kind in kinds:
        info = registry.resolve(kind, name)
        plugin = registry.load(kind, name)  # a plugin failing to import: its BadInput, exit 2
        summary = ((getattr(plugin, "__doc__", None) or "").strip().splitlines() or [""])[0]
        wide.print(f"{kind} {name} ({info.target}, from {info.provider})", markup=False, highlight=False)
        if summary:
            wide.print(summary, markup=False, highlight=False)
        rows = registry.option_rows(getattr(plugin, "options_schema", None) or {})
        if not rows:
            wide.print("options: none", markup=False, highlight=False)
            continue
        table = Table(title=f"options of {kind} {name}", title_justify="left")
        for col in ("option", "type", "default", "description"):
            table.add_column(col, overflow="fold")
        for row in rows:
            table.add_row(*row)
        wide.print(table)


_INVOKED_AS: list[str] | None = None  # set by main(): how this process's command line named the harness


def invoked_as() -> list[str]:
    """The words that run the harness as the user ran it, for the commands it prints to be run again (the resume
    hint): the console script as typed ('harness' when the shell finds that very file on PATH, else the path as
    given, e.g. .venv/bin/harness), `python -m harness` with the interpreter that runs it ('python' or 'python3'
    when PATH finds that very interpreter, else its path), `torchrun --nproc_per_node=N -m harness` under
    torchrun. 'harness' when the CLI is called in-process (tests, the Python API)."""
    return list(_INVOKED_AS) if _INVOKED_AS else ["harness"]


def rerun_command(ctx: click.Context, drop: tuple[str, ...] = (), replace: dict | None = None) -> list[str]:
    """The command line that runs ctx's command again with the parameters it was given, built from Click's own
    record of the command's parameters (ctx.params), so that an option added to the command later is never left
    out of a resume hint. `drop`: parameters left out (--fresh, which would start over); `replace`: parameter
    values to write instead of those given (the output folder actually used, when it was a default). Options at
    their default are left out; each option is written with its first long name."""
    replace = replace or {}
    words = [*invoked_as(), ctx.info_name or ctx.command.name or ""]
    for param in ctx.command.params:
        name = param.name or ""
        if name in drop:
            continue
        value = replace.get(name, ctx.params.get(name))
        if isinstance(param, click.Argument):
            words += [str(v) for v in value] if param.nargs != 1 else [str(value)]
            continue
        assert isinstance(param, click.Option)
        opt = next((o for o in param.opts if o.startswith("--")), param.opts[0])
        if param.is_flag:
            if value and param.secondary_opts == []:
                words.append(opt)
            elif param.secondary_opts and bool(value) != bool(param.default):
                words.append(opt if value else param.secondary_opts[0])
            continue
        if value is None or (not param.multiple and value == param.default):
            continue
        for item in value if param.multiple else [value]:
            words += [opt, *(str(v) for v in item)] if isinstance(item, tuple) else [opt, str(item)]
    return words


def _found_on_path(name: str, path: str) -> bool:
    import shutil

    found = shutil.which(name)
    return found is not None and os.path.abspath(found) == os.path.abspath(path)


def _invocation(argv0: str) -> list[str]:
    if os.path.basename(argv0) == "__main__.py":  # python -m harness (torchrun runs `python -m harness` too)
        if os.environ.get("TORCHELASTIC_RUN_ID") and os.environ.get("LOCAL_WORLD_SIZE"):
            return ["torchrun", f"--nproc_per_node={os.environ['LOCAL_WORLD_SIZE']}", "-m", "harness"]
        python = next((name for name in ("python", "python3") if _found_on_path(name, sys.executable)),
                      sys.executable)
        return [python, "-m", "harness"]
    if os.sep not in argv0 or _found_on_path(os.path.basename(argv0), argv0):
        return [os.path.basename(argv0)]
    return [argv0]


def main() -> None:
    # First, before anything imports torch: OpenMP's wait policy is read once, when torch loads libgomp. Idle
    # OpenMP threads then sleep instead of spinning against other processes (harness/threads.py).
    from harness import threads

    threads.prepare_environment()
    global _INVOKED_AS
    _INVOKED_AS = _invocation(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if not os.environ.get("TORCHELASTIC_RUN_ID"):
        cli(prog_name="harness")
        return
    # A torchrun worker: its files are written (atomically, flushed) and its process group destroyed when the
    # command returns; it then leaves without the interpreter's finalization, where gloo's threads can abort the
    # process ('terminate called without an active exception', exit -6 instead of the command's code; seen once in
    # a suite run, in the rank that finished first; pytorch/pytorch#179291 describes the finalization crash).
    try:
        cli(prog_name="harness")
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, (int, type(None))):
            print(exc.code, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
