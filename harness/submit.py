"""`harness submit`: the cells of a spec as jobs of a Slurm cluster or of this machine, through submitit.

submitit (its SlurmExecutor and LocalExecutor, job arrays, Checkpointable requeue) does the scheduling; this
module only decides which cells to submit, with which options, and what each job runs: `CellTask`, which calls
the `harness run` Click command itself with `SPEC --out DIR --cell ID`, so a job makes exactly the skip/resume
decisions, checkpoints, failure records and report of a plain `harness run --cell`.

Preemption and time limits. Slurm sends SIGUSR2 `signal_delay_s` before a job's time limit (submitit's
`--signal=USR2@...`, also sent on preemption where the cluster is configured so); preemption and `scontrol
requeue` send SIGTERM. While a cell runs, the harness's InterruptGuard takes both (harness.interrupt.also_stop_on
adds SIGUSR2): training stops at the next step boundary after writing its checkpoint. Then
- SIGUSR2: the signal is handed back to submitit's own handler, which calls `CellTask.checkpoint` and requeues the
  job (`scontrol requeue`; the local executor restarts it). The requeued job runs the same command, which resumes
  the checkpoint exactly. submitit's handler alone would requeue at once, mid-step, losing the epoch so far.
- SIGTERM under Slurm: Slurm itself requeues a preempted or `scontrol requeue`d job (and leaves a cancelled one
  cancelled), so the task only exits. The local executor has no scheduler: SIGTERM is requeued like SIGUSR2 there,
  and SIGINT (its cancel) is not.
A cell that failed (a non-finite loss, bad input) is never requeued: submitit requeues only on those signals. The
failure is in OUT/cells/<id>.json (written by the run) or, for bad input, in the task record below, and `harness
submit` skips a failed cell unless --cell names it.

Files under OUT/submit/ (`harness status` reads them; it never asks the scheduler):
- spec-<sha>.json   the spec file as submitted; jobs read this copy, so editing SPEC changes nothing queued
- executor.json     the options of the last submission (a valid --executor-config)
- submissions.json  every submission: time, executor, spec, cells with their job ids, the log folder
- tasks/<cell>.json what the cell's job last did: running (host, pid, attempt), requeued, stopped, failed, done;
                    while it runs, its `heartbeat` time, refreshed every `heartbeat_s` seconds (HEARTBEAT_S, or
                    the environment's HARNESS_HEARTBEAT_S) by a daemon thread of the job: a job killed outright
                    (node failure, SIGKILL, the OOM killer) writes nothing more, and `harness status` shows its cell
                    interrupted once the heartbeat is a few intervals old, without asking Slurm
- logs/<job id>/    submitit's pickles and each job's stdout/stderr

The report. Each job rebuilds report.json from the cell files as `harness run --cell` does; two jobs finishing
together could each read cells/ before the other's file existed, and the later write would lack a cell. So a job
that finds every cell of its submission finished reassembles report.json once more (`harness run --cell <the done
cells>`, which only skips and reassembles): the last job to finish has seen every cell file.

Multi-GPU cells (gpus_per_cell N > 1): the job has N tasks (one process per GPU, submitit's tasks_per_node); each
gets the torchrun variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) from submitit's
TorchDistributedEnvironment, so the cell trains through harness.distributed exactly as under torchrun.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import submitit
import submitit.helpers

from harness import integrity
from harness.errors import BadInput, HarnessError
from harness.interrupt import Interrupted, also_stop_on
from harness.paths import inside
from harness.report import write_json_atomic

STATE_DIR = "submit"
DEFAULTS = {"executor": "slurm", "gpus_per_cell": 0, "signal_delay_s": 120, "max_timeouts": 20}
SLURM_DEFAULT_TIME = "24:00:00"  # when neither --time nor the config sets one (submitit's own default is 5 min)
HEARTBEAT_S = 60.0  # seconds between a running task's heartbeats (HARNESS_HEARTBEAT_S overrides, e.g. in tests)
TORCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


# ------------------------------------------------------------------------------------- options


def _schema() -> dict:
    from harness.spec import load_schema

    return load_schema("executor.schema.json")


def parse_time(value: int | str) -> int:
    """Slurm's time formats (minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) as whole minutes (at least 1)."""
    if isinstance(value, int):
        return value
    days, _, rest = value.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:
        h, m, s = (parts + [0, 0])[:3]
    elif len(parts) == 3:
        h, m, s = parts
    else:
        h, m, s = 0, parts[0], parts[1] if len(parts) == 2 else 0
    return max(1, int(days or 0) * 1440 + h * 60 + m + (1 if s else 0))


