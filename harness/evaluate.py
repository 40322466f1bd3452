"""Evaluation of one trained cell, as the paper's appendix A.4 prescribes.

- clean accuracy on the test split;
- clean cross-entropy over the whole train and test splits, in eval mode, without augmentation; GE = test - train;
- adversarial accuracy per attack counted over *all* test samples: only correctly classified samples are
  attacked, and a sample misclassified when clean counts as wrong;
- the per-sample worst case over all attacks at the same eps (`worst_case`, `robust_acc`): a sample counts as
  robust only if every attack failed on it;
- for minimal-norm attacks (an optional `minimal_perturb` method, see harness.plugin.AttackPlugin) the accuracy
  at every eps of a curve, from the per-sample distances of one run;
- the sanity checks of harness.checks on a small subset, when the spec enables them.

Every attack runs on random number generators of its own (`isolated_rng`), seeded from the spec's seed and the
attack's label alone: its result does not depend on which attacks ran before it, and it leaves the generators of
the rest of the run as it found them.

The module itself is callable: `harness.evaluate(model, "digits", attacks=[...], eps=8)` is the Python API's
harness.api.evaluate (the package attribute `harness.evaluate` is this module once it is imported).
"""

from __future__ import annotations

import random
import time
import zlib
from contextlib import contextmanager
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from harness import registry
from harness.data import batches
from harness.errors import RunFailure
from harness.plugin import AttackPlugin, DataSplits, Split, adversary_mode

# foolbox and float arithmetic can land a hair outside the ball; more than this is a broken attack.
BALL_TOLERANCE = 1e-5


class AttackContractError(RunFailure):
    pass


def check_adversary(label: str, x: torch.Tensor, x_adv: torch.Tensor, eps: float) -> None:
    """The harness's own check of every attack result: right shape, finite, inside [0, 1] and the eps-ball."""
    if not isinstance(x_adv, torch.Tensor) or x_adv.shape != x.shape:
        got = tuple(x_adv.shape) if isinstance(x_adv, torch.Tensor) else type(x_adv).__name__
        raise AttackContractError(f"attack {label!r} returned {got}, expected a tensor of shape {tuple(x.shape)}",
                                  fix="the attack plugin's perturb() must return images shaped like its input")
    if not torch.isfinite(x_adv).all():
        raise AttackContractError(f"attack {label!r} returned non-finite values", fix="fix the attack plugin")
    low, high = float(x_adv.min()), float(x_adv.max())
    if low < -BALL_TOLERANCE or high > 1 + BALL_TOLERANCE:
        raise AttackContractError(f"attack {label!r} returned values in [{low:.6g}, {high:.6g}], outside [0, 1]",
                                  fix="the attack plugin must clip to the image domain")
    dist = float((x_adv - x).abs().max())
    if dist > eps + BALL_TOLERANCE:
        raise AttackContractError(
            f"attack {label!r} moved an image by {dist * 255:.4g}/255 in Linf, outside its eps-ball of {eps * 255:.4g}/255",
            fix="the attack plugin must project onto the eps-ball it was given")


def attack_seed(seed: int, label: str) -> int:
    """The seed of one attack's randomness: a function of the spec's seed and the attack's label alone (not of
    its position in the spec, nor of the attacks before it)."""
    return zlib.crc32(f"{seed}/{label}".encode())


