"""`harness selftest`: the harness checks itself on this machine (CPU or GPU) before its numbers are trusted.

Like `accelerate test` or `torch.utils.collect_env`: one command a user runs on a new machine. On scikit-learn's
8x8 digits (offline, 1,437 training and 360 test images) with the built-in plugins (LeNet + spectral
normalization, `pgd-at`, `advertorch-pgd`, `foolbox-pgd`), every check goes through the harness's own code paths:
`harness.runner.run` for training and resuming (as `harness run` does: resolved precision and layout, checkpoints,
evaluation, report), `harness.evaluate` for attacking (adversary_mode, check_adversary), `harness.data` /
`harness.performance` for batches, `harness.bench` for speed. Nothing here re-implements training, attacks or
resuming: a check that passes says that the code `harness run` uses computes correctly on this device.

The checks (CHECKS, in order; `info` checks never fail the command):
- `training`: a short PGD-AT run (2 epochs) in this device's resolved precision and layout; its loss falls.
- `pgd-agreement`: advertorch's and foolbox's Linf PGD from the same start (no random start) on the trained model
  agree on which samples are robust, on at least AGREEMENT_MIN of the attacked samples.
- `bf16-attack`: the training adversary (`pgd-at`) in bf16 autocast and in fp32 fools the model at rates within
  harness.performance.BF16_ASR_TOLERANCE_PP percentage points (the tolerance tests/test_performance.py holds).
- `data-path`: one epoch of training batches (CIFAR's crop-and-flip augmentation attached) from the splits held
  on the device equals, with torch.equal, the same epoch from the host (on CPU both are host memory).
- `in-ball`: every adversary of the attacks above, with and without random start, passes the harness's own
  check_adversary (finite, in [0, 1], within eps + BALL_TOLERANCE in Linf).
- `resume`: 2 epochs straight against 1 epoch, then `harness run` resuming the checkpoint for the second:
  torch.equal on every parameter and buffer (spectral-norm vectors included) and every optimizer tensor. On CUDA
  both run with deterministic algorithms (resumed runs can only be bit-identical with deterministic kernels).
- `speed` (info): `harness bench`'s training-step ratio against advertorch's LinfPGDAttack called plainly.

`run` returns the JSON document (also written to OUT/selftest.json); any failed check makes `harness selftest`
exit 1.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import os
import platform
import tempfile
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import torch
from rich import box
from rich.console import Console
from rich.table import Table
from torch import nn

import harness
from harness import checkpoint, registry
from harness import spec as spec_mod
from harness.data import batches
from harness.errors import BadInput
from harness.evaluate import (BALL_TOLERANCE, attack_seed, attacked_batches, check_adversary, clean_pass,
                              isolated_rng)
from harness.paths import check_writable
from harness.performance import BF16_ASR_TOLERANCE_PP, Performance, Runtime
from harness.plugin import DataSplits, Split, to_unit
from harness.report import write_json_atomic
from harness.runner import environment, load_data, plan
from harness.transforms import CifarAugment

# The bar for two independent PGD implementations from the same start: per-sample robustness agrees on at
# least this fraction of the attacked samples (measured on CPU: all of them agree).
AGREEMENT_MIN = 0.99

# The training check: the last epoch's mean training loss at most this fraction of the first's (measured on CPU,
# bf16: 0.79). A margin, not just "lower": a loss that stays flat still moves by noise (random starts differ).
LOSS_DROP = 0.9

TRAIN_EPOCHS = 2  # the straight run; the resume check trains TRAIN_EPOCHS - 1, then resumes for the last one
ATTACK_EPS = 32  # 0-255 scale: the evaluation attacks' radius; twice the training strength, so attacks succeed
PGD10 = {"steps": 10, "step_size": 4}
# The attacks whose adversaries the in-ball check examines: key -> (plugin, options), all at ATTACK_EPS.
EVAL_ATTACKS = {
    "advertorch-pgd": ("advertorch-pgd", dict(PGD10, random_start=False)),
    "foolbox-pgd": ("foolbox-pgd", dict(PGD10, random_start=False)),
    "advertorch-pgd random start": ("advertorch-pgd", dict(PGD10, random_start=True)),
    "foolbox-pgd random start": ("foolbox-pgd", dict(PGD10, random_start=True)),
}
# The training adversary of the bf16 check (tests/test_performance.py's setting): PGD-10 without random start.
BF16_ATTACK = {"steps": 10, "step_size": 8.0, "random_start": False}
SPEC = {  # the selftest's experiment, validated by harness.spec like any user's
    "name": "selftest",
    "description": "harness selftest: LeNet+SN, PGD-AT at 16/255 on scikit-learn's digits",
    "seed": 0,
    "dataset": {"name": "digits"},
    "models": [{"name": "lenet", "options": {"spectral_norm": True}}],
    "defense": {"name": "pgd-at", "strengths": [16], "options": {"steps": 5, "step_size": 6, "random_start": True}},
    "training": {"epochs": TRAIN_EPOCHS, "batch_size": 64, "lr": 0.1, "momentum": 0.9},
    "evaluation": {"batch_size": 500, "checks": {"enabled": False},
                   "attacks": [{"name": "advertorch-pgd", "eps": ATTACK_EPS,
                                "options": EVAL_ATTACKS["advertorch-pgd"][1]}]},
    "analysis": {"enabled": False},
}


@dataclass
class Result:
    """One check's outcome: `status` pass / fail / info, the measured value in words (and as a number when it is
    one), the tolerance it was held to, and details for the JSON."""

    status: str
    measured: str
    tolerance: str
    value: float | None = None
    details: dict = field(default_factory=dict)


@dataclass
class Adversaries:
    """One attack's adversaries of the correctly classified test samples, and which of them fool the model."""

    label: str
    eps: float  # [0, 1] units
    x: torch.Tensor
    x_adv: torch.Tensor
    fooled: torch.Tensor  # bool, CPU

    @property
    def success_pct(self) -> float:
        return 100.0 * float(self.fooled.float().mean()) if len(self.fooled) else 0.0


