"""Multi-process training of a cell with DistributedDataParallel, as started by torchrun.

`torchrun --nproc_per_node=N -m harness run SPEC` starts N processes with RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT in their environment; `Distributed.from_env()` reads them (None when WORLD_SIZE is
absent or 1, so a plain run is untouched). Backend nccl on CUDA (one GPU per process, cuda:LOCAL_RANK), gloo on
CPU.

What each rank does, per cell:
- builds the model from the same seed (DDP also broadcasts rank 0's parameters and buffers);
- walks the *same* seeded permutation as a single process would, takes each global batch of `batch_size`,
  transforms (augments) it exactly as a single process would, and keeps its interleaved shard
  `batch[rank::world_size]` (DistributedSampler's interleaving). A final batch that does not divide by the
  world size is cut to a multiple of it (at most world_size - 1 samples per epoch dropped), so every rank's
  shard has the same size and DDP's gradient average equals the single-process gradient of the mean loss;
- computes adversaries on the *unwrapped* module (see `_Routed`), and the loss the optimizer follows through
  the DDP wrapper, whose backward averages gradients over ranks;
- rank 0 alone evaluates the cell and writes files; the others wait for it (the process group's timeout is
  long, TIMEOUT, because evaluation under strong attacks can take a while). They wait in `follow`, not a bare
  barrier: rank 0 ends each such stretch alone (`leading`) by telling them how it ended (one all-reduce of its
  exit code, 0 when it went on), also when it stops by a signal or fails, so every rank exits with rank 0's code
  (130/143 for a signal, 2 or 1 for an error) instead of dying in a collective rank 0 never joins (a gloo error
  and a traceback, or torchrun's SIGTERM: exit -15). The same holds while rank 0 alone waits for a cell's lock,
  and for the checkpoints rank 0 alone writes during training (`agreed_write`: a full disk ends every rank).

A stop request (SIGINT/SIGTERM, harness.interrupt) is agreed on: at every step boundary the ranks all-reduce
(max) the number of the signal each has seen, so a signal that reaches one rank a step before another (or only
one rank) stops every rank at the same boundary, where rank 0 writes the checkpoint; without it the rank that
stopped first would leave the other blocked in DDP's gradient all-reduce until it crashed, losing the epoch.

A non-finite loss is agreed on the same way (`agree_step`, before the backward pass): one rank's NaN fails the
cell on every rank at the same step, so the ranks go on to the next cell together; without it the rank whose
shard stayed finite would wait in the backward's all-reduce for a rank that had left the cell.

So is an error in one rank's loss (a defense plugin raising on that rank's shard alone, a numeric error there):
every step has agreement points, the same all-reduce each time (`agree_step`): before each forward through the
DDP wrapper (`_Routed`; DDP's forward broadcasts buffers, a collective of its own) and after the loss. A rank
whose loss raised joins the next one with its failure instead of leaving, so every rank stops at that point:
the cell fails on every rank (a plugin failure or a numeric error: the ranks go on to the next cell together,
rank 0 records the failing rank's error) or the run ends on every rank with the failing rank's exit code. Before,
the failing rank went on to the next cell while the others waited in DDP's broadcast: both hung.
An exception inside the backward pass itself on one rank only (a custom autograd function of a plugin) is not
covered: the others are then inside DDP's gradient all-reduce.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import signal
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.distributed as torch_dist
from torch import nn

from harness.errors import BadInput, HarnessError, RunFailure

TIMEOUT = dt.timedelta(hours=12)


def exit_code_of(exc: BaseException) -> int:
    """The exit code the CLI gives `exc`: a HarnessError's own (Interrupted: 128+signal), 130 for a
    KeyboardInterrupt (a second Ctrl-C), 1 for anything else."""
    if isinstance(exc, KeyboardInterrupt):
        return 130
    return int(getattr(exc, "exit_code", 1) or 1)


class MainRankFailed(HarnessError):
    """Raised on the other ranks when rank 0, working alone, failed: they exit with rank 0's code, and the error
    that says why is rank 0's own (printed by rank 0)."""

    def __init__(self, rank: int, code: int, where: str):
        super().__init__(f"rank {rank} stopped because rank 0 failed (exit {code}) {where}; rank 0's error says why")
        self.exit_code = code


class OtherRankFailed(HarnessError):
    """Raised on the ranks whose step went well when another rank's loss failed in a way that ends the run (not a
    cell failure): they exit with that rank's code; its own error (printed by that rank) says why."""

    def __init__(self, rank: int, code: int, message: str):
        super().__init__(f"stopped because rank {rank} failed in a training step: {message}",
                         fix=f"rank {rank}'s error above says why and what to do")
        self.exit_code = code


