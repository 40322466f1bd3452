"""Defenses `trades` (Zhang et al. 2019) and `fgsm-rs` (FGSM with random start, Wong, Rice & Kolter 2020).

Both compute their adversary with advertorch's `perturb_iterative`, the loop behind its LinfPGDAttack, because
each needs a starting point that LinfPGDAttack cannot take: TRADES starts at x + 0.001 * N(0, I) (its reference
implementation; at x itself the KL gradient is exactly zero), FGSM-RS at a uniform point of the eps-ball that
`perturb_iterative(delta_init=...)` then moves by one signed step of 1.25 eps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from harness.compat import import_advertorch
from harness.plugin import ATTACK_BN_OPTION, DefensePlugin, adversary_mode, to_unit


def _perturb_iterative():
    import_advertorch()  # patches torch first
    from advertorch.attacks.iterative_projected_gradient import perturb_iterative

    return perturb_iterative


def _kl_sum(logits: torch.Tensor, p_natural: torch.Tensor) -> torch.Tensor:
    return F.kl_div(F.log_softmax(logits, dim=1), p_natural, reduction="sum")


class TRADES(DefensePlugin):
    """TRADES: CE(f(x), y) + beta * KL(f(x) || f(x')), x' maximizing the KL in the eps-ball (Zhang et al. 2019)."""

    options_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "beta": {"description": "Weight of the robustness (KL) term; 1/lambda in the paper. 6 is its "
                                    "CIFAR-10 choice.", "type": "number", "minimum": 0, "default": 6.0},
            "steps": {"description": "Iterations of the inner KL maximization.", "type": "integer", "minimum": 1,
                      "default": 10},
            "step_size": {"description": "Step size of the inner maximization, 0-255 scale.", "type": "number",
                          "exclusiveMinimum": 0, "default": 2.0},
            **ATTACK_BN_OPTION,
        },
    }

    def __init__(self, eps: float, beta: float = 6.0, steps: int = 10, step_size: float = 2.0,
                 attack_bn: str = "eval"):
        super().__init__(eps)
        self.beta, self.steps, self.step_size, self.attack_bn = beta, steps, to_unit(step_size), attack_bn

    def adversary(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        perturb_iterative = _perturb_iterative()
        with adversary_mode(model, self.attack_bn):
            with torch.no_grad():
                p_natural = F.softmax(model(x), dim=1)
            delta = 0.001 * torch.randn_like(x)
            x_adv = perturb_iterative(x, p_natural, model, nb_iter=self.steps, eps=self.eps,
                                      eps_iter=self.step_size, loss_fn=_kl_sum, delta_init=delta,
                                      clip_min=0.0, clip_max=1.0)
        return x_adv.detach()

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.eps == 0 or self.beta == 0:
            return F.cross_entropy(model(x), y)
        x_adv = self.adversary(model, x)
        logits = model(x)
        robust = F.kl_div(F.log_softmax(model(x_adv), dim=1), F.softmax(logits, dim=1), reduction="batchmean")
        return F.cross_entropy(logits, y) + self.beta * robust


class FGSMRandomStart(DefensePlugin):
    """Fast adversarial training: FGSM from a uniform random start, step 1.25 eps (Wong et al. 2020)."""

    options_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "step_factor": {"description": "FGSM step as a multiple of eps (alpha = step_factor * eps); the "
                                           "paper's 1.25 avoids catastrophic overfitting at 8/255.",
                            "type": "number", "exclusiveMinimum": 0, "default": 1.25},
            **ATTACK_BN_OPTION,
        },
    }

    def __init__(self, eps: float, step_factor: float = 1.25, attack_bn: str = "eval"):
        super().__init__(eps)
        self.step_factor, self.attack_bn = step_factor, attack_bn

    def adversary(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        perturb_iterative = _perturb_iterative()
        delta = torch.empty_like(x).uniform_(-self.eps, self.eps)
        delta = (x + delta).clamp(0.0, 1.0) - x  # the start inside the image domain, as Wong et al. clamp it
        with adversary_mode(model, self.attack_bn):
            x_adv = perturb_iterative(x, y, model, nb_iter=1, eps=self.eps, eps_iter=self.step_factor * self.eps,
                                      loss_fn=nn.CrossEntropyLoss(reduction="sum"), delta_init=delta,
                                      clip_min=0.0, clip_max=1.0)
        return x_adv.detach()

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.eps == 0:
            return F.cross_entropy(model(x), y)
        return F.cross_entropy(model(self.adversary(model, x, y)), y)
