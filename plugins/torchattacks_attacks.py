"""Attacks `autoattack` (Croce & Hein 2020, through the reference implementation itself) and `square` (the
gradient-free Square attack, Andriushchenko et al. 2020, through torchattacks).

`autoattack` is a thin adapter over `pyautoattack` 0.2.0, a PyPI packaging of fra31/auto-attack (the code
RobustBench reports): its attack modules are the reference's files at its last commit (a392200, January 2023)
with only their imports made relative, and its `AutoAttack` class keeps the reference's constructor settings,
`set_version` and `run_standard_evaluation` loop (it drops TensorFlow support and prints through `logging`).
torchattacks 3.5.1's own `AutoAttack` is *not* the reference: it runs APGD-CE, APGD-T and FAB-T with 10
iterations instead of 100, with n_classes - 1 target classes instead of 9, and Square with a rescaled schedule,
so it overstates robustness; it is not used here.

Both libraries expect inputs in [0, 1] (the harness's convention); the harness calls `perturb` inside
`adversary_mode`, where the model already is in eval mode with frozen parameters. Both re-seed the global torch
RNG on every call (`torch.manual_seed(seed)` inside each attack); harness.evaluate isolates every attack's
randomness so that this does not leak into the attacks that follow.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from harness.errors import BadInput
from harness.plugin import AttackPlugin

# The fewest classes each of the reference's attacks can work with: DLR reads the third-largest logit, targeted DLR
# the fourth (the reference itself only warns, then fails indexing past the logits).
MIN_CLASSES = {"apgd-dlr": 3, "apgd-t": 4}


def _num_classes(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad():
        return int(model(x[:1]).shape[1])


class AutoAttack(AttackPlugin):
    """AutoAttack, Linf, through the reference implementation (fra31/auto-attack, packaged as pyautoattack 0.2.0).

    The reference's settings, per version (attacks run in this order; each later attack only on the samples every
    earlier one failed on; a sample counts as broken if any attack breaks it):

    - `standard` (RobustBench's): APGD-CE (cross-entropy, 100 iterations, 1 restart), APGD-T (targeted DLR loss,
      100 iterations, 1 restart for each of 9 target classes), FAB-T (targeted FAB, 100 iterations, 1 restart for
      each of 9 target classes), Square (margin loss, 5,000 queries, 1 restart, p_init 0.8, no schedule
      rescaling).
    - `plus`: APGD-CE and APGD-DLR (100 iterations, 5 restarts each), FAB (untargeted, 100 iterations,
      5 restarts), Square (5,000 queries), APGD-T and FAB-T (as in standard: 9 targets, 1 restart).
    - `rand` (for randomized defenses): APGD-CE and APGD-DLR, 100 iterations, 1 restart, expectation over
      transformation with 20 gradient samples per step (eot_iter 20).

    Every APGD uses rho 0.75 (the step-size halving threshold); FAB uses alpha_max 0.1, eta 1.05, beta 0.9. Every
    attack is seeded with `seed` (the reference calls torch.manual_seed(seed) in each attack).

    One deviation, only where the reference cannot run: with fewer than 10 classes there are not 9 other classes to
    target, and the reference fails indexing past the logits; the adapter then targets all n_classes - 1 other
    classes. APGD-T needs at least 4 classes and APGD-DLR 3 (the DLR loss reads the third- and fourth-largest
    logits); with fewer the attack refuses to run.
    """

    options_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "version": {"description": "The reference's versions. standard (RobustBench's): APGD-CE (100 "
                                       "iterations, 1 restart), APGD-T (100 iterations, 9 target classes, 1 "
                                       "restart each), FAB-T (100 iterations, 9 target classes, 1 restart each), "
                                       "Square (5,000 queries, p_init 0.8, 1 restart), each on the samples still "
                                       "robust. plus: APGD-CE and APGD-DLR (5 restarts each), FAB (5 restarts), "
                                       "Square (5,000 queries), APGD-T and FAB-T (9 targets), all 100 "
                                       "iterations. rand: APGD-CE and APGD-DLR with expectation over "
                                       "transformation (eot_iter 20, 100 iterations, 1 restart), for randomized "
                                       "defenses. APGD's rho is 0.75 throughout.",
                        "enum": ["standard", "plus", "rand"], "default": "standard"},
            "seed": {"description": "Seed of every component's random starts (the reference seeds each attack "
                                    "with it).",
                     "type": "integer", "minimum": 0, "maximum": 4294967295, "default": 0},
        },
    }

    def __init__(self, eps: float, version: str = "standard", seed: int = 0):
        super().__init__(eps)
        self.version, self.seed = version, seed

    def reference(self, model: nn.Module, n_classes: int, device: torch.device):
        """The reference's AutoAttack object for this version, eps and seed, as its own constructor and
        set_version configure it (only the number of targets lowered where fewer classes exist)."""
        from pyautoattack import AutoAttack as ReferenceAutoAttack

        attack = ReferenceAutoAttack(model, eps=self.eps, norm="Linf", version=self.version, seed=self.seed,
                                     device=device)
        too_few = [name for name in attack.attacks_to_run if n_classes < MIN_CLASSES.get(name, 2)]
        if too_few:
            raise BadInput(f"autoattack (version {self.version}) cannot attack a {n_classes}-class model: "
                           f"{', '.join(too_few)} need(s) at least {max(MIN_CLASSES[n] for n in too_few)} classes "
                           f"(the DLR loss compares the largest logits)",
                           fix="use foolbox-pgd, advertorch-pgd and square for models with so few classes")
        for component in (attack.apgd_targeted, attack.fab):
            component.n_target_classes = min(component.n_target_classes, n_classes - 1)
        return attack

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.eps == 0:  # APGD's step size is 2 eps: nothing to search
            return x.clone()
        attack = self.reference(model, _num_classes(model, x), x.device)
        # The reference's check for dynamic defenses installs its own sys.settrace tracer and then clears it,
        # which would silently switch off a coverage tool or debugger for the rest of the process: restore it.
        tracer = sys.gettrace()
        try:
            x_adv, _ = attack.run_standard_evaluation(x, y, batch_size=len(x))
        finally:
            sys.settrace(tracer)
        return x_adv.detach()


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
            "seed": {"type": "integer", "minimum": 0, "maximum": 4294967295, "default": 0},
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