class CellFailedOnOtherRank(RunFailure):
    """Raised on the ranks whose step went well when another rank's loss failed the cell (a plugin failure or a
    numeric error in its shard): the cell fails on every rank, rank 0 records the failing rank's error."""

    def __init__(self, rank: int, message: str, fix: str | None):
        super().__init__(f"{message} (on rank {rank})", fix=fix)


class _Routed(nn.Module):
    """The model a defense sees under DDP: a forward with trainable parameters and autograd on (the loss the
    optimizer follows) goes through DistributedDataParallel; any other forward (an adversary inside
    `adversary_mode`, whose parameters are frozen, or an evaluation under no_grad) runs the unwrapped module, so
    DDP's reducer only ever sees the one forward/backward per step it synchronizes."""

    def __init__(self, module: nn.Module, ddp: nn.Module, agree: Callable[[], object]):
        super().__init__()
        self.module = module
        object.__setattr__(self, "_ddp", ddp)  # not a registered child: parameters listed once, via `module`
        object.__setattr__(self, "_agree", agree)

    def forward(self, *args, **kwargs):
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.module.parameters()):
            self._agree()  # an agreement point (module doc): a rank whose loss failed before this forward says so
            return self._ddp(*args, **kwargs)
        return self.module(*args, **kwargs)


