"""Attack `foolbox-pgd`: foolbox's Linf PGD (Madry et al.), untargeted, for evaluation."""

from __future__ import annotations

import torch
from torch import nn

from harness.compat import import_foolbox
from harness.plugin import AttackPlugin, to_unit


class FoolboxLinfPGD(AttackPlugin):
    """foolbox.attacks.LinfPGD with an absolute step size on the 0-255 scale."""

    options_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "steps": {"type": "integer", "minimum": 1, "default": 10},
            "step_size": {"description": "Step size on the 0-255 scale.", "type": "number", "exclusiveMinimum": 0,
                          "default": 2.0},
            "random_start": {"type": "boolean", "default": True},
        },
    }

    def __init__(self, eps: float, steps: int = 10, step_size: float = 2.0, random_start: bool = True):
        super().__init__(eps)
        self.steps, self.step_size, self.random_start = steps, to_unit(step_size), random_start

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        fb = import_foolbox()
        fmodel = fb.PyTorchModel(model, bounds=(0.0, 1.0), device=x.device)
        attack = fb.attacks.LinfPGD(abs_stepsize=self.step_size, steps=self.steps, random_start=self.random_start)
        _, clipped, _ = attack(fmodel, x, y, epsilons=self.eps)
        return clipped