def resolve_device(choice: str) -> torch.device:
    """--device auto|cpu|cuda; cuda without a CUDA device is bad input (exit 2)."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise BadInput("--device cuda, but torch sees no CUDA device on this machine "
                       f"(torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none'})",
                       fix="run `harness selftest --device cpu` (or `--device auto`), or install a CUDA build of "
                           "torch that matches this machine's driver")
    return torch.device("cuda" if choice != "cpu" and torch.cuda.is_available() else "cpu")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def deterministic(device: torch.device) -> Iterator[list[str]]:
    """On CUDA: deterministic kernels for the block (cuDNN and torch's own; bit-identical resumes need them), then
    the previous settings back. Yields the list that collects torch's warnings about ops without a deterministic
    implementation. On CPU nothing changes: its kernels are deterministic already."""
    notes: list[str] = []
    if device.type != "cuda":
        yield notes
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what torch asks for deterministic cuBLAS
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield notes
        ours = [w for w in caught if "determinis" in str(w.message)]
        notes += sorted({str(w.message).splitlines()[0] for w in ours})
        for w in caught:  # any other warning goes on to the user as it would have
            if w not in ours:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.deterministic = before[2]


def cpu_model() -> str:
    """The CPU's model name: /proc/cpuinfo on Linux (platform.processor() there is only the architecture)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def environment_info(device: torch.device) -> dict:
    """harness.runner's environment record plus what a hardware check needs: CPU model, GPU, CUDA/cuDNN, the
    performance options `auto` resolves to here."""
    env = environment(device)
    env.update(cpu_model=cpu_model(), cpu_count=os.cpu_count(), cuda_version=torch.version.cuda,
               cudnn_version=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
               performance=Performance.from_spec(None, device).describe())
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu_name=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   gpu_capability=f"{props.major}.{props.minor}")
    else:
        env["gpu_name"] = None
    return env