@dataclass
class Distributed:
    rank: int
    world_size: int
    local_rank: int

    @classmethod
    def from_env(cls, env: dict | None = None) -> "Distributed | None":
        env = os.environ if env is None else env
        try:
            world_size = int(env.get("WORLD_SIZE", "1"))
            rank = int(env.get("RANK", "0"))
            local_rank = int(env.get("LOCAL_RANK", str(rank)))
        except ValueError as exc:
            raise BadInput(f"torchrun environment is malformed: {exc}",
                           fix="start multi-process runs with `torchrun --nproc_per_node=N -m harness run SPEC`")
        if world_size <= 1:
            return None
        return cls(rank=rank, world_size=world_size, local_rank=local_rank)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """This rank's device: cuda:LOCAL_RANK on CUDA, else the CPU."""
        if device.type == "cuda":
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return device

    def init(self, device: torch.device) -> None:
        if not torch_dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            torch_dist.init_process_group(backend=backend, rank=self.rank, world_size=self.world_size,
                                          timeout=TIMEOUT)
        self._device = device

    def shutdown(self) -> None:
        if torch_dist.is_initialized():
            torch_dist.destroy_process_group()

    @contextlib.contextmanager
    def shut_down_on_error(self) -> Iterator[None]:
        """Destroy the process group when the block raises (a stop or an error every rank agreed on), before the
        process exits: left to the interpreter's exit, gloo's threads were seen to abort the process ('terminate
        called without an active exception', exit -6 instead of 143) when the other rank had just closed its end."""
        try:
            yield
        except BaseException:
            self.shutdown()
            raise

    def barrier(self) -> None:
        torch_dist.barrier()

    @contextlib.contextmanager
    def leading(self, *, alone: bool = True) -> Iterator[None]:
        """Rank 0: a block it runs alone while the other ranks wait in `follow`; at its end rank 0 tells them how
        it ended (one all-reduce of its exit code: 0 when it went on), also on a signal or an error, before
        re-raising it, so that they exit as rank 0 does. `alone=False`: the block starts with work every rank does
        together (a cell's training, whose stops and failures every rank sees at once); `alone()` then marks the
        point from which rank 0 works alone, and a block left before it tells nothing."""
        self._owed = alone
        try:
            yield
        except BaseException as exc:
            if self._owed:
                self._owed = False
                self._exit_code_of_rank_0(exit_code_of(exc))
            raise
        if self._owed:
            self._owed = False
            self._exit_code_of_rank_0(0)

    def alone(self) -> None:
        """Inside `leading(alone=False)`: from here rank 0 works alone (the others are in `follow`)."""
        self._owed = True

    def agreed_write(self, write: Callable[[dict], None] | None) -> Callable[[dict], None]:
        """The checkpoint callback of every rank (train calls it at the same step boundaries on each): rank 0
        writes (`write`), then the ranks agree on whether it could (one all-reduce of rank 0's exit code). Without
        it a rank 0 that cannot write (a full disk: WriteFailed) would leave, and the others die in their next
        collective (a gloo error and a traceback); now they end with its code (MainRankFailed)."""
        def written(state: dict) -> None:
            if write is not None:
                try:
                    write(state)
                except BaseException as exc:
                    self._exit_code_of_rank_0(exit_code_of(exc))
                    raise
            code = self._exit_code_of_rank_0(0)
            if code:
                raise MainRankFailed(self.rank, code, "while it wrote the cell's checkpoint")

        return written

    def follow(self, guard, where: str) -> None:
        """The other ranks: wait for rank 0's `leading` block to end and end as it did: go on when it went on;
        stop with its signal's Interrupted (guard adopts it: same exit code, 130/143) or with MainRankFailed (its
        exit code) otherwise. `where` completes the message ("while evaluating cell X")."""
        code = self._exit_code_of_rank_0(0)
        if not code:
            return
        signum = code - 128
        if signum in {int(s) for s in signal.Signals}:
            if guard.signum is None:
                guard.adopt(signum)
            raise guard.interrupted(f"rank {self.rank} stopped with rank 0 {where}")
        raise MainRankFailed(self.rank, code, where)

    def _exit_code_of_rank_0(self, mine: int) -> int:
        """The exchange that ends a stretch rank 0 works alone (`leading`, `agreed_write`, `follow`): rank 0 gives
        its exit code (0: it went on), the others 0; every rank gets the largest, i.e. rank 0's."""
        return int(self._all_reduce([mine], torch.int64, torch_dist.ReduceOp.MAX)[0])

    def check_batch_size(self, batch_size: int) -> None:
        if batch_size % self.world_size:
            raise BadInput(f"training.batch_size {batch_size} does not divide by the {self.world_size} processes",
                           fix=f"use a batch size that is a multiple of {self.world_size} (it is the global batch)")

    def wrap(self, model: nn.Module, compile_fn: Callable[[nn.Module], nn.Module] = lambda m: m) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel as DDP

        device_ids = [self.local_rank] if next(model.parameters()).is_cuda else None
        return _Routed(model, compile_fn(DDP(model, device_ids=device_ids)), self.agree_step)

    def shard(self, iterator: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in iterator:
            usable = len(y) - len(y) % self.world_size
            if usable == 0:
                continue
            yield x[self.rank:usable:self.world_size], y[self.rank:usable:self.world_size]

    def agreed_stop(self, guard) -> Callable[[], bool]:
        """`guard.requested` agreed over all ranks (one all-reduce of one integer per call; see the module doc).
        A rank that saw no signal itself adopts the signal another rank saw, to exit with the same code."""
        def requested() -> bool:
            signum = int(self._all_reduce([guard.signum or 0], torch.int64, torch_dist.ReduceOp.MAX)[0])
            if signum and guard.signum is None:
                guard.adopt(signum)
            return bool(signum)

        return requested

    def agree_step(self, finite: bool = True, failure: BaseException | None = None, cell_level: bool = False) -> bool:
        """An agreement point of a training step (module doc): one all-reduce (max) of [how this rank failed (0
        not, 1 the cell, 2 the run), whether its loss is non-finite]. Returns whether the loss is finite on every
        rank. When a rank failed, the ranks exchange why (all_gather_object) and every rank whose own failure is
        not the worst one raises: CellFailedOnOtherRank or OtherRankFailed with the failing rank's message; a
        rank whose failure is the worst returns False and re-raises its own. A failure an agreement point raised
        (every rank already stopped there) returns False at once."""
        if isinstance(failure, (OtherRankFailed, CellFailedOnOtherRank)):
            return False
        mine = 0 if failure is None else 1 if cell_level else 2
        worst, non_finite = (int(v) for v in self._all_reduce([mine, int(not finite)], torch.int64,
                                                               torch_dist.ReduceOp.MAX))
        if not worst:
            return not non_finite
        told: list = [None] * self.world_size
        torch_dist.all_gather_object(told, None if failure is None else (
            mine, exit_code_of(failure), (str(failure).strip().splitlines() or [type(failure).__name__])[0][:500],
            getattr(failure, "fix", None)))
        if mine == worst:
            return False
        rank, (_, code, message, fix) = next((r, t) for r, t in enumerate(told) if t is not None and t[0] == worst)
        if worst == 1:
            raise CellFailedOnOtherRank(rank, message, fix)
        raise OtherRankFailed(rank, code, message)

    def sum_totals(self, total: float, seen: int) -> tuple[float, int]:
        t = self._all_reduce([total, float(seen)], torch.float64, torch_dist.ReduceOp.SUM)
        return float(t[0]), int(t[1])

    def _all_reduce(self, values: list, dtype: torch.dtype, op) -> torch.Tensor:
        """`values` reduced with `op` over all ranks, on this rank's device (nccl needs CUDA tensors)."""
        t = torch.tensor(values, dtype=dtype, device=getattr(self, "_device", torch.device("cpu")))
        torch_dist.all_reduce(t, op=op)
        return t.cpu()
