"""Sanity checks of an evaluation, reported as named flags (in the spirit of AutoAttack's flags).

They run on a small fixed subset of the test split (`evaluation.checks.max_samples`, 64 by default) so that they
stay cheap, after the main evaluation of a cell. The convergence check is a statistical test and needs more
samples to see a gap of a few points: it runs the doubled attack on `convergence_samples` (1000 by default) and
compares it, sample by sample, with the main evaluation's outcomes of the attack as run. Each flag is {"ok": true | false | null, "detail": ...}: false
means the evaluation should not be believed as it stands; null means the check did not apply. README.md
("Sanity checks") explains each flag and what to do when it is raised. An adversarial example outside its
eps-ball or [0, 1], or non-finite, is not a flag but a hard error (harness.evaluate.check_adversary).
"""

from __future__ import annotations

import copy
import math
from typing import Callable

import torch
from torch import nn

from harness import registry
from harness.data import batches
from harness.evaluate import clean_pass, per_sample_robust
from harness.plugin import AttackPlugin, DataSplits, Split, to_unit

FLAGS = {
    "adversary_in_bounds": "every adversarial example of every attack was inside its eps-ball, inside [0, 1] and "
                           "finite (a violation stops the evaluation with an error naming the attack)",
    "eval_deterministic": "after model.eval() no module is still in training mode, and the model gives the same "
                          "logits for the same inputs, in two passes and in a smaller batch",
    "eps_zero_is_clean": "every attack at eps = 0 leaves exactly the clean accuracy, sample by sample",
    "monotone_in_eps": "accuracy under every attack does not rise (by more than the tolerance) as eps grows over "
                       "the checked grid",
    "attack_converged": "doubling the attack's steps / restarts / queries does not break significantly more "
                        "samples (a one-sided exact McNemar test on the paired per-sample outcomes, level "
                        "convergence_alpha, on convergence_samples test samples)",
    "no_gradient_masking": "a gradient-free attack does not break (more than the tolerance of) samples that every "
                           "gradient-based attack at the same eps left correct",
}

# Options that make an attack stronger when doubled (the convergence check).
STRENGTH_OPTIONS = ("steps", "restarts", "n_queries")


def binomial_tail(k: int, m: int) -> float:
    """P(X >= k) for X ~ Binomial(m, 1/2), exact. Written with math.comb rather than scipy.stats.binomtest: scipy
    is no dependency of harness (only of foolbox and scikit-learn), and at p = 1/2 the tail is a plain sum of
    binomial coefficients over 2^m, exact in Python's integers for any m (int / int rounds correctly)."""
    if m <= 0 or k <= 0:
        return 1.0
    if k > m:
        return 0.0
    return sum(math.comb(m, i) for i in range(k, m + 1)) / 2 ** m


def min_discordant(alpha: float) -> int:
    """The fewest samples the stronger attack must break alone (none broken by the weaker alone) for the one-sided
    exact McNemar test to reject at level alpha: the smallest k with 2^-k <= alpha."""
    return max(1, math.ceil(math.log2(1.0 / alpha) - 1e-12))


def convergence_test(base: torch.Tensor, stronger: torch.Tensor, alpha: float) -> dict:
    """One-sided exact McNemar test of "the stronger attack breaks more samples" on paired per-sample robustness
    (True = still correct). Of the discordant samples, `broken_only_by_doubled` are robust to the attack as run and
    broken by the doubled one, `broken_only_by_base` the reverse (random starts make both happen by chance). Under
    the null hypothesis (doubling changes nothing) each discordant sample falls either way with probability 1/2,
    so the p-value is P(Binomial(b + c, 1/2) >= b). `min_detectable_gap` (percentage points): the smallest
    accuracy drop at this n that can be flagged at all (every discordant sample in the doubled attack's favour);
    smaller drops pass unseen."""
    n = len(base)
    b = int((base & ~stronger).sum())
    c = int((~base & stronger).sum())
    p = binomial_tail(b, b + c)
    return {"samples": n, "acc": _pct(base, n), "doubled_acc": _pct(stronger, n), "gap": 100.0 * (b - c) / max(n, 1),
            "broken_only_by_doubled": b, "broken_only_by_base": c, "p_value": p, "alpha": alpha,
            "significant": p < alpha, "min_detectable_gap": 100.0 * min_discordant(alpha) / max(n, 1)}


