"""`harness status DIR`: where each cell of a sweep stands, from the files in DIR alone (never the scheduler).

Sources: OUT/cells/<id>.json (done or failed, written by the run; read through harness.integrity.read_cell,
as the run reads it), OUT/checkpoints/<id>.pt (the position and the history of an unfinished cell), and what
`harness submit` wrote under OUT/submit/ (harness.submit: the submissions with each cell's job id, each cell's
task record with its heartbeat, submitit's job logs). The cells are the spec's
(from the last submission, else from report.json), or, without either, those found in the files.

States, in this order of precedence:
- done         the cell file says done (Acc./GE/PGD shown)
- failed       the cell file is damaged (its checksum) or unreadable: the run stops on it with exit 2 until it is
               deleted; or the cell file says failed, or the task record does (bad input), or the job's log ends
               in an error
- running      its latest job's task record says running, and the job shows signs of life: for a job on this
               host its process lives; for one on another host its heartbeat (harness.submit.heartbeat) is
               younger than LOST_AFTER intervals
- queued       submitted and not started yet, or requeued after SIGUSR2 (time limit, preemption)
- interrupted  a checkpoint and no live job: stopped by a signal, a job that died (its process is gone, or no
               heartbeat for LOST_AFTER intervals: a node failure, SIGKILL, the OOM killer), or a plain run stopped
- not started  nothing yet
A cell file that parses but is not a cell result (integrity.Unusable) counts as absent, as the run counts it (the
cell is evaluated or trained again), and the detail says so.
"""

from __future__ import annotations

import os
import shlex
import socket
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from harness import checkpoint, integrity
from harness.errors import BadInput
from harness.report import TABLE_ROWS
from harness.submit import HEARTBEAT_S, RunArgs, read_json_file, state_dir, submissions, task_record_path

STATES = ("done", "running", "queued", "failed", "interrupted", "not started")
BROKEN = ("cell file damaged", "cell file unreadable")  # details of cell files every run in the folder stops on
LOST_AFTER = 5  # heartbeat intervals without one before a running job on another host counts as dead
STYLES = {"done": "green", "running": "cyan", "queued": "blue", "failed": "red", "interrupted": "yellow",
          "not started": "dim"}


@dataclass
class CellState:
    cell: str
    state: str
    detail: str = ""
    job: str | None = None
    metrics: dict | None = None
    progress: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------- reading the files


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def progress(ckpt: Path, train_size: int | None) -> dict:
    """Position and pace of an unfinished cell from its checkpoint: epoch k of N, seconds per epoch, steps per
    second (when the training set's size is known), ETA of the training from the history, the checkpoint's age."""
    if not ckpt.exists():
        return {}
    try:
        state = checkpoint.load(ckpt, mmap=True)
    except BadInput as exc:
        return {"unreadable": exc.message}
    training = state["spec"]["training"]
    epochs, history = training["epochs"], state["history"]
    out = {"epoch": state["epoch"], "epochs": epochs, "step": state["step"],
           "age_s": time.time() - ckpt.stat().st_mtime}
    recent = [h["seconds"] for h in history[-3:]]
    partial = state["partial"]["seconds"] if state["step"] else 0.0
    if recent:
        out["epoch_s"] = statistics.fmean(recent)
        out["eta_s"] = max(0.0, (epochs - state["epoch"]) * out["epoch_s"] - partial)
    if train_size:
        from harness.data import num_batches

        steps = num_batches(train_size, training["batch_size"], training.get("max_batches"))
        if recent:
            out["steps_per_s"] = steps / out["epoch_s"]
    if state["step"] and partial > 0 and "steps_per_s" not in out:
        out["steps_per_s"] = state["step"] / partial
    return out


def _describe_progress(p: dict, running: bool = False) -> str:
    if not p:
        return ""
    if "unreadable" in p:
        return p["unreadable"]
    if p["epoch"] >= p["epochs"]:
        doing = "evaluating" if running else "not evaluated yet"
        return f"trained ({p['epochs']} epochs), {doing}; checkpoint {_duration(p['age_s'])} ago"
    parts = [f"epoch {p['epoch']}/{p['epochs']}" + (f" +{p['step']} steps" if p["step"] else "")]
    if "epoch_s" in p:
        parts.append(f"{p['epoch_s']:.1f} s/epoch")
    if "steps_per_s" in p:
        parts.append(f"{p['steps_per_s']:.2f} steps/s")
    if "eta_s" in p and running:
        parts.append(f"ETA {_duration(p['eta_s'])} of training")
    parts.append(f"checkpoint {_duration(p['age_s'])} ago")
    return ", ".join(parts)


