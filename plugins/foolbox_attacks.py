"""Attack `foolbox-pgd`: foolbox's Linf PGD (Madry et al.), untargeted, for evaluation."""

from __future__ import annotations

import torch
from torch import nn

from harness.compat import import_foolbox
from harness.plugin import AttackPlugin, PGDSettings


class FoolboxLinfPGD(PGDSettings, AttackPlugin):
    """foolbox.attacks.LinfPGD with an absolute step size on the 0-255 scale."""

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        fb = import_foolbox()
        fmodel = fb.PyTorchModel(model, bounds=(0.0, 1.0), device=x.device)
        attack = fb.attacks.LinfPGD(abs_stepsize=self.step_size, steps=self.steps, random_start=self.random_start)
        _, clipped, _ = attack(fmodel, x, y, epsilons=self.eps)
        return clipped


class FoolboxFGSM(AttackPlugin):
    """foolbox.attacks.LinfFastGradientAttack: one signed-gradient step of size eps (Goodfellow et al. 2015)."""

    options_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "random_start": {"description": "Start from a uniform random point in the eps-ball.",
                             "type": "boolean", "default": False},
        },
    }

    def __init__(self, eps: float, random_start: bool = False):
        super().__init__(eps)
        self.random_start = random_start

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        fb = import_foolbox()
        fmodel = fb.PyTorchModel(model, bounds=(0.0, 1.0), device=x.device)
        _, clipped, _ = fb.attacks.LinfFastGradientAttack(random_start=self.random_start)(fmodel, x, y,
                                                                                           epsilons=self.eps)
        return clipped


class FoolboxLinfDeepFool(AttackPlugin):
    """foolbox.attacks.LinfDeepFoolAttack: a minimal-norm attack, reported as a robustness curve over eps.

    Besides `perturb` (the adversary clipped to the eps-ball, as every attack) it implements the optional
    minimal-norm protocol `minimal_perturb(model, x, y)`: the closest adversarial example it finds, at whatever
    distance. The harness measures the Linf distances itself, keeps only examples the model really misclassifies,
    and reads the accuracy at every eps of the curve from one run. DeepFool overshoots by `overshoot`, so its
    distances bound the true minimal distance from above (and the curve bounds robust accuracy from above).
    """

    minimal_norm = True
    options_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "steps": {"description": "Maximum DeepFool iterations.", "type": "integer", "minimum": 1, "default": 50},
            "candidates": {"description": "Classes considered per step (the most likely ones); capped at the "
                                          "number of classes.", "type": "integer", "minimum": 2, "default": 10},
            "overshoot": {"description": "Relative overshoot past the linearized boundary.", "type": "number",
                          "minimum": 0, "default": 0.02},
        },
    }

    def __init__(self, eps: float, steps: int = 50, candidates: int = 10, overshoot: float = 0.02):
        super().__init__(eps)
        self.steps, self.candidates, self.overshoot = steps, candidates, overshoot

    def _attack(self, model: nn.Module, x: torch.Tensor):
        fb = import_foolbox()
        fmodel = fb.PyTorchModel(model, bounds=(0.0, 1.0), device=x.device)
        with torch.no_grad():
            classes = int(model(x[:1]).shape[1])
        attack = fb.attacks.LinfDeepFoolAttack(steps=self.steps, candidates=min(self.candidates, classes),
                                               overshoot=self.overshoot)
        return fmodel, attack

    def minimal_perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        fmodel, attack = self._attack(model, x)
        return attack.run(fmodel, x, y).detach()

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        fmodel, attack = self._attack(model, x)
        _, clipped, _ = attack(fmodel, x, y, epsilons=self.eps)
        return clipped
