"""What a long run shows while it works: the progress of each phase and of the run as a whole.

Every long phase (training a cell, evaluating it, its sanity checks, its analysis; `harness eval`'s evaluation and
checks) is a `Phases.start(...)` followed by one `advance()` per step or batch. On a terminal that is a rich progress
bar with its elapsed and remaining time. On anything else (a CI log, a Slurm output file, a pipe) bars would show
nothing, so plain lines are printed instead, at a bounded rate: one as the phase starts, at most one every
`HARNESS_PROGRESS_INTERVAL` seconds (default 30) while it runs, and one as it ends.

`Overall` makes the run-level line printed as each cell starts (on a terminal too): which cell of how many, and the
time the rest of the run will take, estimated from the cells finished in this run.

The per-batch callbacks of evaluation, checks and analysis are the same ones that poll a stop request (SIGINT /
SIGTERM): `batch_hook` makes one callback that does both.
"""

from __future__ import annotations

import math
import os
import time
from typing import Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

INTERVAL_ENV = "HARNESS_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 30.0


def interval_from_env() -> float:
    """Seconds between two plain progress lines of one phase: $HARNESS_PROGRESS_INTERVAL, else 30. 0 prints a line
    for every step or batch (the tests use it to see every line without waiting)."""
    raw = os.environ.get(INTERVAL_ENV)
    if raw is None or not raw.strip():
        return DEFAULT_INTERVAL
    try:
        value = float(raw)
    except ValueError:
        return DEFAULT_INTERVAL  # a malformed knob must not stop a run; the default is what it would have got
    return value if math.isfinite(value) and value >= 0 else DEFAULT_INTERVAL


def duration(seconds: float) -> str:
    """A human duration: '0.4 s', '12 s', '3 min 05 s', '1 h 02 min'."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class Phases:
    """The phases of a run, one at a time: rich bars on a terminal, plain rate-bounded lines elsewhere.

    A context manager (the bars live while it is open). `console` is where other messages go: on a terminal they
    are printed above the bars."""

    def __init__(self, console: Console, *, interval: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.console = console
        self.interval = interval_from_env() if interval is None else interval
        self._clock = clock
        self._bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                              TimeElapsedColumn(), TimeRemainingColumn(), console=console,
                              transient=True) if console.is_terminal else None
        self._task = None
        self._current: dict | None = None

    def __enter__(self) -> "Phases":
        if self._bars is not None:
            self._bars.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish()
        self._current = None
        if self._bars is not None:
            self._bars.stop()

    def start(self, label: str, phase: str, total: int | None, *, completed: int = 0, unit: str = "batches") -> None:
        """A phase begins (the previous one, if still open, ends): `label` names what it works on ('cell
        lenet__s0'), `phase` what it does ('training'); `total` units of which `completed` are already done."""
        self.finish()
        now = self._clock()
        self._current = {"label": label, "phase": phase, "total": total, "done": completed, "first": completed,
                         "unit": unit, "started": now, "printed": now}
        if self._bars is not None:
            self._task = self._bars.add_task(f"{label}: {phase}", total=total, completed=completed)
            return
        size = f"{total} {unit}" if total is not None else unit
        already = f", {completed} done before" if completed else ""
        self._line(f"{label}: {phase} ({size}{already})")

    def advance(self, n: int = 1) -> None:
        current = self._current
        if current is None:
            return
        current["done"] += n
        if current["total"] is not None and current["done"] > current["total"]:
            current["total"] = current["done"]  # never "13/12": an estimate that fell short grows instead
            if self._bars is not None:
                self._bars.update(self._task, total=current["total"])
        if self._bars is not None:
            self._bars.advance(self._task, n)
            return
        now = self._clock()
        if now - current["printed"] >= self.interval and current["done"] != current["total"]:
            current["printed"] = now
            self._line(self._status(current, now))

    def finish(self) -> None:
        """The current phase ended (a no-op when none is open)."""
        current, self._current = self._current, None
        if current is None:
            return
        if self._bars is not None:
            self._bars.update(self._task, visible=False)
            return
        elapsed = self._clock() - current["started"]
        self._line(f"{current['label']}: {current['phase']} done, {current['done'] - current['first']} "
                   f"{current['unit']} in {duration(elapsed)}")

    def drop(self) -> None:
        """The current phase was abandoned (its cell failed): its bar goes, without a 'done' line."""
        current, self._current = self._current, None
        if current is not None and self._bars is not None:
            self._bars.update(self._task, visible=False)

    def _status(self, current: dict, now: float) -> str:
        done, total, elapsed = current["done"], current["total"], now - current["started"]
        text = f"{current['label']}: {current['phase']} {done}"
        if total:
            text += f"/{total} {current['unit']} ({100 * done / total:.0f}%)"
        else:
            text += f" {current['unit']}"
        text += f", {duration(elapsed)} elapsed"
        rate = (done - current["first"]) / elapsed if elapsed > 0 else 0.0
        if total and rate > 0:
            text += f", about {duration((total - done) / rate)} left"
        return text

    def _line(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)


class Overall:
    """The run-level line as each cell starts: 'run: cell 2/4 lenet__s8', and once a cell has finished in this run,
    the time the run has left: the mean wall time of the cells finished in this run times the cells left to run
    (the current one included; cells kept from an earlier run cost nothing and are not counted)."""

    def __init__(self, count: int, to_run: int) -> None:
        self.count, self.to_run = count, to_run
        self.seconds: list[float] = []

    def starting(self, index: int, cell_id: str) -> str:
        text = f"run: cell {index}/{self.count} {cell_id}"
        if self.seconds:
            left = max(self.to_run - len(self.seconds), 1)
            mean = sum(self.seconds) / len(self.seconds)
            text += (f" ({len(self.seconds)} finished in {duration(sum(self.seconds))}; about "
                     f"{duration(mean * left)} left for the run)")
        return text

    def finished(self, seconds: float) -> None:
        self.seconds.append(seconds)

    def kept(self) -> None:
        """A cell that was going to run was kept instead (another job finished it meanwhile)."""
        self.to_run = max(self.to_run - 1, len(self.seconds))


def batch_hook(phases: Phases, label: str, phase: str, total: int | Callable[[], int],
               stop: Callable[[], None] | None = None) -> Callable[[], None]:
    """The per-batch callback of a phase after training: its first call starts the phase (after `stop()`, so that
    a signal sent on seeing the phase's first line is honoured), each later call advances it by one batch, then
    calls `stop()` (which raises to stop the run when a signal came). `total` may be a function, evaluated when the
    phase starts."""
    started = False

    def hook() -> None:
        nonlocal started
        if started:
            phases.advance()
        if stop is not None:
            stop()
        if not started:
            started = True
            phases.start(label, phase, total() if callable(total) else total)

    return hook