def read_options(config: Path | None, given: dict[str, Any]) -> dict[str, Any]:
    """The executor options: DEFAULTS, then the config file's, then the command line's (None = not given).

    Both sources are validated against schemas/executor.schema.json; a problem is a BadInput naming its JSON path
    in the file, or the option on the command line."""
    from harness.spec import read_json, schema_errors

    doc: dict[str, Any] = {}
    if config is not None:
        doc = read_json(config, "executor config")
        errors = schema_errors(doc, _schema())
        if errors:
            raise BadInput(f"executor config {config} is invalid:\n  " + "\n  ".join(errors),
                           fix="correct those entries (schema: harness/schemas/executor.schema.json)")
    cli = {k: v for k, v in given.items() if v is not None}
    errors = schema_errors(cli, _schema())
    if errors:
        as_options = [re.sub(r"^\$\.(\w+)", lambda m: "--" + m.group(1).replace("_", "-"), e) for e in errors]
        raise BadInput("invalid option:\n  " + "\n  ".join(as_options), fix="see `harness submit --help`")
    options = {**DEFAULTS, **doc, **cli}
    options["slurm_options"] = {**doc.get("slurm_options", {}), **cli.get("slurm_options", {})}
    if options["executor"] == "slurm":
        options.setdefault("time", SLURM_DEFAULT_TIME)
    return options


def parse_slurm_options(pairs: tuple[str, ...]) -> dict[str, str] | None:
    """`--slurm-option key=value` (repeatable) as a dict; None when none was given."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise BadInput(f"--slurm-option {pair!r}: expected key=value",
                           fix="e.g. --slurm-option mail-user=me@lab.org")
        out[key.lstrip("-")] = value
    return out or None


def slurm_parameters(options: dict, job_name: str) -> dict[str, Any]:
    """submitit.SlurmExecutor parameters (sbatch options) for one cell's job."""
    gpus = options["gpus_per_cell"]
    tasks = max(1, gpus)
    params: dict[str, Any] = {"job_name": job_name, "time": parse_time(options["time"]), "ntasks_per_node": tasks,
                              "signal_delay_s": options["signal_delay_s"]}
    for key in ("partition", "account", "qos", "constraint", "mem", "array_parallelism", "setup"):
        if options.get(key) is not None:
            params[key] = options[key]
    if gpus:
        params["gpus_per_node"] = gpus
    if options.get("cpus_per_cell") is not None:
        if options["cpus_per_cell"] % tasks:
            raise BadInput(f"--cpus-per-cell {options['cpus_per_cell']} does not divide over the cell's {tasks} "
                           "processes (one per GPU)", fix=f"use a multiple of {tasks}")
        params["cpus_per_task"] = options["cpus_per_cell"] // tasks
    if options["slurm_options"]:
        params["additional_parameters"] = dict(options["slurm_options"])
    return params