class Context:
    """What the checks share, computed once when first asked for: the spec, the trained model of the straight run,
    the adversaries of each attack."""

    def __init__(self, device: torch.device, work: Path):
        self.device, self.work = device, work
        self.spec = spec_mod.validate(dict(copy.deepcopy(SPEC), device=device.type))
        self.cell = plan(self.spec)[0]
        self.performance = Performance.from_spec(self.spec["performance"], device)
        self._straight: dict | None = None
        self._model: nn.Module | None = None
        self._data: DataSplits | None = None
        self._correct: torch.Tensor | None = None
        self._adversaries: dict[str, Adversaries] = {}
        self.determinism_notes: list[str] = []

    # ------------------------------------------------------------------------------------------- training runs

    def run(self, name: str, epochs: int, *, force: bool = False) -> dict:
        """`harness run` of the selftest spec with `epochs` epochs into work/<name> (resuming what is there)."""
        from harness.runner import run as run_spec

        spec = copy.deepcopy(self.spec)
        spec["training"]["epochs"] = epochs
        with deterministic(self.device) as notes:
            report = run_spec(spec, self.work / name, Console(quiet=True), force=force)
        self.determinism_notes += [n for n in notes if n not in self.determinism_notes]
        return report

    @property
    def straight(self) -> dict:
        """The report of the straight TRAIN_EPOCHS-epoch run (its checkpoint holds the final model)."""
        if self._straight is None:
            self._straight = self.run("straight", TRAIN_EPOCHS)
        return self._straight

    def checkpoint_path(self, name: str) -> Path:
        return checkpoint.cell_paths(self.work / name, self.cell.id)[1]

    # ------------------------------------------------------------------------------------------- the trained model

    @property
    def data(self) -> DataSplits:
        if self._data is None:
            self._data = self.performance.prepare_data(load_data(self.spec))
        return self._data

    @property
    def model(self) -> nn.Module:
        """The straight run's final model, built and laid out as harness.runner.run_cell builds it, in eval mode."""
        if self._model is None:
            self.straight  # noqa: B018 - trains when not done yet
            entry, data = self.cell.model, self.data
            model = registry.load("model", entry["name"])(**entry["options"]).build(data.num_classes,
                                                                                   data.input_shape).to(self.device)
            self.performance.for_model(model, data.input_shape).prepare_model(model)
            model.load_state_dict(checkpoint.load(self.checkpoint_path("straight"))["model"])
            self._model = model.eval()
        return self._model

    @property
    def correct(self) -> torch.Tensor:
        """Which test samples the trained model classifies correctly (harness.evaluate.clean_pass; CPU bool)."""
        if self._correct is None:
            with self.evaluation():
                _, self._correct = clean_pass(self.model, self.data.test, self.data,
                                              self.spec["evaluation"]["batch_size"], self.device)
        return self._correct

    def evaluation(self) -> contextlib.AbstractContextManager:
        """The numeric setting of evaluation (fp32; on CUDA TF32 as the performance options say for evaluation)."""
        return self.performance.evaluation()

    # ------------------------------------------------------------------------------------------- adversaries

    def adversaries(self, key: str) -> Adversaries:
        """The adversaries of EVAL_ATTACKS[key] through the evaluation path (harness.evaluate.attacked_batches:
        adversary_mode, check_adversary), or of the `pgd-at` training adversary ("pgd-at fp32", "pgd-at bf16")."""
        if key not in self._adversaries:
            self._adversaries[key] = (self._training_adversaries(key.split()[-1]) if key.startswith("pgd-at")
                                      else self._eval_adversaries(key))
        return self._adversaries[key]

    def _eval_adversaries(self, key: str) -> Adversaries:
        name, options = EVAL_ATTACKS[key]
        attack = registry.load("attack", name)(eps=to_unit(ATTACK_EPS), **options)
        xs, advs, fooled = [], [], []
        # as harness.evaluate runs every attack: on generators of its own, seeded by the spec's seed and its label
        with self.evaluation(), isolated_rng(attack_seed(self.spec["seed"], key), self.device):
            for _, x, y, x_adv in attacked_batches(self.model, attack.perturb, key, attack.eps, self.data.test,
                                                   self.correct, self.data, self.spec["evaluation"]["batch_size"],
                                                   self.device):
                with torch.no_grad():
                    fooled.append((self.model(x_adv).argmax(1) != y).cpu())
                xs.append(x)
                advs.append(x_adv)
        return Adversaries(key, attack.eps, torch.cat(xs), torch.cat(advs), torch.cat(fooled))

    def _training_adversaries(self, precision: str) -> Adversaries:
        """The `pgd-at` defense's adversary (what training computes, in `precision`), judged in fp32 as
        evaluation judges; each batch checked by check_adversary."""
        defense = registry.load("defense", "pgd-at")(eps=to_unit(ATTACK_EPS), **BF16_ATTACK)
        mixed = Performance.from_spec({"precision": precision}, self.device)
        label, test = f"pgd-at {precision}", self.data.test
        correct = Split(test.images[self.correct.to(test.images.device)],
                        test.labels[self.correct.to(test.labels.device)])
        xs, advs, fooled = [], [], []
        for x, y in batches(correct, self.spec["evaluation"]["batch_size"], self.device,
                            transform=self.data.eval_transform):
            x = self.performance.inputs(x)  # the training layout, as the training step feeds the defense
            with self.evaluation():  # the fp32 reference in full fp32 on CUDA as well
                with mixed.autocast():
                    x_adv = defense.adversary(self.model, x, y)
                check_adversary(label, x, x_adv, defense.eps)
                with torch.no_grad():
                    fooled.append((self.model(x_adv).argmax(1) != y).cpu())
            xs.append(x)
            advs.append(x_adv)
        return Adversaries(label, defense.eps, torch.cat(xs), torch.cat(advs), torch.cat(fooled))


