"""Optional experiment tracking: a run's numbers where users already look (`--log tensorboard DIR`).

The runner (harness.runner) drives one `Tracker` per run through four calls, made on rank 0 only:
`start_cell(run, cell, history)` as a cell starts (with the history it resumes from, or a kept cell's),
`epoch(record)` after every epoch it trains (harness.train's history record), `finish_cell(result)` with the cell's
result (its metrics), and `close()` at the end of the run (also when it is interrupted). A tracker logs only the
numbers the harness records anyway: no extra forward pass, no RNG draw, so logging changes no result.

`TensorBoard` writes with the library's own `torch.utils.tensorboard.SummaryWriter` (the optional extra
`harness[tensorboard]`): one TensorBoard run per cell, DIR/<spec name>-seed<N>[-smoke]/<cell id>/, so TensorBoard's
run selector lists the cells; the epoch is the global step. A cell that starts again (resumed after an
interruption, re-evaluated, or kept from an earlier run) replaces its curves: its old event files are removed and
its whole history is written again (with `purge_step=0`, so a TensorBoard already showing the old file drops those
points too), so a resumed cell never shows a step twice.

Another backend (wandb, mlflow) is one more class with these four methods and one more entry in KINDS; the CLI's
`--log KIND DIR` and the API's `log={KIND: DIR}` only pass it through.
"""

from __future__ import annotations

import math
from os import PathLike
from pathlib import Path
from typing import Any, Iterable, Mapping, Protocol

from harness.errors import BadInput

KINDS = ("tensorboard",)
INSTALL = {"tensorboard": "pip install 'harness[tensorboard]'"}


class Tracker(Protocol):
    def start_cell(self, run: str, cell: str, history: list[dict], hparams: dict) -> None: ...

    def epoch(self, record: dict) -> None: ...

    def finish_cell(self, result: dict) -> None: ...

    def close(self) -> None: ...


def run_name(spec: dict, smoke: bool) -> str:
    """The name of a run's folder under DIR: the spec's name, its seed, and -smoke for a smoke run (runs of one
    spec with other seeds or --smoke do not overwrite each other's curves)."""
    return f"{spec['name']}-seed{spec['seed']}" + ("-smoke" if smoke else "")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def epoch_scalars(record: dict) -> dict[str, float]:
    """The scalars of one history record (harness.train): every number but the epoch itself (the step), under
    train/ (train/train_objective, train/lr, train/seconds, and whatever a defense adds to the record)."""
    return {f"train/{key}": v for key, value in record.items()
            if key != "epoch" and (v := _number(value)) is not None}


def cell_scalars(metrics: dict) -> dict[str, float]:
    """The scalars of a cell's metrics (harness.evaluate): Acc. (eval/clean_acc), GE (eval/ge), the train and test
    losses, the first PGD's and the worst case's accuracy, each attack's accuracy (eval/attack/<label>/acc, and its
    other numbers but eps) and the worst case per eps (eval/worst_case/<eps>/acc)."""
    out = {f"eval/{key}": v for key, value in metrics.items() if (v := _number(value)) is not None}
    for label, entry in (metrics.get("attacks") or {}).items():
        for key, value in entry.items():
            if key != "eps" and (v := _number(value)) is not None:
                out[f"eval/attack/{label}/{key}"] = v
    for eps, entry in (metrics.get("worst_case") or {}).items():
        if (v := _number(entry.get("acc"))) is not None:
            out[f"eval/worst_case/{eps}/acc"] = v
    return out