def local_slots(options: dict) -> list[list[int]]:
    """The local executor's slots: one GPU list per cell that may run at once ([] on the CPU)."""
    gpus = options["gpus_per_cell"]
    if gpus == 0:
        return [[] for _ in range(options.get("array_parallelism") or 1)]
    import torch

    visible = torch.cuda.device_count()
    slots = [list(range(i * gpus, (i + 1) * gpus)) for i in range(visible // gpus)]
    if not slots:
        raise BadInput(f"--gpus-per-cell {gpus}, but this machine shows {visible} GPU(s)",
                       fix="ask for fewer GPUs per cell, or --gpus-per-cell 0 to train on the CPU")
    return slots[: options.get("array_parallelism") or len(slots)]


# ------------------------------------------------------------------------------------- files under OUT/submit


def state_dir(out_dir: Path) -> Path:
    return Path(out_dir) / STATE_DIR


def task_record_path(out_dir: Path, cell_id: str) -> Path:
    return inside(state_dir(out_dir) / "tasks", cell_id + ".json", where=f"cell {cell_id!r}")


def read_json_file(path: Path) -> Any:
    """A JSON file written by this module (atomically), or None when absent or not readable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def submissions(out_dir: Path) -> list[dict]:
    found = read_json_file(state_dir(out_dir) / "submissions.json")
    return found if isinstance(found, list) else []


def _now(timespec: str = "seconds") -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec=timespec)


# One writer of the task record at a time within a job: the heartbeat thread reads, changes and writes the record
# as the main thread does. Reentrant: submitit's signal handler (CellTask.checkpoint) writes from the main thread,
# possibly while that thread is inside a write already.
_RECORD_LOCK = threading.RLock()


def _update_task_record(out_dir: Path, cell_id: str, job_id: str, **fields) -> dict:
    """Change the cell's task record (a new one for another job id; a new attempt for state=running); the record
    as written."""
    with _RECORD_LOCK:
        path = task_record_path(out_dir, cell_id)
        record = read_json_file(path) or {}
        if record.get("job_id") != job_id:
            record = {"cell": cell_id, "job_id": job_id, "attempt": 0}
        if fields.get("state") == "running":
            record["attempt"] = record.get("attempt", 0) + 1
            record["started"] = _now()
            for stale in ("signal", "error", "fix", "message"):
                record.pop(stale, None)
        record.update(fields, updated=_now())
        write_json_atomic(path, record)
        return record


def heartbeat_interval() -> float:
    """Seconds between heartbeats: HARNESS_HEARTBEAT_S when it is a positive number, else HEARTBEAT_S."""
    try:
        value = float(os.environ.get("HARNESS_HEARTBEAT_S", ""))
    except ValueError:
        return HEARTBEAT_S
    return value if value > 0 else HEARTBEAT_S


def _beat(out_dir: Path, cell_id: str, job_id: str, attempt: int) -> bool:
    """Refresh the record's heartbeat while it still says this attempt of this job is running; False once not."""
    with _RECORD_LOCK:
        path = task_record_path(out_dir, cell_id)
        record = read_json_file(path) or {}
        if (record.get("job_id"), record.get("attempt"), record.get("state")) != (job_id, attempt, "running"):
            return False  # the job moved on (requeued, failed, done) or another job took the cell
        record["heartbeat"] = _now("milliseconds")
        write_json_atomic(path, record)
        return True


class Heartbeat:
    """While a cell runs: a daemon thread refreshing its task record's heartbeat every `interval` seconds.

    A daemon thread dies with its process, whatever kills it, which is the point: no heartbeat, no job. A failed
    write (a full or unreachable disk) is skipped, not fatal: the cell's own writes report such a disk."""

    def __init__(self, out_dir: Path, cell_id: str, job_id: str, attempt: int, interval: float):
        self.args, self.interval = (out_dir, cell_id, job_id, attempt), interval
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, name=f"heartbeat {cell_id}", daemon=True)

    def _loop(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                if not _beat(*self.args):
                    return
            except Exception as exc:  # noqa: BLE001 - a missed heartbeat must never stop the cell
                print(f"heartbeat not written: {exc}", file=sys.stderr, flush=True)

    def __enter__(self) -> Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()


def _save_submission(out_dir: Path, entry: dict) -> None:
    """Add or replace (same `id`) one entry of submissions.json."""
    entries = [e for e in submissions(out_dir) if e.get("id") != entry["id"]]
    write_json_atomic(state_dir(out_dir) / "submissions.json", entries + [entry])


# ------------------------------------------------------------------------------------- what a job runs


@dataclass
class RunArgs:
    """The `harness run` command a job runs (absolute paths: a job may start in another folder)."""

    spec: str
    out: str
    data_root: str | None = None
    smoke: bool = False
    seed: int | None = None
    overrides: tuple[str, ...] = ()  # --set PATH=VALUE (and --download as dataset.download=true)
    log: tuple[tuple[str, str], ...] = ()  # --log KIND DIR (experiment tracking, harness.tracking)

    def argv(self, cell_ids: list[str]) -> list[str]:
        args = [self.spec, "--out", self.out]
        args += ["--data-root", self.data_root] if self.data_root else []
        args += ["--smoke"] if self.smoke else []
        args += ["--seed", str(self.seed)] if self.seed is not None else []
        args += [a for override in self.overrides for a in ("--set", override)]
        args += [a for kind, folder in self.log for a in ("--log", kind, folder)]
        return args + [a for cell_id in cell_ids for a in ("--cell", cell_id)]


class TaskFailed(RuntimeError):
    """The cell's run failed (recorded in OUT/submit/tasks/ and, for a run failure, OUT/cells/); not requeued."""


def _usr_signal() -> signal.Signals:
    return signal.Signals["SIG" + submitit.JobEnvironment.USR_SIG]  # submitit's preemption/timeout signal


@dataclass
class CellTask(submitit.helpers.Checkpointable):
    """One cell's job: `harness run SPEC --out DIR --cell ID`, through the run command itself.

    `batch` lists the cells submitted together and `plan`/`digest` identify the spec's cells, for the final
    report rebuild (module doc)."""

    run: RunArgs
    cell_id: str
    batch: list[str]
    plan: list[str]
    digest: str
    executor: str
    cwd: str

    def __call__(self) -> dict:
        os.chdir(self.cwd)  # relative paths inside the spec (dataset.root) mean what they meant at submission
        env = submitit.JobEnvironment()
        if env.num_tasks > 1:  # one process per GPU: the variables torchrun would set, for harness.distributed
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        main = env.global_rank == 0
        out = Path(self.run.out)
        beat = contextlib.nullcontext()
        if main:
            interval = heartbeat_interval()
            record = _update_task_record(out, self.cell_id, env.job_id, state="running", host=socket.gethostname(),
                                         pid=os.getpid(), executor=self.executor, processes=env.num_tasks,
                                         heartbeat=_now("milliseconds"), heartbeat_s=interval)
            beat = Heartbeat(out, self.cell_id, env.job_id, record["attempt"], interval)
        try:
            with beat, also_stop_on(_usr_signal()):
                code = _run_command(self.run.argv([self.cell_id]))
        except Interrupted as exc:
            self._interrupted(exc, env, main)
        except (KeyboardInterrupt, click.exceptions.Abort):  # a second SIGINT: the local executor's cancel after
            if main:                                          # Ctrl-C (the last epoch's checkpoint is kept)
                _update_task_record(out, self.cell_id, env.job_id, state="stopped", signal="SIGINT",
                                    message="stopped by a second SIGINT before the step's checkpoint")
            sys.exit(130)
        except HarnessError as exc:  # bad input: recorded, never requeued
            if main:
                _update_task_record(out, self.cell_id, env.job_id, state="failed", error=exc.message, fix=exc.fix)
            print(f"error: {exc}", file=sys.stderr, flush=True)
            raise TaskFailed(str(exc)) from None
        if not main:
            return {"cell": self.cell_id, "rank": env.global_rank}
        try:  # verified and validated, as the run and `harness status` read it
            cell = integrity.read_cell(out / "cells" / f"{self.cell_id}.json") or {}
        except BadInput as exc:
            cell = {"error": exc.message}
        if cell.get("status") != "done":  # the run exits 1 when any cell of its report failed: ask the cell itself
            error = cell.get("error") or f"`harness run` exited with code {code} without a result for this cell"
            _update_task_record(out, self.cell_id, env.job_id, state="failed", error=error)
            raise TaskFailed(f"cell {self.cell_id} failed: {error}")
        _update_task_record(out, self.cell_id, env.job_id, state="done")
        self._rebuild_report_if_last()
        return {"cell": self.cell_id, "status": "done", "metrics": cell.get("metrics")}

    def _interrupted(self, exc: Interrupted, env, main: bool) -> None:
        """The run stopped at a step boundary after its checkpoint: requeue (submitit) or exit (module doc)."""
        usr = _usr_signal()
        requeue = exc.signum == usr or (exc.signum == signal.SIGTERM and self.executor == "local")
        by_slurm = exc.signum == signal.SIGTERM and self.executor == "slurm" and main and _slurm_requeued()
        name = signal.Signals(exc.signum).name
        if main:
            _update_task_record(Path(self.run.out), self.cell_id, env.job_id, signal=name, message=exc.message,
                                state="requeued" if requeue or by_slurm else "stopped")
        what = "requeuing" if requeue else "exiting; Slurm requeues the job" if by_slurm else "exiting"
        print(f"{exc.message}; {what}", file=sys.stderr, flush=True)
        if requeue:
            try:
                # submitit's handler (back in place since the guard exited): checkpoint() and requeue; it exits
                # the process (the local executor restarts it, Slurm requeues it); other ranks return here.
                signal.raise_signal(usr)
            except Exception as not_requeued:  # e.g. "timed-out too many times"
                if main:
                    _update_task_record(Path(self.run.out), self.cell_id, env.job_id, state="failed",
                                        error=f"not requeued: {not_requeued}")
                raise
        sys.exit(exc.exit_code)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Called by submitit before it requeues: the cell's state is already in OUT/checkpoints/<id>.pt (the run
        wrote it at the step boundary), so the same task is resubmitted unchanged."""
        record = read_json_file(task_record_path(Path(self.run.out), self.cell_id)) or {}
        if record.get("state") == "running":  # the signal came outside the run's guard (starting, reporting)
            env = submitit.JobEnvironment()
            _update_task_record(Path(self.run.out), self.cell_id, env.job_id, state="requeued",
                                signal=_usr_signal().name)
        return super().checkpoint(*args, **kwargs)

    def _rebuild_report_if_last(self) -> None:
        out = Path(self.run.out)
        if not all(_finished(out, c) for c in self.batch):
            return
        done, finished = [], {}
        for cell_id in self.plan:
            try:  # verified and validated: what the reassembling run will read
                cell = integrity.read_cell(out / "cells" / f"{cell_id}.json")
            except integrity.Unusable:  # not a cell result: as if missing (the run would evaluate that cell again)
                continue
            except BadInput as exc:  # damaged: every run in this folder stops on it until it is deleted
                print(f"report.json not reassembled ({exc.message}); {exc.fix}", file=sys.stderr, flush=True)
                return
            if cell is not None and cell.get("spec_digest") == self.digest:
                finished[cell_id] = cell
                if cell.get("status") == "done":
                    done.append(cell_id)
        report = read_json_file(out / "report.json")
        held = {c.get("id"): c for c in report.get("cells", [])} if isinstance(report, dict) else {}
        if not done or all(held.get(cell_id) == cell for cell_id, cell in finished.items()):
            return  # nothing to assemble, or report.json already holds every finished cell as its file has it
        for var in TORCH_VARS:  # the rebuild is one process, not a DDP group
            os.environ.pop(var, None)
        print(f"every cell of this submission has finished: reassembling report.json from {len(done)} done cell(s)",
              flush=True)
        try:
            _run_command(self.run.argv(done))
        except HarnessError as exc:  # a signal or a problem while reassembling: the cells themselves are done
            print(f"report.json not reassembled ({exc.message}); `harness report {out}` merges the cell files",
                  file=sys.stderr, flush=True)


def _slurm_requeued() -> bool:
    """Whether Slurm is requeuing this job (preemption, `scontrol requeue`) rather than ending it (scancel): its
    restart count is already one more than this run's. scontrol answers from the compute node, as for submitit's
    own requeue; when it does not, the job counts as ended (status then shows it interrupted)."""
    import subprocess

    try:
        shown = subprocess.run(["scontrol", "show", "job", "-o", os.environ["SLURM_JOB_ID"]], capture_output=True,
                               text=True, timeout=20).stdout
        restarts = int(re.search(r"\bRestarts=(\d+)", shown).group(1))
    except (OSError, KeyError, AttributeError, ValueError, subprocess.SubprocessError):
        return False
    return restarts > int(os.environ.get("SLURM_RESTART_COUNT") or 0)


def _finished(out: Path, cell_id: str) -> bool:
    """The cell's job will write nothing more: its result file exists, or its task record says it failed."""
    record = read_json_file(task_record_path(out, cell_id)) or {}
    return (out / "cells" / f"{cell_id}.json").exists() or record.get("state") == "failed"


def _run_command(argv: list[str]) -> int:
    """`harness run ARGV` through its Click command, in this process; HarnessError propagates (no exit)."""
    from harness.cli import run as run_command

    try:
        run_command.main(args=argv, prog_name="harness run", standalone_mode=False)
    except SystemExit as exc:
        if exc.code != 1:  # submitit's requeue exit (SIGUSR2 outside the run's guard, e.g. while loading data)
            raise
        return 1  # the command's own exit when a cell of its report failed
    return 0


# ------------------------------------------------------------------------------------- submitting


@dataclass
class Plan:
    """What `harness submit` will do: the cells to submit and why the others are left out."""

    submit: list[str]
    skipped: dict[str, str]  # cell id -> reason


def choose_cells(out_dir: Path, spec: dict, named: list[str]) -> Plan:
    """Cells to submit: those not done, not failed and not queued or running; with --cell, the named ones unless
    done (a named failed or apparently running cell is submitted: the user has looked at it)."""
    from harness.runner import plan as plan_cells, select
    from harness.status import cell_states

    ids = [c.id for c in select(plan_cells(spec), named)]
    states = {s.cell: s for s in cell_states(out_dir, spec)}
    chosen, skipped = [], {}
    for cell_id in ids:
        state = states[cell_id]
        if state.state == "done":
            skipped[cell_id] = "done"
        elif not named and state.state in ("failed", "queued", "running"):
            skipped[cell_id] = state.state + (f" ({state.detail})" if state.detail else "")
        else:
            chosen.append(cell_id)
    return Plan(chosen, skipped)


def effective_spec(spec: dict, data_root: Path | None, seed: int | None, smoke: bool) -> dict:
    """The spec as `harness run` will run it with these options (cell ids and digests are computed on this)."""
    import copy

    from harness import smoke as smoke_mod

    spec = copy.deepcopy(spec)
    if data_root is not None:
        spec["dataset"]["root"] = str(data_root)
    if seed is not None:
        spec["seed"] = seed
    return smoke_mod.apply(spec)[0] if smoke else spec


def submit(spec_path: Path, spec: dict, out_dir: Path, options: dict, *, cell_ids: list[str], data_root: Path | None,
           smoke: bool, seed: int | None, dry_run: bool, console, overrides: list[str] | None = None,
           log: list[tuple[str, Path]] | None = None) -> int:
    """Submit the cells (see the module doc); returns the exit code (local: 1 unless every cell ended done).
    `log`: the (kind, folder) pairs of `harness run --log`, passed to every job (checked here, before submitting)."""
    from harness import tracking
    from harness.runner import plan as plan_cells, spec_digest

    pairs = tracking.parse(log)
    if pairs and not dry_run:
        tracking.create(pairs).close()  # the library is installed and the folders creatable, before any job starts
    log_args = tuple((kind, str(Path(folder).resolve())) for kind, folder in pairs)  # jobs may start elsewhere

    effective = effective_spec(spec, data_root, seed, smoke)
    chosen = choose_cells(out_dir, effective, cell_ids)
    for cell_id, why in chosen.skipped.items():
        console.print(f"cell {cell_id}: not submitted: {why}", highlight=False, markup=False)
    if any(why.startswith("failed") for why in chosen.skipped.values()):
        console.print("a failed cell is submitted again only when named: fix the cause, then add --cell ID",
                      highlight=False, markup=False)
    if not chosen.submit:
        console.print("nothing to submit", highlight=False)
        return 0
    executor_kind = options["executor"]
    job_name = f"harness-{effective['name']}"
    out_abs = Path(out_dir).resolve()
    spec_text = Path(spec_path).read_bytes()
    copy_path = state_dir(out_abs) / f"spec-{hashlib.sha256(spec_text).hexdigest()[:12]}.json"
    overrides = tuple(overrides or ())  # `spec` has them applied; each job's `harness run` applies them again
    run_args = RunArgs(str(copy_path), str(out_abs), str(Path(data_root).resolve()) if data_root else None, smoke,
                       seed, overrides, log_args)

    if dry_run:
        shown = {k: v for k, v in options.items() if v not in (None, {}, [])}
        console.print(f"dry run: would submit {len(chosen.submit)} cell(s) to the {executor_kind} executor with "
                      f"{json.dumps(shown)}", highlight=False, markup=False, soft_wrap=True)
        if executor_kind == "slurm":
            console.print("sbatch options per cell: " + json.dumps(slurm_parameters(options, job_name)),
                          highlight=False, markup=False, soft_wrap=True)
        plain = RunArgs(str(spec_path), str(out_dir), str(data_root) if data_root else None, smoke, seed, overrides,
                        tuple((kind, str(folder)) for kind, folder in pairs))
        for cell_id in chosen.submit:
            console.print(f"  {cell_id}: harness run " + shlex.join(plain.argv([cell_id])), highlight=False,
                          markup=False, soft_wrap=True)
        return 0

    if executor_kind == "slurm" and shutil.which("sbatch") is None:
        raise BadInput("--executor slurm: `sbatch` is not on this machine's PATH",
                       fix="run `harness submit` on a Slurm login node, or use --executor local")
    copy_path.parent.mkdir(parents=True, exist_ok=True)
    if not copy_path.exists():
        copy_path.write_bytes(spec_text)
    write_json_atomic(state_dir(out_abs) / "executor.json", {k: v for k, v in options.items() if v is not None})
    tasks = {cell_id: CellTask(run_args, cell_id, list(chosen.submit), [c.id for c in plan_cells(effective)],
                               spec_digest(effective), executor_kind, os.getcwd())
             for cell_id in chosen.submit}
    entry = {"id": f"{time.time_ns():x}", "time": _now(), "executor": executor_kind, "spec": str(spec_path),
             "spec_copy": str(copy_path), "cwd": os.getcwd(), "out": str(out_dir), "resolved_spec": effective,
             "run_options": {"data_root": str(data_root) if data_root else None, "smoke": smoke, "seed": seed,
                             "overrides": list(overrides), "log": [list(pair) for pair in log_args]},
             "log_folder": str(state_dir(out_abs) / "logs"), "jobs": {cell_id: None for cell_id in chosen.submit}}
    folder = state_dir(out_abs) / "logs" / "%j"
    if executor_kind == "slurm":
        executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=options["max_timeouts"])
        executor.update_parameters(**slurm_parameters(options, job_name))
        with executor.batch():
            jobs = {cell_id: executor.submit(task) for cell_id, task in tasks.items()}
        entry["jobs"] = {cell_id: job.job_id for cell_id, job in jobs.items()}
        _save_submission(out_abs, entry)
        for cell_id, job in jobs.items():
            console.print(f"cell {cell_id}: Slurm job {job.job_id}", highlight=False)
        console.print(f"watch with: harness status {shlex.quote(str(out_dir))} --watch", highlight=False)
        return 0
    return _run_local(tasks, options, entry, out_abs, out_dir, folder, console)