def _alive(host: str | None, pid: int | None) -> bool | None:
    """Whether a process of this host lives (None: another host, cannot tell without asking it)."""
    if host != socket.gethostname() or not pid:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def silence(record: dict, now: float | None = None) -> float | None:
    """Seconds since a running task's last heartbeat when that is more than LOST_AFTER of its intervals, else None
    (alive as far as the files tell, or a record without heartbeats)."""
    beat = _epoch(record.get("heartbeat"))
    if not beat:
        return None
    interval = record.get("heartbeat_s") if isinstance(record.get("heartbeat_s"), (int, float)) else HEARTBEAT_S
    age = (time.time() if now is None else now) - beat
    return age if age > LOST_AFTER * interval else None


def read_cell(path: Path) -> tuple[dict | None, str | None, str | None]:
    """(the cell result, why it is ignored, why it stops the run) through integrity.read_cell, as the run reads it:
    an Unusable file counts as absent; a damaged or unreadable one (BadInput) stops `harness run` with exit 2."""
    try:
        return integrity.read_cell(path), None, None
    except integrity.Unusable as exc:
        return None, f"cell file ignored ({exc.reason}): the cell is {integrity.CELL_REDO}", None
    except integrity.Damaged:
        return None, None, (f"{BROKEN[0]}: {path} does not match its checksum; `harness run` stops on it "
                            f"(exit 2) until it is deleted, then the cell is {integrity.CELL_REDO}")
    except BadInput as exc:
        return None, None, f"{BROKEN[1]}: {_first_line(exc.message)}; {exc.fix}"


def log_error(log_folder: str | None, job_id: str | None) -> str | None:
    """The error a job's stderr (submitit's log) ends with in its latest attempt, if it ended in one."""
    if not log_folder or not job_id:
        return None
    path = Path(log_folder) / str(job_id) / f"{job_id}_0_log.err"
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    attempt = text.rsplit("Starting with JobEnvironment", 1)[-1]  # submitit logs this at every (re)start
    if "Submitted job triggered an exception" not in attempt and "Traceback (most recent call last)" not in attempt:
        return None
    lines = [ln.strip() for ln in attempt.splitlines() if ln.strip() and not ln.startswith("submitit ")]
    errors = [ln for ln in lines if not ln.startswith(("File ", "Traceback", "^", "~"))]
    if errors and errors[-1] in ("KeyboardInterrupt", "click.exceptions.Abort"):
        return None  # stopped by Ctrl-C (the local executor's cancel), not a failure
    return errors[-1] if errors else lines[-1] if lines else "the job ended with an error"


def _train_size(out_dir: Path) -> int | None:
    report = read_json_file(out_dir / "report.json")
    try:
        return int(report["data"]["train_size"])
    except (TypeError, KeyError, ValueError):
        return None


def _spec_of(out_dir: Path) -> dict | None:
    """The resolved spec of the sweep: the last submission's, else report.json's."""
    for entry in reversed(submissions(out_dir)):
        if isinstance(entry.get("resolved_spec"), dict):
            return entry["resolved_spec"]
    report = read_json_file(out_dir / "report.json")
    return report.get("spec") if isinstance(report, dict) and isinstance(report.get("spec"), dict) else None


def _latest_jobs(out_dir: Path) -> dict[str, tuple[dict, str | None]]:
    """cell id -> (the latest submission naming it, its job id there; None while waiting for a local slot)."""
    latest: dict[str, tuple[dict, str | None]] = {}
    for entry in submissions(out_dir):
        for cell_id, job_id in (entry.get("jobs") or {}).items():
            latest[cell_id] = (entry, job_id)
    return latest


def _submitter_gone(entry: dict) -> bool:
    """A local submission whose `harness submit` process ended: its cells that never started will not start."""
    if entry.get("ended"):
        return True
    who = entry.get("submitter") or {}
    return _alive(who.get("host"), who.get("pid")) is False