def convergence_indices(test_size: int, cfg: dict) -> torch.Tensor:
    """The test samples of the convergence check: a seeded subset of `convergence_samples` (all when it is null or
    at least the test size), drawn as Split.subset draws."""
    n = cfg["convergence_samples"]
    if n is None or n >= test_size:
        return torch.arange(test_size)
    return torch.randperm(test_size, generator=torch.Generator().manual_seed(cfg["seed"]))[:n]


def resolve(cfg: dict | None) -> dict:
    """The checks section with every default filled in (also for callers that skip spec validation)."""
    from harness.spec import SPEC_SCHEMA, fill_defaults

    schema = SPEC_SCHEMA["properties"]["evaluation"]["properties"]["checks"]
    out = fill_defaults(copy.deepcopy(cfg or {}), schema)
    free = out.get("gradient_free")
    if free:
        free.setdefault("options", {})
        fill_defaults(free["options"], registry.load("attack", free["name"]).options_schema)
    return out


def _pct(mask: torch.Tensor, n: int) -> float:
    return 100.0 * float(mask.sum()) / max(n, 1)


def _rebuild(attack: AttackPlugin, entry: dict, eps_0_255: float, options: dict | None = None) -> AttackPlugin:
    return type(attack)(eps=to_unit(eps_0_255), **(entry.get("options", {}) if options is None else options))


