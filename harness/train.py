"""Training of one cell: SGD with momentum, a per-epoch learning-rate schedule, the defense's loss."""

from __future__ import annotations

import math
import re
import time
from typing import Callable

import torch
from torch import nn

from harness.checkpoint import restore_global_rng, resume_training, training_state
from harness.data import batches, num_batches
from harness import registry
from harness.errors import RunFailure
from harness.interrupt import TrainingStopped
from harness.performance import Runtime
from harness.plugin import DataSplits, DefensePlugin


class NonFiniteLoss(RunFailure):
    def __init__(self, epoch: int, step: int, value: float):
        what = f"became {value}" if not math.isfinite(value) else "became non-finite in another process's shard"
        super().__init__(
            f"training loss {what} at epoch {epoch}, step {step}",
            fix="lower the learning rate or check the defense; the other cells are unaffected",
        )
        self.epoch, self.step = epoch, step


class NumericError(RunFailure):
    """torch (or Python) raised an arithmetic error inside a training step: e.g. a learning rate or weight decay
    that overflows float32 makes SGD's update raise `value cannot be converted to type float without overflow`.
    It fails the cell as a non-finite loss does, instead of aborting the run."""

    def __init__(self, epoch: int, step: int | None, exc: BaseException):
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        where = f"at epoch {epoch}, step {step}" if step is not None else f"at the end of epoch {epoch}"
        super().__init__(
            f"training failed with a numeric error {where}: {type(exc).__name__}: {first}",
            fix="lower the learning rate (or the weight decay, or the schedule's gamma) or check the defense; the "
                "other cells are unaffected",
        )
        self.epoch, self.step = epoch, step


# torch has no exception class for arithmetic trouble: its numeric RuntimeErrors are told apart by their message
# (`value cannot be converted to type float without overflow`, anomaly mode's `returned nan values`). Any other
# RuntimeError (a CUDA fault, a shape bug) is not the cell's numbers going wrong and still stops the run.
_NUMERIC_MESSAGE = re.compile(r"without overflow|overflow when|out of range|returned (nan|inf) values", re.IGNORECASE)


def is_numeric_error(exc: BaseException) -> bool:
    if isinstance(exc, (OverflowError, FloatingPointError, ZeroDivisionError)):
        return True
    return isinstance(exc, RuntimeError) and bool(_NUMERIC_MESSAGE.search(str(exc)))


class NonFiniteParameters(RunFailure):
    def __init__(self, epoch: int, names: list[str]):
        more = f" and {len(names) - 3} more" if len(names) > 3 else ""
        super().__init__(
            f"parameters became non-finite during epoch {epoch} ({', '.join(names[:3])}{more}) although every "
            "training loss was finite (a non-finite gradient)",
            fix="lower the learning rate or check the defense; the last good checkpoint is kept",
        )
        self.epoch = epoch


def make_optimizer(model: nn.Module, cfg: dict) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"],
        weight_decay=cfg["weight_decay"], nesterov=cfg["nesterov"],
    )


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: dict) -> torch.optim.lr_scheduler.LRScheduler:
    kind = schedule["type"]
    if kind == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, schedule["milestones"], schedule["gamma"])
    if kind == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, schedule["step_size"], schedule["gamma"])
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


def train(
    model: nn.Module,
    defense: DefensePlugin,
    data: DataSplits,
    cfg: dict,
    device: torch.device,
    seed: int,
    on_step: Callable[[], None] | None = None,
    runtime: Runtime | None = None,
    *,
    resume: dict | None = None,
    on_checkpoint: Callable[[dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_epoch: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Train `model` in place for cfg['epochs'] epochs; return the per-epoch history.

    `runtime` (harness.performance) sets precision/layout/compilation and, under torchrun, DDP and the sharding
    of each batch over ranks; None trains exactly as the plain loop.
    Checkpoints (harness.checkpoint): `on_checkpoint(state)` receives the full training state after every epoch;
    when `should_stop()` turns true it receives the state at that step boundary and TrainingStopped is raised.
    `resume` is such a state: training continues from it exactly (see harness.checkpoint for how).
    `on_epoch(record)` receives each epoch's history record once its checkpoint is written (harness.tracking).
    """
    runtime = runtime or Runtime()
    step_model = runtime.training_model(model)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg["schedule"])
    order = torch.Generator().manual_seed(seed)
    history, first_epoch, skip = [], 1, 0
    if resume is not None:
        history, first_epoch, skip = resume_training(resume, model, optimizer, scheduler, order)
    for epoch in range(first_epoch, cfg["epochs"] + 1):
        model.train()
        started, total, seen = time.perf_counter(), 0.0, 0
        lr = optimizer.param_groups[0]["lr"]
        epoch_order = order.get_state()
        steps = runtime.batches(batches(data.train, cfg["batch_size"], device, transform=data.augment,
                                        generator=order, max_batches=cfg["max_batches"]))
        if skip:  # resuming mid-epoch: replay the batches already trained on, then the saved RNG states
            for _ in range(skip):
                next(steps, None)
            restore_global_rng(resume["rng"])
            order.set_state(resume["rng"]["order"])
            p = resume["partial"]
            started, total, seen = started - p["seconds"], p["total"], p["seen"]
        for step, (x, y) in enumerate(steps, start=skip + 1):
            try:
                try:
                    with registry.blame(defense, "loss", passthrough=is_numeric_error):  # numeric: NumericError below
                        loss = runtime.loss(defense, step_model, x, y)
                    value = float(loss.detach())
                except BaseException as exc:  # under DDP: the other ranks learn of it and stop at the same point
                    runtime.step_failed(exc, cell_level=isinstance(exc, RunFailure) or is_numeric_error(exc))
                    raise
                if not runtime.all_finite(value):  # under DDP: on any rank
                    raise NonFiniteLoss(epoch, step, value)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            except (RuntimeError, ArithmeticError) as exc:
                if not is_numeric_error(exc):
                    raise
                raise NumericError(epoch, step, exc) from exc
            total += value * len(y)
            seen += len(y)
            if on_step is not None:
                on_step()
            if should_stop is not None and should_stop():
                if on_checkpoint is not None:
                    partial = {"total": total, "seen": seen, "seconds": time.perf_counter() - started}
                    on_checkpoint(training_state(model, optimizer, scheduler, order, epoch - 1, step, history,
                                                 epoch_order, partial))
                raise TrainingStopped(epoch, step)
        skip = 0
        # A finite loss can still come with a non-finite gradient (e.g. the last step of the epoch): never
        # checkpoint, evaluate or analyse such a model. One check per epoch (a GPU sync per epoch, not per step).
        named = list(model.named_parameters())
        finite = torch.stack([torch.isfinite(p).all() for _, p in named]).cpu()  # one device sync
        if not bool(finite.all()):
            raise NonFiniteParameters(epoch, [n for (n, _), ok in zip(named, finite.tolist()) if not ok])
        try:
            scheduler.step()
        except (RuntimeError, ArithmeticError) as exc:
            if not is_numeric_error(exc):
                raise
            raise NumericError(epoch, None, exc) from exc
        total, seen = runtime.epoch_totals(total, seen)
        history.append({"epoch": epoch, "lr": lr, "train_objective": total / max(seen, 1),
                        "seconds": time.perf_counter() - started})
        if on_checkpoint is not None:
            on_checkpoint(training_state(model, optimizer, scheduler, order, epoch, 0, history, order.get_state()))
        if on_epoch is not None:
            on_epoch(history[-1])
    return history


def steps_per_epoch(data: DataSplits, cfg: dict) -> int:
    return num_batches(len(data.train), cfg["batch_size"], cfg["max_batches"])
