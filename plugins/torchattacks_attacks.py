"""Attacks `autoattack` (Croce & Hein 2020, through torchattacks' AutoAttack) and `square` (the gradient-free
Square attack, Andriushchenko et al. 2020, through torchattacks).

torchattacks expects inputs in [0, 1] (the harness's convention) and switches the model to eval mode itself;
the harness calls `perturb` inside `adversary_mode`, where the model already is in eval mode with frozen
parameters."""

from __future__ import annotations

import torch
from torch import nn

from harness.plugin import AttackPlugin


def _num_classes(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad():
        return int(model(x[:1]).shape[1])


class AutoAttack(AttackPlugin):
    """torchattacks.AutoAttack, Linf: APGD-CE, APGD-T, FAB-T and Square (5,000 queries) in the standard version."""

    options_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "version": {"description": "standard: APGD-CE, APGD-T, FAB-T, Square (the leaderboard's); plus: "
                                       "more restarts and targets; rand: APGD-CE and APGD-DLR with expectation "
                                       "over transformation, for randomized defenses.",
                        "enum": ["standard", "plus", "rand"], "default": "standard"},
            "seed": {"description": "Seed of the attacks' random starts.", "type": "integer", "minimum": 0,
                     "default": 0},
        },
    }

    def __init__(self, eps: float, version: str = "standard", seed: int = 0):
        super().__init__(eps)
        self.version, self.seed = version, seed

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        import torchattacks

        if self.eps == 0:  # APGD's step size is 2 eps: nothing to search, and the library divides by it
            return x.clone()
        attack = torchattacks.AutoAttack(model, norm="Linf", eps=self.eps, version=self.version,
                                         n_classes=_num_classes(model, x), seed=self.seed)
        return attack(x, y).detach()


class Square(AttackPlugin):
    """torchattacks.Square, Linf: random search on square patches, no gradients (detects gradient masking)."""

    gradient_free = True
    options_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "n_queries": {"description": "Model queries per sample and restart.", "type": "integer", "minimum": 1,
                          "default": 1000},
            "restarts": {"description": "Independent restarts.", "type": "integer", "minimum": 1, "default": 1},
            "p_init": {"description": "Initial fraction of pixels changed per square.", "type": "number",
                       "exclusiveMinimum": 0, "maximum": 1, "default": 0.8},
            "seed": {"type": "integer", "minimum": 0, "default": 0},
        },
    }

    def __init__(self, eps: float, n_queries: int = 1000, restarts: int = 1, p_init: float = 0.8, seed: int = 0):
        super().__init__(eps)
        self.n_queries, self.restarts, self.p_init, self.seed = n_queries, restarts, p_init, seed

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        import torchattacks

        if self.eps == 0:
            return x.clone()
        attack = torchattacks.Square(model, norm="Linf", eps=self.eps, n_queries=self.n_queries,
                                     n_restarts=self.restarts, p_init=self.p_init, loss="margin", seed=self.seed)
        return attack(x, y).detach()