@contextmanager
def isolated_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Run the body on random number generators of its own, seeded with `seed`, and restore the global ones after.

    Covers torch's CPU generator, every CUDA device's when CUDA is in use, numpy's and Python's global generators.
    Attacks draw random starts from the global torch generator, and torchattacks' and AutoAttack's APGD, APGD-T,
    FAB and Square even re-seed it (torch.manual_seed inside every call): without this, an attack's random start
    would depend on which attacks ran before it in the spec, and the attacks would shift every later random draw.
    """
    cuda = device.type == "cuda" or (torch.cuda.is_available() and torch.cuda.is_initialized())
    devices = list(range(torch.cuda.device_count())) if cuda else []
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=devices):
        torch.random.default_generator.manual_seed(seed)
        if devices:
            torch.cuda.manual_seed_all(seed)
        random.seed(seed)
        np.random.seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


@torch.no_grad()
def clean_pass(model: nn.Module, split: Split, data: DataSplits, batch_size: int, device: torch.device,
               on_batch: Callable[[], None] | None = None) -> tuple[float, torch.Tensor]:
    """Mean cross-entropy over the split and the per-sample correctness (bool, on CPU), in eval mode."""
    model.eval()
    total, correct = 0.0, []
    for x, y in batches(split, batch_size, device, transform=data.eval_transform):
        logits = model(x)
        total += float(F.cross_entropy(logits, y, reduction="sum"))
        correct.append((logits.argmax(1) == y).cpu())
        if on_batch is not None:
            on_batch()
    return total / max(len(split), 1), torch.cat(correct) if correct else torch.zeros(0, dtype=torch.bool)


def attacked_batches(model: nn.Module, perturb: Callable, label: str, eps: float, split: Split,
                     clean_correct: torch.Tensor, data: DataSplits, batch_size: int, device: torch.device,
                     on_batch: Callable[[], None] | None = None):
    """For each batch, the samples classified correctly when clean, attacked by `perturb` inside adversary_mode
    and checked by check_adversary: yields (their indices in the split, xs, ys, x_adv). Misclassified samples are
    never attacked (they count as wrong, paper A.4)."""
    offset = 0
    for x, y in batches(split, batch_size, device, transform=data.eval_transform):
        n = len(y)
        mask = clean_correct[offset:offset + n].to(device)
        if mask.any():
            xs, ys = x[mask], y[mask]
            with adversary_mode(model), registry.blame(getattr(perturb, "__self__", perturb),
                                                        getattr(perturb, "__name__", "perturb")):
                x_adv = perturb(model, xs, ys)
            check_adversary(label, xs, x_adv, eps)
            yield torch.nonzero(mask.cpu()).squeeze(1) + offset, xs, ys, x_adv
        offset += n
        if on_batch is not None:
            on_batch()


def adversarial_correct(model: nn.Module, attack: AttackPlugin, label: str, split: Split, clean_correct: torch.Tensor,
                        data: DataSplits, batch_size: int, device: torch.device,
                        on_batch: Callable[[], None] | None = None) -> torch.Tensor:
    """Per-sample correctness under `attack`; samples misclassified when clean stay wrong and are not attacked."""
    robust = clean_correct.clone()
    for idx, _, ys, x_adv in attacked_batches(model, attack.perturb, label, attack.eps, split, clean_correct, data,
                                              batch_size, device, on_batch):
        with torch.no_grad():
            robust[idx] = (model(x_adv).argmax(1) == ys).cpu()
    return robust


def is_minimal_norm(attack: AttackPlugin) -> bool:
    return callable(getattr(attack, "minimal_perturb", None))


def minimal_distances(model: nn.Module, attack: AttackPlugin, label: str, split: Split, clean_correct: torch.Tensor,
                      data: DataSplits, batch_size: int, device: torch.device,
                      on_batch: Callable[[], None] | None = None) -> torch.Tensor:
    """Per-sample Linf distance (in [0, 1] units, on CPU) to the closest adversarial example the attack found.

    0 for samples misclassified when clean, inf where the attack found none. The harness measures the distances
    itself and counts an example only if the model really misclassifies it, so an attack cannot overstate.
    """
    dist = torch.zeros(len(clean_correct))
    # no ball for a minimal-norm attack: the check still enforces shape, finiteness and [0, 1]
    for idx, xs, ys, x_adv in attacked_batches(model, attack.minimal_perturb, label, float("inf"), split,
                                               clean_correct, data, batch_size, device, on_batch):
        with torch.no_grad():
            fooled = (model(x_adv).argmax(1) != ys).cpu()
        d = (x_adv - xs).flatten(1).abs().amax(1).cpu()
        d[~fooled] = float("inf")
        dist[idx] = d
    return dist


def curve_grid(entry: dict) -> list[float]:
    """The eps grid (0-255 scale) of a minimal-norm attack's curve: the spec's, else 9 points from 0 to 2 eps."""
    if entry.get("curve"):
        return sorted(float(e) for e in entry["curve"])
    top = min(2.0 * float(entry["eps"]), 255.0)
    return sorted({round(top * k / 8, 6) for k in range(9)})


def per_sample_robust(model: nn.Module, entry: dict, attack: AttackPlugin, split: Split, clean_correct: torch.Tensor,
                      data: DataSplits, batch_size: int, device: torch.device,
                      on_batch: Callable[[], None] | None = None, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """Per-sample robustness at the attack's eps and the attack's report entry (acc, and a curve if minimal-norm).

    The attack runs on generators of its own, seeded by attack_seed(seed, its label) (see isolated_rng)."""
    with isolated_rng(attack_seed(seed, str(entry.get("label", entry["name"]))), device):
        return _per_sample_robust(model, entry, attack, split, clean_correct, data, batch_size, device, on_batch)


def _per_sample_robust(model: nn.Module, entry: dict, attack: AttackPlugin, split: Split, clean_correct: torch.Tensor,
                       data: DataSplits, batch_size: int, device: torch.device,
                       on_batch: Callable[[], None] | None) -> tuple[torch.Tensor, dict]:
    n = max(len(clean_correct), 1)
    result: dict = {"name": entry["name"], "eps": entry["eps"]}
    if is_minimal_norm(attack):
        dist = minimal_distances(model, attack, entry["label"], split, clean_correct, data, batch_size, device,
                                 on_batch)
        robust = dist > attack.eps
        grid = curve_grid(entry)
        found = dist[clean_correct]
        median = float(found.median()) * 255 if len(found) else None
        result.update(kind="minimal-norm",
                      curve={"eps": grid, "acc": [100.0 * float((dist > e / 255.0).sum()) / n for e in grid]},
                      median_distance=median if median is not None and median != float("inf") else None)
    else:
        robust = adversarial_correct(model, attack, entry["label"], split, clean_correct, data, batch_size, device,
                                     on_batch)
        result["kind"] = "fixed-eps"
    result["acc"] = 100.0 * float(robust.sum()) / n
    return robust, result


def worst_case(entries: list[dict], robust: dict[str, torch.Tensor], n: int) -> dict:
    """Per eps (0-255 scale, as a string key): accuracy when a sample must survive every attack at that eps."""
    out: dict[str, dict] = {}
    for entry in entries:
        key = f"{float(entry['eps']):g}"
        slot = out.setdefault(key, {"attacks": [], "_robust": None})
        slot["attacks"].append(entry["label"])
        r = robust[entry["label"]]
        slot["_robust"] = r.clone() if slot["_robust"] is None else slot["_robust"] & r
    for slot in out.values():
        slot["acc"] = 100.0 * float(slot.pop("_robust").sum()) / max(n, 1)
    return out


def batch_count(data: DataSplits, attacks: int, batch_size: int) -> int:
    """How many times evaluate calls `on_batch` when `attacks` attacks run: after each batch of the clean passes over
    the train and test splits and of every attack over the test split (the size of the evaluation's progress bar)."""
    per = [-(-len(split) // batch_size) if split is not None else 0 for split in (data.train, data.test)]
    return per[0] + per[1] * (1 + attacks)


def no_train_split_reason(data: DataSplits) -> str:
    """Why a test-only dataset's (DataSplits.train None) train loss and GE are null in the report."""
    source = f" ({data.source})" if data.source else ""
    return (f"the dataset plugin returned no training split{source}: the training loss, and GE = test loss - "
            "train loss, need one; evaluated on the test split only")


def evaluate(model: nn.Module, data: DataSplits, attacks: list[tuple[dict, AttackPlugin]], batch_size: int,
             device: torch.device, on_batch: Callable[[], None] | None = None, checks: dict | None = None,
             timings: dict | None = None, seed: int = 0, on_checks_batch: Callable[[], None] | None = None,
             finished: dict | None = None, on_attack: Callable[[str, torch.Tensor, dict], None] | None = None) -> dict:
    """The metrics of one cell (accuracies in percent, as the paper prints them).

    `finished` maps attack labels to (per-sample robustness, report entry) of attacks already run on this model and
    test split (harness eval's resume after an interruption): they are taken as they are, not run again.
    `on_attack(label, robust, metrics)` is called after each attack that ran, with its per-sample robustness and
    the metrics so far (harness eval records what is done).

    `on_batch` is called after every batch of the evaluation, `on_checks_batch` once before the sanity checks and
    after every batch of them (the runner's progress and stop checks).

    `seed` (the spec's) seeds each attack's own generators, with the attack's label (see isolated_rng).

    Metrics are results only; wall-clock seconds per attack (and for the checks) go into `timings` when given, so
    that the same cell evaluated twice has equal metrics.
    """
    timings = {} if timings is None else timings
    # A test-only dataset (DataSplits.train None, evaluation only): no train loss and no GE. They are null with
    # the reason in `unavailable`, never a number made up from the test split.
    train_loss = clean_pass(model, data.train, data, batch_size, device, on_batch)[0] if data.train is not None \
        else None
    test_loss, correct = clean_pass(model, data.test, data, batch_size, device, on_batch)
    n = max(len(correct), 1)
    metrics = {
        "clean_acc": 100.0 * float(correct.sum()) / n,
        "train_loss": train_loss,
        "test_loss": test_loss,
        "ge": test_loss - train_loss if train_loss is not None else None,
        "attacks": {},
    }
    if train_loss is None:
        reason = no_train_split_reason(data)
        metrics["unavailable"] = {"train_loss": reason, "ge": reason}
    per_sample = {}
    for entry, attack in attacks:
        if finished and entry["label"] in finished:
            per_sample[entry["label"]], metrics["attacks"][entry["label"]] = finished[entry["label"]]
            continue
        started = time.perf_counter()
        per_sample[entry["label"]], metrics["attacks"][entry["label"]] = per_sample_robust(
            model, entry, attack, data.test, correct, data, batch_size, device, on_batch, seed=seed)
        timings.setdefault("attacks", {})[entry["label"]] = time.perf_counter() - started
        if on_attack is not None:
            on_attack(entry["label"], per_sample[entry["label"]], metrics)
    first = attacks[0][0]["label"] if attacks else None
    metrics["pgd_acc"] = metrics["attacks"][first]["acc"] if first else None
    metrics["worst_case"] = worst_case([e for e, _ in attacks], per_sample, len(correct))
    metrics["robust_acc"] = metrics["worst_case"][f"{float(attacks[0][0]['eps']):g}"]["acc"] if attacks else None
    if checks is not None and checks.get("enabled", True) and attacks:
        from harness.checks import run_checks

        started = time.perf_counter()
        if on_checks_batch is not None:
            on_checks_batch()
        metrics["checks"] = run_checks(model, data, attacks, checks, batch_size, device, seed=seed,
                                       on_batch=on_checks_batch, outcomes=(correct, per_sample))
        timings["checks"] = time.perf_counter() - started
    return metrics


import sys  # noqa: E402  (here, at the end: the module's class is swapped once everything above is defined)
import types  # noqa: E402


class _CallableModule(types.ModuleType):
    """This module's type: calling `harness.evaluate(...)` runs harness.api.evaluate. The import system makes the
    package attribute `harness.evaluate` this submodule, so the API's function of the same name is reached through
    the module rather than by renaming either."""

    def __call__(self, *args, **kwargs):
        from harness.api import evaluate as api_evaluate

        return api_evaluate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
