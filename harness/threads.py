"""How many CPU threads torch computes with, and how its idle OpenMP threads wait: chosen so that a run degrades
gracefully on a shared machine, and chosen from the machine alone, never from its load.

Why. The offline default's training step (LeNet+SN, PGD-20, batch 64 of 8x8 digits, fp32 NCHW) is thousands of
small operations. On a 2-core x86 CPU (Xeon, Sapphire Rapids), median seconds per step, with the machine to
itself and beside one CPU-bound process (`python -c 'while True: pass'`), each setting in its own process:

| intra-op threads, OpenMP wait policy | alone         | beside one busy process |
| ------------------------------------ | ------------- | ----------------------- |
| 1                                    | 0.112-0.156   | 0.115-0.126             |
| 2, libgomp's default (spin ~300k)    | 0.095-0.116   | 0.326-0.495             |
| 2, GOMP_SPINCOUNT=10000              | 0.101-0.127   | 0.256-0.386             |
| 2, OMP_WAIT_POLICY=PASSIVE           | 0.148-0.181   | 0.154-0.362             |

Two threads gain at most 1.3x alone and lose 3-4x beside a busy process (torch's default on this machine; the
issue that asked for this saw 10-30x on an AMD EPYC under more load): a spinning OpenMP worker holds the core the
other process needs, and every one of the step's parallel regions then waits for a descheduled thread.

The choice, for every `harness` command and for `Performance.apply_global` (harness.run):
- intra-op threads: one fewer than the usable cores (affinity mask and cgroup CPU quota; physical cores, as
  torch counts them), at least one (`default_threads`). One competing process then never oversubscribes the
  cores; on 2 cores that is one thread, which ran as fast beside a busy process as alone (table).
- `OMP_WAIT_POLICY=PASSIVE`, set in the environment before torch is imported (`prepare_environment`, called at
  the top of harness.cli): idle workers sleep instead of spinning, so that more competitors than the spare core
  (or a thread count the user chose) slow a run down instead of collapsing it. It matters only with two or more
  threads; on small operations it costs latency (the table's last row, alone), which one thread does not pay.
- `OMP_NUM_THREADS` (or `MKL_NUM_THREADS`) set by the user, and `OMP_WAIT_POLICY`/`GOMP_SPINCOUNT` set by the
  user, are respected: the harness then changes nothing.

Not from the load: the thread count changes the bits of the results (oneDNN and MKL split reductions over the
threads: 20 training steps of the offline default with 1 and 2 threads end in different weights, each
reproducible), so a choice that followed the load average would make the same command on the same machine give
different numbers from run to run. The count is recorded in the report's environment (`describe`).
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

# What the harness sets when the user has not: see the module doc.
WAIT_POLICY_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}
USER_THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")

_state: dict = {"environment": {}, "chosen_by": None}


def prepare_environment(environ: "os._Environ | dict | None" = None) -> dict:
    """Set the OpenMP wait policy (WAIT_POLICY_ENV) where the user has set none; return what was set. Call it
    before torch is first imported: libgomp reads its environment once, when torch loads it."""
    environ = os.environ if environ is None else environ
    user_set = any(k in environ for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"))
    if user_set or "torch" in sys.modules:  # the user's choice; or too late: libgomp has read its environment
        return {}
    applied = {k: v for k, v in WAIT_POLICY_ENV.items() if environ.setdefault(k, v) == v}
    if environ is os.environ:
        _state["environment"] = applied
    return applied


def _cpus_in_affinity() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return list(range(os.cpu_count() or 1))


def _physical_cores(cpus: list[int]) -> int:
    """Cores among `cpus` (hyperthread siblings counted once, as torch's default count does)."""
    cores = set()
    for cpu in cpus:
        try:
            cores.add(Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/core_cpus_list").read_text().strip())
        except OSError:
            cores.add(str(cpu))
    return len(cores)


def _cgroup_cpu_limit() -> float | None:
    """The CPU quota of this process's cgroup in cores (v2 cpu.max or v1 cfs quota), None without one."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def usable_cores() -> int:
    """Physical cores this process may run on: its affinity mask (taskset, Slurm's cpuset), capped by a cgroup
    CPU quota (containers)."""
    cores = _physical_cores(_cpus_in_affinity())
    limit = _cgroup_cpu_limit()
    if limit is not None:
        cores = min(cores, max(1, math.floor(limit)))
    return max(1, cores)


def default_threads(cores: int | None = None) -> int:
    """One fewer than the usable cores, at least one (module doc)."""
    return max(1, (usable_cores() if cores is None else cores) - 1)


def configure() -> dict:
    """Set torch's intra-op thread count to `default_threads()` unless the user chose one through OMP_NUM_THREADS
    or MKL_NUM_THREADS (torch read those when it started); return `describe()`."""
    import torch

    user = [k for k in USER_THREAD_ENV if os.environ.get(k)]
    if user:
        _state["chosen_by"] = f"{user[0]}={os.environ[user[0]]} (set by the user)"
    else:
        cores = usable_cores()
        threads = default_threads(cores)
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        _state["chosen_by"] = f"harness: usable cores ({cores}) - 1, at least 1"
    return describe()


def cpu_model() -> str | None:
    """The CPU's model name (Linux /proc/cpuinfo), e.g. 'AMD EPYC 9654 96-Core Processor'."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def describe() -> dict:
    """The thread settings in effect, for the report's environment."""
    import torch

    capability = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", None)
    return {
        "cpu_model": cpu_model(),
        # the instruction set torch's CPU kernels were chosen for (e.g. AVX512, AVX2): other kernels, other sums
        "cpu_capability": capability() if callable(capability) else None,
        "amx": bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()),
        "usable_cores": usable_cores(),
        "intra_op_threads": torch.get_num_threads(),
        "chosen_by": _state["chosen_by"] or "torch's default (harness.threads.configure was not called)",
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"),
        "set_by_harness": sorted(_state["environment"]),
    }
