"""Evaluation of one trained cell, as the paper's appendix A.4 prescribes.

- clean accuracy on the test split;
- clean cross-entropy over the whole train and test splits, in eval mode, without augmentation; GE = test - train;
- adversarial accuracy per attack counted over *all* test samples: only correctly classified samples are
  attacked, and a sample misclassified when clean counts as wrong.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

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


def adversarial_correct(model: nn.Module, attack: AttackPlugin, label: str, split: Split, clean_correct: torch.Tensor,
                        data: DataSplits, batch_size: int, device: torch.device,
                        on_batch: Callable[[], None] | None = None) -> torch.Tensor:
    """Per-sample correctness under `attack`; samples misclassified when clean stay wrong and are not attacked."""
    robust = clean_correct.clone()
    offset = 0
    for x, y in batches(split, batch_size, device, transform=data.eval_transform):
        n = len(y)
        mask = clean_correct[offset:offset + n].to(device)
        if mask.any():
            xs, ys = x[mask], y[mask]
            with adversary_mode(model):
                x_adv = attack.perturb(model, xs, ys)
            check_adversary(label, xs, x_adv, attack.eps)
            with torch.no_grad():
                still = (model(x_adv).argmax(1) == ys).cpu()
            idx = torch.nonzero(mask.cpu()).squeeze(1) + offset
            robust[idx] = still
        offset += n
        if on_batch is not None:
            on_batch()
    return robust


def evaluate(model: nn.Module, data: DataSplits, attacks: list[tuple[dict, AttackPlugin]], batch_size: int,
             device: torch.device, on_batch: Callable[[], None] | None = None) -> dict:
    """The metrics of one cell (accuracies in percent, as the paper prints them)."""
    train_loss, _ = clean_pass(model, data.train, data, batch_size, device, on_batch)
    test_loss, correct = clean_pass(model, data.test, data, batch_size, device, on_batch)
    n = max(len(correct), 1)
    metrics = {
        "clean_acc": 100.0 * float(correct.sum()) / n,
        "train_loss": train_loss,
        "test_loss": test_loss,
        "ge": test_loss - train_loss,
        "attacks": {},
    }
    for entry, attack in attacks:
        robust = adversarial_correct(model, attack, entry["label"], data.test, correct, data, batch_size, device,
                                     on_batch)
        metrics["attacks"][entry["label"]] = {"name": entry["name"], "eps": entry["eps"],
                                              "acc": 100.0 * float(robust.sum()) / n}
    first = attacks[0][0]["label"] if attacks else None
    metrics["pgd_acc"] = metrics["attacks"][first]["acc"] if first else None
    return metrics