def _local_job_gone(entry: dict, job_id: str | None) -> bool:
    """A local job whose controller process (its job id is that pid) no longer lives: it will not (re)start."""
    if entry.get("executor") != "local" or not job_id or not str(job_id).isdigit():
        return False
    return _alive((entry.get("submitter") or {}).get("host"), int(job_id)) is False


def cell_states(out_dir: Path, spec: dict | None) -> list[CellState]:
    """The state of every cell of `spec` (or of every cell found in the files when spec is None)."""
    from harness.runner import plan, spec_digest

    out_dir = Path(out_dir)
    if spec is not None:
        ids, digest = [c.id for c in plan(spec)], spec_digest(spec)
    else:
        found = ({p.stem for p in (out_dir / "cells").glob("*.json")}
                 | {p.stem for p in (out_dir / "checkpoints").glob("*.pt")})
        ids, digest = sorted(found), None
    jobs = _latest_jobs(out_dir)
    train_size = _train_size(out_dir)
    states = []
    for cell_id in ids:
        result_path, ckpt_path = checkpoint.cell_paths(out_dir, cell_id)
        cell, ignored, broken = read_cell(result_path)
        if digest is not None and cell is not None and cell.get("spec_digest") != digest:
            cell = None  # a result of another spec
        entry, job_id = jobs.get(cell_id, (None, None))
        record = read_json_file(task_record_path(out_dir, cell_id)) or {}
        ours = entry is not None and job_id is not None and record.get("job_id") == job_id
        result_time = result_path.stat().st_mtime if cell is not None else 0.0
        newer_job = entry is not None and _epoch(entry.get("time")) > result_time
        prog = progress(ckpt_path, train_size)
        state = CellState(cell_id, "not started", job=job_id, progress=prog)
        if broken:
            state.state, state.detail = "failed", broken
        elif cell is not None and cell.get("status") == "done":
            state.state, state.metrics = "done", cell.get("metrics")
            state.detail = "  ".join(f"{row} {fmt.format(cell['metrics'][key])}" for row, key, fmt in TABLE_ROWS)
        elif ours and record.get("state") == "running":
            alive = _alive(record.get("host"), record.get("pid"))
            error = log_error(entry.get("log_folder"), job_id)
            silent = silence(record) if alive is None else None  # another host: only its heartbeat tells
            if alive is False or error or _local_job_gone(entry, job_id):
                state.state = "failed" if error else "interrupted"
                state.detail = error or (f"job {job_id} ended without a result; "
                                         + (_describe_progress(prog) or "no checkpoint"))
            elif silent is not None:
                state.state = "interrupted"
                check = f": `sacct -j {job_id}`" if record.get("executor") == "slurm" else ""
                state.detail = (f"no sign of life for {_duration(silent)} (the job may have died{check}); "
                                + (_describe_progress(prog) or "no checkpoint"))
            else:
                state.state = "running"
                attempt = f"attempt {record.get('attempt', 1)}, " if record.get("attempt", 1) > 1 else ""
                state.detail = attempt + (_describe_progress(prog, running=True)
                                          or f"epoch 1 under way since {record.get('started')}")
        elif ours and record.get("state") == "requeued" and not _local_job_gone(entry, job_id):
            state.state = "queued"
            state.detail = f"requeued after {record.get('signal')}" + (f"; {_describe_progress(prog)}" if prog else "")
        elif ours and record.get("state") == "failed":
            state.state, state.detail = "failed", _first_line(record.get("error"))
        elif (entry is not None and newer_job and not ours and not (job_id is None and _submitter_gone(entry))
              and not _local_job_gone(entry, job_id)):
            error = log_error(entry.get("log_folder"), job_id)
            if error:
                state.state, state.detail = "failed", error
            else:
                state.state = "queued"
                state.detail = "waiting for a local slot" if job_id is None else f"job {job_id} not started yet"
        elif cell is not None:  # failed
            state.state, state.detail = "failed", _first_line(cell.get("error"))
        elif ours and record.get("state") == "stopped":  # a signal that requeues nothing (SIGINT, scancel)
            state.state = "interrupted"
            state.detail = f"stopped by {record.get('signal')}; " + (_describe_progress(prog)
                                                                     or "before its first checkpoint")
        elif prog:
            state.state = "interrupted"
            why = f"stopped by {record['signal']}; " if ours and record.get("signal") else ""
            state.detail = why + _describe_progress(prog)
        if ignored:
            state.detail = f"{ignored}; {state.detail}" if state.detail else ignored
        states.append(state)
    return states