def _run_local(tasks: dict[str, CellTask], options: dict, entry: dict, out_abs: Path, out_dir: Path, folder: Path,
               console) -> int:
    """The local executor: at most one cell per slot at once, in the foreground (the jobs are child processes)."""
    from harness.status import cell_states, render

    slots = local_slots(options)
    executor = submitit.LocalExecutor(folder=folder, max_num_timeout=options["max_timeouts"])
    minutes = parse_time(options["time"]) if options.get("time") is not None else 60 * 24 * 365
    waiting = list(tasks)
    running: dict[str, tuple[Any, int]] = {}  # cell id -> (job, slot)
    free = list(range(len(slots)))
    entry["submitter"] = {"host": socket.gethostname(), "pid": os.getpid()}  # cells wait for a slot in this process
    _save_submission(out_abs, entry)
    console.print(f"local executor: {len(tasks)} cell(s), at most {len(slots)} at once; "
                  f"watch with: harness status {shlex.quote(str(out_dir))} --watch", highlight=False)
    try:
        while waiting or running:
            while waiting and free:
                cell_id, slot = waiting.pop(0), free.pop(0)
                gpus = slots[slot]
                executor.update_parameters(timeout_min=minutes, signal_delay_s=options["signal_delay_s"],
                                           gpus_per_node=len(gpus), visible_gpus=tuple(gpus),
                                           tasks_per_node=max(1, len(gpus)), setup=options.get("setup") or [])
                job = executor.submit(tasks[cell_id])
                running[cell_id] = (job, slot)
                entry["jobs"][cell_id] = job.job_id
                _save_submission(out_abs, entry)
                console.print(f"cell {cell_id}: local job {job.job_id}" + (f" on GPU {gpus}" if gpus else ""),
                              highlight=False)
            time.sleep(0.2)
            for cell_id, (job, slot) in list(running.items()):
                if job.done():
                    del running[cell_id]
                    free.append(slot)
                    console.print(f"cell {cell_id}: local job {job.job_id} ended", highlight=False)
    except KeyboardInterrupt:
        console.print("interrupted: the running cells stop at their checkpoints; `harness submit` again resumes them",
                      highlight=False)
        return 130
    finally:
        entry["ended"] = _now()  # no cell waits for a slot any more
        _save_submission(out_abs, entry)
    states = cell_states(out_abs, entry["resolved_spec"])
    render(states, console, out_dir)
    return 0 if all(s.state == "done" for s in states if s.cell in tasks) else 1