def check_deterministic(model: nn.Module, split: Split, data: DataSplits, device: torch.device) -> dict:
    model.eval()
    training = [name or "<model>" for name, m in model.named_modules() if m.training]
    x, _ = next(batches(split, len(split), device, transform=data.eval_transform))
    k = max(1, len(x) // 2)
    with torch.no_grad():
        first, second, part = model(x), model(x), model(x[:k])
    repeat = torch.equal(first, second)
    batch_independent = torch.allclose(part, first[:k], rtol=1e-4, atol=1e-5)
    problems = []
    if training:
        problems.append(f"modules still in training mode after model.eval(): {', '.join(training[:5])}")
    if not repeat:
        problems.append("two passes over the same inputs gave different logits (randomness in the forward pass)")
    if not batch_independent:
        problems.append("the logits of a sample depend on the other samples of its batch")
    return {"ok": not problems, "detail": "; ".join(problems) or "eval mode, repeatable, batch-independent",
            "training_modules": training}


def batch_count(attacks: list[tuple[dict, AttackPlugin]], cfg: dict | None, test_size: int, batch_size: int) -> int:
    """How many times run_checks calls `on_batch` (after each batch of its clean pass and of every attack run): the
    size of the checks' progress bar. It follows run_checks's runs one by one; a change there must change it too
    (tests/test_output.py sees a bar end short of or beyond its total)."""
    cfg = resolve(cfg)
    n = test_size if cfg["max_samples"] is None else min(cfg["max_samples"], test_size)
    per_run = -(-n // batch_size)
    runs, extra = 1, 0  # the clean pass; batches of the convergence runs, on their own subset
    wanted = cfg["attacks"]
    checked = [(e, a) for e, a in attacks if wanted is None or e["label"] in wanted]
    for entry, _ in checked:
        eps = float(entry["eps"])
        runs += len({0.0, eps, *(float(e) for e in (cfg["eps_grid"] or [eps / 2, min(2 * eps, 255.0)]))})
        if cfg["convergence"] and any(k in entry.get("options", {}) for k in STRENGTH_OPTIONS):
            extra += -(-len(convergence_indices(test_size, cfg)) // batch_size)  # the doubled attack (convergence)
    gradient_based = [e for e, a in checked if not getattr(a, "gradient_free", False)]
    if cfg["gradient_free"] and gradient_based:
        runs += len({float(e["eps"]) for e in gradient_based} - {0.0})
    return runs * per_run + extra


def run_checks(model: nn.Module, data: DataSplits, attacks: list[tuple[dict, AttackPlugin]], cfg: dict | None,
               batch_size: int, device: torch.device, seed: int = 0,
               on_batch: Callable[[], None] | None = None,
               outcomes: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = None) -> dict:
    """The flags of FLAGS on the checks subset. Every re-run of an attack goes through per_sample_robust, so it runs
    on generators of its own seeded from `seed` and its label (harness.evaluate.isolated_rng), as in the main
    evaluation: no re-run depends on the attacks or checks before it, and none shifts the generators of the run.
    `on_batch` is called after every batch of every attack run (the runner's stop check: a signal is honoured
    within one attack call on one batch).
    `outcomes`: the main evaluation's per-sample clean correctness and robustness by attack label over the whole
    test split; the convergence check then takes the attack's own outcomes from it and runs only the doubled
    attack on its samples (else it runs both)."""
    cfg = resolve(cfg)
    tol = float(cfg["tolerance"])
    sub = data.test.subset(cfg["max_samples"], cfg["seed"])
    n = len(sub)
    flags: dict[str, dict] = {"adversary_in_bounds": {"ok": True, "detail": FLAGS["adversary_in_bounds"]}}
    flags["eval_deterministic"] = check_deterministic(model, sub, data, device)
    _, correct = clean_pass(model, sub, data, batch_size, device, on_batch)
    clean = _pct(correct, n)
    wanted = cfg["attacks"]
    checked = [(e, a) for e, a in attacks if wanted is None or e["label"] in wanted]

    robust_at: dict[tuple[str, float], torch.Tensor] = {}
    grids, eps_zero_bad, rises, not_converged, convergence = {}, [], [], [], {}
    for entry, attack in checked:
        label, eps = entry["label"], float(entry["eps"])
        grid = sorted({0.0, eps, *(float(e) for e in (cfg["eps_grid"] or [eps / 2, min(2 * eps, 255.0)]))})
        accs = []
        for e in grid:
            plugin = attack if e == eps else _rebuild(attack, entry, e)
            robust, _ = per_sample_robust(model, dict(entry, eps=e), plugin, sub, correct, data, batch_size, device,
                                          on_batch, seed=seed)
            robust_at[(label, e)] = robust
            accs.append(_pct(robust, n))
        grids[label] = {"eps": grid, "acc": accs}
        if not torch.equal(robust_at[(label, 0.0)], correct):
            eps_zero_bad.append(f"{label}: {accs[0]:.2f}% at eps 0 vs {clean:.2f}% clean")
        for i in range(len(grid) - 1):
            if accs[i + 1] > accs[i] + tol:
                rises.append(f"{label}: {accs[i]:.2f}% at eps {grid[i]:g} -> {accs[i + 1]:.2f}% at eps {grid[i + 1]:g}")
        options = entry.get("options", {})
        if cfg["convergence"] and any(k in options for k in STRENGTH_OPTIONS):
            stronger = {k: (2 * v if k in STRENGTH_OPTIONS else v) for k, v in options.items()}
            idx = convergence_indices(len(data.test), cfg)
            conv = Split(data.test.images[idx], data.test.labels[idx])
            if outcomes is not None and label in outcomes[1]:
                conv_correct, base = outcomes[0][idx], outcomes[1][label][idx]
            else:
                _, conv_correct = clean_pass(model, conv, data, batch_size, device, on_batch)
                base, _ = per_sample_robust(model, entry, attack, conv, conv_correct, data, batch_size, device,
                                            on_batch, seed=seed)
            robust, _ = per_sample_robust(model, entry, _rebuild(attack, entry, eps, stronger), conv, conv_correct,
                                          data, batch_size, device, on_batch, seed=seed)
            test = convergence_test(base, robust, float(cfg["convergence_alpha"]))
            convergence[label] = {**test, "doubled": {k: stronger[k] for k in STRENGTH_OPTIONS if k in stronger}}
            if test["significant"]:
                not_converged.append(
                    f"{label}: {test['acc']:.2f}% -> {test['doubled_acc']:.2f}% with {convergence[label]['doubled']} "
                    f"on {test['samples']} samples ({test['broken_only_by_doubled']} broken only by the doubled "
                    f"attack, {test['broken_only_by_base']} only by the attack as run; one-sided exact McNemar "
                    f"p = {test['p_value']:.2g} < {test['alpha']:g})")

    flags["eps_zero_is_clean"] = {
        "ok": (not eps_zero_bad) if checked else None,
        "detail": "; ".join(eps_zero_bad) or ("every checked attack at eps 0 kept the clean accuracy, sample by sample"
                                              if checked else "no attack checked")}
    flags["monotone_in_eps"] = {"ok": (not rises) if checked else None, "grids": grids,
                                "detail": "; ".join(rises) or ("accuracy non-increasing in eps" if checked
                                                               else "no attack checked")}
    flags["attack_converged"] = {"ok": (not not_converged) if convergence else None, "runs": convergence,
                                 "detail": "; ".join(not_converged) or (
                                     _converged_detail(convergence) if convergence
                                     else "no checked attack has steps, restarts or n_queries to double")}
    flags["no_gradient_masking"] = gradient_masking(model, data, sub, correct, checked, robust_at, cfg, batch_size,
                                                    device, seed, on_batch)
    return {"samples": n, "clean_acc": clean, "tolerance": tol,
            "passed": all(f["ok"] is not False for f in flags.values()), "flags": flags}


def _converged_detail(convergence: dict) -> str:
    """What a passed convergence check can and cannot say: the smallest drop it could have detected."""
    return "; ".join(f"{label}: {r['acc']:.2f}% -> {r['doubled_acc']:.2f}% doubled on {r['samples']} samples, "
                     f"p = {r['p_value']:.2g} (not below {r['alpha']:g}); drops under {r['min_detectable_gap']:.2f} "
                     "points cannot be detected at this sample size" for label, r in convergence.items())


def gradient_masking(model: nn.Module, data: DataSplits, sub: Split, correct: torch.Tensor,
                     checked: list[tuple[dict, AttackPlugin]], robust_at: dict, cfg: dict, batch_size: int,
                     device: torch.device, seed: int = 0, on_batch: Callable[[], None] | None = None) -> dict:
    free_cfg = cfg["gradient_free"]
    gradient_based = [(e, a) for e, a in checked if not getattr(a, "gradient_free", False)]
    if not free_cfg or not gradient_based:
        return {"ok": None, "detail": "no gradient-free attack configured" if not free_cfg
                else "no gradient-based attack checked"}
    n = len(sub)
    free_cls = registry.load("attack", free_cfg["name"])
    per_eps, masked_at = {}, []
    for eps in sorted({float(e["eps"]) for e, _ in gradient_based}):
        if eps == 0:
            continue
        robust_grad = correct.clone()
        for entry, _ in gradient_based:
            if float(entry["eps"]) == eps:
                robust_grad &= robust_at[(entry["label"], eps)]
        free = free_cls(eps=to_unit(eps), **free_cfg["options"])
        robust_free, _ = per_sample_robust(model, {"name": free_cfg["name"], "label": free_cfg["name"], "eps": eps},
                                           free, sub, correct, data, batch_size, device, on_batch, seed=seed)
        masked = _pct(robust_grad & ~robust_free, n)
        per_eps[f"{eps:g}"] = {"gradient_acc": _pct(robust_grad, n), "gradient_free_acc": _pct(robust_free, n),
                               "broken_only_without_gradients": masked}
        if masked > float(cfg["tolerance"]):
            masked_at.append(f"eps {eps:g}: {free_cfg['name']} broke {masked:.2f}% of the samples every "
                             f"gradient-based attack left correct ({_pct(robust_grad, n):.2f}% -> "
                             f"{_pct(robust_grad & robust_free, n):.2f}%)")
    return {"ok": not masked_at if per_eps else None, "by_eps": per_eps, "attack": free_cfg["name"],
            "detail": "; ".join(masked_at) or ("the gradient-free attack found nothing the gradient-based ones missed"
                                               if per_eps else "only eps 0 checked")}