# ----------------------------------------------------------------------------------------------- the checks


def check_training(ctx: Context) -> Result:
    cell = ctx.straight["cells"][0]
    if cell["status"] != "done":
        return Result("fail", f"the cell failed: {cell.get('error', '?')}", "loss falls")
    losses = [h["train_objective"] for h in cell["history"]]
    perf = cell.get("performance", {})
    how = f"{perf.get('precision', '?')}, {'channels_last' if perf.get('channels_last') else 'NCHW'}"
    ok = losses[-1] <= LOSS_DROP * losses[0]
    return Result("pass" if ok else "fail", f"{losses[0]:.3f} -> {losses[-1]:.3f} ({how})",
                  f"last epoch <= {LOSS_DROP:g} x first", value=losses[-1] / losses[0],
                  details={"losses": losses, "performance": perf, "clean_acc": cell["metrics"]["clean_acc"],
                           "seconds": cell["timings"]["train"]})


def check_pgd_agreement(ctx: Context) -> Result:
    a, b = ctx.adversaries("advertorch-pgd"), ctx.adversaries("foolbox-pgd")
    agree = float((a.fooled == b.fooled).float().mean())
    differ = int((a.fooled != b.fooled).sum())
    informative = 0 < int(a.fooled.sum()) < len(a.fooled)
    ok = agree >= AGREEMENT_MIN and informative
    return Result("pass" if ok else "fail",
                  f"{100 * agree:.1f}% of {len(a.fooled)} ({differ} differ); success {a.success_pct:.1f}% / "
                  f"{b.success_pct:.1f}%", f">= {100 * AGREEMENT_MIN:g}% agree; success in (0, 100)%",
                  value=agree, details={"attacked": len(a.fooled), "differ": differ, "eps": ATTACK_EPS,
                                        "success_pct": {"advertorch": a.success_pct, "foolbox": b.success_pct}})


def check_bf16_attack(ctx: Context) -> Result:
    tolerance = f"|diff| <= {BF16_ASR_TOLERANCE_PP:g} points"
    if ctx.device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return Result("info", "not run: this GPU has no bf16", tolerance)
    fp32, bf16 = ctx.adversaries("pgd-at fp32"), ctx.adversaries("pgd-at bf16")
    gap = bf16.success_pct - fp32.success_pct
    informative = 0.0 < fp32.success_pct < 100.0
    ok = abs(gap) <= BF16_ASR_TOLERANCE_PP and informative
    agree = float((fp32.fooled == bf16.fooled).float().mean())
    return Result("pass" if ok else "fail",
                  f"{bf16.success_pct:.2f}% vs {fp32.success_pct:.2f}% ({gap:+.2f}; {100 * agree:.1f}% same)",
                  tolerance + "; fp32 success in (0, 100)%", value=gap,
                  details={"attacked": len(fp32.fooled), "fp32_pct": fp32.success_pct, "bf16_pct": bf16.success_pct,
                           "per_sample_agreement": agree, "eps": ATTACK_EPS, "attack": BF16_ATTACK,
                           "training_precision": ctx.performance.precision})


