"""Defenses `none` (plain cross-entropy) and `pgd-at` (Madry et al.'s Linf PGD adversarial training)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from harness.compat import import_advertorch
from harness.plugin import ATTACK_BN_OPTION, PGD_OPTIONS, DefensePlugin, PGDSettings, adversary_mode


class NoDefense(DefensePlugin):
    """Plain training: cross-entropy on the clean batch, whatever the strength."""

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x), y)


class PGDAdversarialTraining(PGDSettings, DefensePlugin):
    """Linf PGD adversarial training through advertorch: every clean image replaced by its adversary (paper A.3)."""

    options_schema = {"type": "object", "additionalProperties": False,
                      "properties": {**PGD_OPTIONS, **ATTACK_BN_OPTION}}

    def __init__(self, eps: float, attack_bn: str = "eval", **pgd):
        super().__init__(eps, **pgd)
        self.attack_bn = attack_bn

    def adversary(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        attacks = import_advertorch()
        pgd = attacks.LinfPGDAttack(model, eps=self.eps, nb_iter=self.steps, eps_iter=self.step_size,
                                    rand_init=self.random_start, clip_min=0.0, clip_max=1.0)
        with adversary_mode(model, self.attack_bn):
            return pgd.perturb(x, y).detach()

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.eps == 0:  # strength 0 is plain training; an attack in a 0-ball would only waste 10 passes
            return F.cross_entropy(model(x), y)
        return F.cross_entropy(model(self.adversary(model, x, y)), y)