def _first_line(error: str | None) -> str:
    """An error's message without its `fix:` line (the table's detail column holds one line)."""
    return (error or "failed").strip().splitlines()[0]


def _epoch(iso: str | None) -> float:
    import datetime as dt

    try:
        return dt.datetime.fromisoformat(iso).timestamp() if iso else 0.0
    except ValueError:
        return 0.0


# ------------------------------------------------------------------------------------- the table and the last line


def totals(states: list[CellState]) -> dict[str, int]:
    return {name: sum(s.state == name for s in states) for name in STATES}


def resubmit_command(out_dir: Path, states: list[CellState], cells: list[str] | None = None) -> list[str] | None:
    """`harness submit` for the cells that are missing (interrupted or not started; or `cells`), with the last
    submission's spec, run options and executor options; None when there is nothing to submit."""
    missing = cells if cells is not None else [s.cell for s in states if s.state in ("interrupted", "not started")]
    if not missing:
        return None
    entries = submissions(out_dir)
    last = entries[-1] if entries else {}
    spec = last.get("spec", "SPEC")
    if last and last.get("cwd") != os.getcwd():
        spec = str(Path(last.get("cwd", "")) / spec)
    opts = last.get("run_options") or {}
    # the run options in the words a job's `harness run` gets (submit takes the same ones); without --cell, submit
    # takes the cells not done, failed, queued or running: the missing
    words = RunArgs(spec, str(out_dir), opts.get("data_root"), bool(opts.get("smoke")), opts.get("seed"),
                    tuple(str(o) for o in opts.get("overrides") or []),
                    tuple((str(kind), str(folder)) for kind, folder in opts.get("log") or [])).argv(
                        missing if cells is not None else [])
    config = state_dir(Path(out_dir)) / "executor.json"
    executor = ["--executor-config", str(config)] if config.exists() else []
    return ["harness", "submit", *words[:3], *executor, *words[3:]]  # words[:3]: SPEC --out DIR


def render(states: list[CellState], console: Console, out_dir: Path | None = None) -> None:
    table = Table(title=f"harness status {out_dir}" if out_dir is not None else None, title_justify="left")
    for col in ("cell", "state", "detail", "job"):
        table.add_column(col, overflow="fold")
    for s in states:
        table.add_row(s.cell, f"[{STYLES[s.state]}]{s.state}[/]", s.detail, s.job or "")
    # piped output (logs, tests) gets a wide table: rich's 80-column default would fold the details
    (console if console.is_terminal else Console(file=console.file, width=max(console.width, 160))).print(table)
    count = totals(states)
    line = f"{len(states)} cells: " + ", ".join(f"{n} {name}" for name, n in count.items())
    if out_dir is not None:
        broken = [str(checkpoint.cell_paths(out_dir, s.cell)[0]) for s in states if s.detail.startswith(BROKEN)]
        if broken:  # the run reads every cell file of its folder (the report): a damaged one stops any cell's run
            line += " · every run in this folder stops on a damaged cell file (exit 2): first rm " + shlex.join(broken)
        cmd = resubmit_command(out_dir, states)
        if cmd is not None:
            line += " · resubmit what is missing: " + shlex.join(cmd)
        elif count["done"] == len(states):
            line += f" · all done: harness report {shlex.quote(str(out_dir))}"
        if count["failed"]:
            again = resubmit_command(out_dir, states, [s.cell for s in states if s.state == "failed"])
            line += " · failed cells, once their cause is fixed: " + shlex.join(again)
    console.print(line, highlight=False, markup=False, soft_wrap=True)


def status(out_dir: Path) -> list[CellState]:
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise BadInput(f"output folder not found: {out_dir}",
                       fix="pass the --out folder of `harness submit` or `harness run`")
    return cell_states(out_dir, _spec_of(out_dir))


def active(states: list[CellState]) -> bool:
    return any(s.state in ("running", "queued") for s in states)