def _epoch(data: DataSplits, cfg: dict, device: torch.device, runtime: Runtime, seed: int) -> list[tuple]:
    """One epoch of training batches as harness.train.train draws them (harness.data.batches with the run's
    seeded generator, then the runtime's layout), copied to the CPU."""
    gen = torch.Generator().manual_seed(seed)
    return [(x.cpu(), y.cpu()) for x, y in runtime.batches(batches(data.train, cfg["batch_size"], device,
                                                                   transform=data.augment, generator=gen))]


def check_data_path(ctx: Context) -> Result:
    cfg, seed, device = ctx.spec["training"], ctx.spec["seed"], ctx.device
    augment = CifarAugment(padding=2)  # digits has no augmentation of its own; the CIFAR one is pad, crop, flip

    def splits() -> DataSplits:
        data = load_data(ctx.spec)
        data.augment = augment
        return data

    on_device = replace(ctx.performance, data_on_device=True)  # what `data_on_device` does, forced on here
    host_cpu = _epoch(splits(), cfg, torch.device("cpu"), Runtime(), seed)  # all on the host, augmented there
    host_dev = _epoch(splits(), cfg, device, Runtime(ctx.performance), seed)  # host splits, device batches
    resident = _epoch(on_device.prepare_data(splits()), cfg, device, Runtime(on_device), seed)
    same = [all(torch.equal(a[i], b[i]) for a, b in zip(ref, resident) for i in (0, 1)) and len(ref) == len(resident)
            for ref in (host_cpu, host_dev)]
    where = "both host memory on CPU" if device.type == "cpu" else f"splits on {device} vs host"
    return Result("pass" if all(same) else "fail",
                  f"{len(resident)} batches {'identical' if all(same) else 'DIFFER'} ({where})",
                  "torch.equal, every batch of one epoch",
                  details={"batches": len(resident), "equal_to_host_augmented_on_cpu": same[0],
                           "equal_to_host_batched_on_device": same[1], "augment": "CifarAugment(padding=2)"})


def check_in_ball(ctx: Context) -> Result:
    keys = list(EVAL_ATTACKS) + ["pgd-at fp32"] + (["pgd-at bf16"] if ctx.device.type == "cpu"
                                                   or torch.cuda.is_bf16_supported() else [])
    worst, count, broken = 0.0, 0, []
    for key in keys:
        try:
            adv = ctx.adversaries(key)
        except Exception as exc:  # harness.evaluate.AttackContractError names the attack and the distance
            broken.append(f"{key}: {getattr(exc, 'message', exc)}")
            continue
        check_adversary(key, adv.x, adv.x_adv, adv.eps)  # once more, on everything gathered
        worst = max(worst, float((adv.x_adv - adv.x).abs().amax()) / adv.eps)
        count += len(adv.x)
    if broken:
        return Result("fail", "; ".join(broken), f"Linf <= eps + {BALL_TOLERANCE:g}, values in [0, 1]",
                      details={"broken": broken})
    return Result("pass", f"{count} adversaries of {len(keys)} attacks; max |d|/eps {worst:.4f}",
                  f"Linf <= eps + {BALL_TOLERANCE:g}, values in [0, 1]", value=worst,
                  details={"attacks": keys, "adversaries": count})


