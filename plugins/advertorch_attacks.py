"""Attack `advertorch-pgd`: advertorch's Linf PGD (Madry et al.), untargeted, for evaluation.

The same attack as `foolbox-pgd` through a second, independent implementation; tests/test_attacks.py checks
that the two agree from the same starting point (a cross-check of both libraries and of the adapters)."""

from __future__ import annotations

import torch
from torch import nn

from harness.compat import import_advertorch
from harness.plugin import PGD_OPTIONS, AttackPlugin, PGDSettings


class AdvertorchLinfPGD(PGDSettings, AttackPlugin):
    """advertorch.attacks.LinfPGDAttack with an absolute step size on the 0-255 scale, best of `restarts` runs."""

    options_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            **PGD_OPTIONS,
            "restarts": {"description": "Independent runs; a sample counts as broken if any run breaks it "
                                        "(only useful with random_start).",
                         "type": "integer", "minimum": 1, "default": 1},
        },
    }

    def __init__(self, eps: float, steps: int = 10, step_size: float = 2.0, random_start: bool = True,
                 restarts: int = 1):
        super().__init__(eps, steps, step_size, random_start)
        self.restarts = restarts

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        attacks = import_advertorch()
        pgd = attacks.LinfPGDAttack(model, eps=self.eps, nb_iter=self.steps, eps_iter=self.step_size,
                                    rand_init=self.random_start, clip_min=0.0, clip_max=1.0)
        best = x.clone()
        remaining = torch.ones(len(y), dtype=torch.bool, device=x.device)
        for _ in range(self.restarts):
            if not remaining.any():
                break
            idx = torch.nonzero(remaining).squeeze(1)
            x_adv = pgd.perturb(x[idx], y[idx]).detach()
            best[idx] = x_adv
            with torch.no_grad():
                fooled = model(x_adv).argmax(1) != y[idx]
            remaining[idx[fooled]] = False
        return best