class TensorBoard:
    """torch.utils.tensorboard's SummaryWriter, one per cell (see the module's docstring)."""

    def __init__(self, root: Path):
        from torch.utils.tensorboard import SummaryWriter  # checked importable by create()

        self._writer_class = SummaryWriter
        self.root = Path(root)
        self.writer = None
        self.step = 0

    def start_cell(self, run: str, cell: str, history: list[dict], hparams: dict) -> None:
        from harness.paths import inside

        self.close()
        folder = inside(self.root, run, cell, where="--log tensorboard")
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("events.out.tfevents.*"):  # this cell's earlier curves: written again below
            if old.is_file():
                old.unlink()
        self.writer = self._writer_class(log_dir=str(folder), purge_step=0)
        self.hparams = hparams
        self.step = 0
        for record in history:
            self._epoch(record)
        self.writer.flush()

    def _epoch(self, record: dict) -> None:
        self.step = int(record["epoch"])
        for tag, value in epoch_scalars(record).items():
            self.writer.add_scalar(tag, value, self.step)

    def epoch(self, record: dict) -> None:
        if self.writer is not None:
            self._epoch(record)
            self.writer.flush()  # an epoch is long: TensorBoard shows it now, not at the next 2-minute flush

    def finish_cell(self, result: dict) -> None:
        if self.writer is None:
            return
        if result.get("status") == "done":
            scalars = cell_scalars(result.get("metrics") or {})
            for tag, value in scalars.items():  # at the last epoch's step: beside the end of the curves
                self.writer.add_scalar(tag, value, self.step)
            self._hparams(scalars)
        self.close()

    def _hparams(self, scalars: dict[str, float]) -> None:
        """The cell's model, defense and strength with its metrics, for TensorBoard's HParams tab. Written into the
        cell's own run (SummaryWriter.add_hparams would make a further run per call)."""
        from torch.utils.tensorboard.summary import hparams

        for summary in hparams(self.hparams, scalars):
            self.writer.file_writer.add_summary(summary, self.step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class Trackers:
    """Every tracker of a run, called in turn; no tracker at all when none was asked for."""

    def __init__(self, trackers: Iterable[Tracker] = ()):
        self.trackers = list(trackers)
        self.run = "run"  # set by harness.runner.run: run_name(spec, smoke)

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def start_cell(self, cell: str, history: list[dict], hparams: dict) -> None:
        for t in self.trackers:
            t.start_cell(self.run, cell, history, hparams)

    def epoch(self, record: dict) -> None:
        for t in self.trackers:
            t.epoch(record)

    def finish_cell(self, result: dict) -> None:
        for t in self.trackers:
            t.finish_cell(result)

    def close(self) -> None:
        for t in self.trackers:
            t.close()


def parse(log: Mapping[str, Any] | Iterable[tuple[str, Any]] | None) -> list[tuple[str, Path]]:
    """The API's `log={"tensorboard": DIR}` or the CLI's `--log tensorboard DIR` pairs as (kind, folder)."""
    if log is None:
        return []
    items = list(log.items()) if isinstance(log, Mapping) else list(log)
    pairs = []
    for item in items:
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise BadInput(f"log: {item!r} is not a (kind, folder) pair", fix="pass log={'tensorboard': 'runs/'}")
        kind, folder = item
        if kind not in KINDS:
            raise BadInput(f"log: unknown tracker {kind!r}", fix=f"use one of: {', '.join(KINDS)}")
        if not isinstance(folder, (str, PathLike)) or not str(folder):
            raise BadInput(f"log: the {kind} folder must be a path, not {folder!r}",
                           fix="pass log={'tensorboard': 'runs/'}")
        pairs.append((kind, Path(folder)))
    return pairs


def create(log: Mapping[str, Any] | Iterable[tuple[str, Any]] | None) -> Trackers:
    """The trackers asked for, checked before anything trains: the library must be importable (else BadInput
    naming the extra to install) and the folder creatable."""
    trackers: list[Tracker] = []
    for kind, folder in parse(log):
        try:  # torch's module imports the tensorboard package (ImportError without it, or with one too old)
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError as exc:
            raise BadInput(f"--log {kind} needs the tensorboard package, which is not installed ({exc})",
                           fix=f"{INSTALL[kind]} (or pip install tensorboard), or run without --log") from None
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BadInput(f"--log {kind} {folder}: cannot create the folder ({exc.strerror or exc})",
                           fix="give a folder you may write to") from None
        trackers.append(TensorBoard(folder))
    return Trackers(trackers)
