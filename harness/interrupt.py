"""SIGINT and SIGTERM during a run: finish the current step, write a checkpoint, say how to resume, exit 128+signal.

`InterruptGuard` replaces the two handlers while a run is in progress. A signal only sets a flag; the training
loop polls it at every step boundary (never mid-step), hands a checkpoint over and stops; evaluation polls it at
every batch (the cell's final training checkpoint is already written, so a resume re-evaluates it). A second
SIGINT while the first is being honoured raises `StoppedAtOnce` (a KeyboardInterrupt) at once, as an impatient
Ctrl-C expects; the CLI turns it into exit 130 with one line, no traceback.
Exit codes follow the shell's convention: 130 for SIGINT, 143 for SIGTERM.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Iterator

from harness.errors import HarnessError

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_also: tuple[int, ...] = ()  # extra stop signals while `also_stop_on` is active


@contextlib.contextmanager
def also_stop_on(*signums: int) -> Iterator[None]:
    """Guards entered inside this block also turn these signals into a stop request (exit 128+signal).

    harness.submit adds submitit's preemption/timeout signal (SIGUSR2): the cell's checkpoint is then written at a
    step boundary before submitit requeues the job. A plain `harness run` never enters this block."""
    global _also
    saved = _also
    _also = saved + tuple(s for s in signums if s not in SIGNALS + saved)
    try:
        yield
    finally:
        _also = saved


class Interrupted(HarnessError):
    """The run was stopped by a signal after writing a checkpoint. Exit code 128 + the signal's number."""

    def __init__(self, signum: int, message: str, *, fix: str | None = None):
        super().__init__(message, fix=fix)
        self.signum = signum
        self.exit_code = 128 + int(signum)


class StoppedAtOnce(KeyboardInterrupt):
    """A second SIGINT while the first one was being honoured: the run stops now, without a checkpoint of the
    current step (the last checkpoint written stays, and the same command resumes from it)."""


class InterruptGuard:
    """Context manager: while active, SIGINT/SIGTERM set `signum` instead of killing the process."""

    def __init__(self, *, hold_after_stop: bool = False) -> None:
        """`hold_after_stop` (torchrun ranks): when the block ends with an exception (Interrupted, or an error the
        ranks agreed on: harness.distributed.MainRankFailed), further SIGINT/SIGTERM are ignored until the process
        exits instead of the previous handlers being restored. The ranks stop together, but one exits first, and
        torchrun then sends SIGTERM to the others: a rank still printing its message or shutting down must not be
        killed by it (exit -15 instead of 143, or of rank 0's code). torchrun sends SIGKILL after 30 s."""
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        self.hold_after_stop = hold_after_stop

    def __enter__(self) -> "InterruptGuard":
        if threading.current_thread() is threading.main_thread():  # signal.signal only works there
            for sig in SIGNALS + _also:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        hold = self.hold_after_stop and exc_type is not None
        for sig, handler in self._previous.items():
            # SIG_IGN, not a Python function: Python resets its own handlers to the default while it shuts down,
            # and torch's teardown is slow enough for torchrun's SIGTERM to land then (seen: exit -15 under load)
            signal.signal(sig, signal.SIG_IGN if hold else handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise StoppedAtOnce()  # a second Ctrl-C: stop now, without the checkpoint of this step
        self.signum = signum
        sys.stderr.write(f"\n{signal.Signals(signum).name} received: stopping at the next step boundary (writing a "
                         "checkpoint), or after the current batch when the cell is already trained\n")
        sys.stderr.flush()

    def adopt(self, signum: int) -> None:
        """Another process of the same run (a torchrun rank) received `signum`: stop as if this one had."""
        self.signum = signum

    def requested(self) -> bool:
        return self.signum is not None

    def interrupted(self, where: str) -> Interrupted:
        name = signal.Signals(self.signum).name
        return Interrupted(self.signum, f"interrupted by {name}: {where}")


class TrainingStopped(Exception):
    """Training stopped at a step boundary because it was asked to (a signal); a checkpoint was handed over."""

    def __init__(self, epoch: int, step: int):
        super().__init__(f"training stopped after epoch {epoch}, step {step}")
        self.epoch, self.step = epoch, step