def check_resume(ctx: Context) -> Result:
    ctx.straight  # noqa: B018 - the uninterrupted run
    ctx.run("resumed", TRAIN_EPOCHS - 1)
    report = ctx.run("resumed", TRAIN_EPOCHS, force=True)  # `harness run --force` finding the shorter run's checkpoint
    cell = report["cells"][0]
    if cell.get("resumed_from") != {"epoch": TRAIN_EPOCHS - 1, "step": 0}:
        return Result("fail", f"did not resume (resumed_from: {cell.get('resumed_from')})", "torch.equal")
    a, b = checkpoint.load(ctx.checkpoint_path("straight")), checkpoint.load(ctx.checkpoint_path("resumed"))
    tensors = [(f"model.{k}", a["model"][k], b["model"].get(k)) for k in a["model"]]
    for i, state in a["optimizer"]["state"].items():
        tensors += [(f"optimizer.{i}.{k}", v, b["optimizer"]["state"].get(i, {}).get(k)) for k, v in state.items()
                    if isinstance(v, torch.Tensor)]
    differ = [name for name, x, y in tensors if y is None or not torch.equal(x, y)]
    measured = (f"all {len(tensors)} tensors equal" if not differ
                else f"{len(differ)} of {len(tensors)} tensors differ ({', '.join(differ[:3])})")
    return Result("fail" if differ else "pass", measured, "torch.equal on every parameter, buffer, optimizer state",
                  details={"tensors": len(tensors), "differ": differ, "deterministic_notes": ctx.determinism_notes})


def check_speed(ctx: Context) -> Result:
    from harness.bench import bench_cell

    cfg = ctx.spec["training"]
    # the evaluation part of bench_cell is not reported here: one small batch of it is enough
    result = bench_cell(ctx.cell, ctx.spec, ctx.data, ctx.device, ctx.performance, cfg["batch_size"],
                        eval_batch_size=cfg["batch_size"], warmup=1, repeats=3)
    b, rate = result["baselines"], result["train"]["images_per_s"]
    return Result("info", f"{b['vs_plain']:.2f}x the plain advertorch call ({rate:.0f} images/s)",
                  "information (`harness bench`)", value=b["vs_plain"],
                  details={"train_images_per_s": rate, "vs_plain": b["vs_plain"],
                           "vs_plain_same": b["vs_plain_same"], "vs_hand": b["vs_hand"],
                           "performance": result["performance"], "batch_size": result["batch_size"]})


CHECKS: list[tuple[str, Callable[[Context], Result]]] = [
    ("training", check_training),
    ("pgd-agreement", check_pgd_agreement),
    ("bf16-attack", check_bf16_attack),
    ("data-path", check_data_path),
    ("in-ball", check_in_ball),
    ("resume", check_resume),
    ("speed", check_speed),
]


# ----------------------------------------------------------------------------------------------- the command


def run(device_choice: str, out_dir: Path, console: Console) -> dict:
    """Run every check of CHECKS on `device_choice`; write OUT/selftest.json and return it. A check that raises
    fails with the error as its measured value; the others still run."""
    device = resolve_device(device_choice)
    check_writable(out_dir)  # before minutes of work whose result could not be saved
    started = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="harness-selftest-") as work:
        ctx = Context(device, Path(work))
        ctx.performance.apply_global()
        for name, check in CHECKS:
            t0 = time.perf_counter()
            with console.status(f"selftest: {name} ...", spinner="line"):
                try:
                    result = check(ctx)
                except Exception as exc:  # a broken component is what a self-test is for: report it, go on
                    result = Result("fail", f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}",
                                    "no error")
                sync(device)
            results.append({"name": name, "status": result.status, "measured": result.measured,
                            "value": result.value, "tolerance": result.tolerance,
                            "seconds": round(time.perf_counter() - t0, 3), "details": result.details})
    doc = {
        "harness_version": harness.__version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "passed": all(r["status"] != "fail" for r in results),
        "seconds": round(time.perf_counter() - started, 3),
        "environment": environment_info(device),
        "checks": results,
    }
    write_json_atomic(out_dir / "selftest.json", doc)
    return doc


STYLES = {"pass": "green", "fail": "bold red", "info": "cyan"}


def render(doc: dict, console: Console) -> None:
    env = doc["environment"]
    where = env.get("gpu_name") or env.get("cpu_model")
    table = Table(title=f"harness selftest on {doc['device']} ({where}, torch {env['torch']}, "
                        f"{env['performance']['precision']}): {doc['seconds']:.0f} s",
                  title_justify="left", box=box.SIMPLE_HEAD)
    for col in ("check", "result", "measured", "tolerance"):
        table.add_column(col, overflow="fold")
    for r in doc["checks"]:
        table.add_row(r["name"], f"[{STYLES[r['status']]}]{r['status']}[/]", r["measured"], r["tolerance"])
    console.print(table)
