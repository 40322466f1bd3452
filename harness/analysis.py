"""The paper's analysis of one trained cell (sections 4.1-4.3), beside the table's metrics.

- Margins (Definition 4): M(f(x), y) = f_y(x) - max_{i != y} f_i(x), on the clean train and test splits.
- Ramp loss (Definition 5) on the margin, l_gamma(-M) = clip(1 - M / gamma, 0, 1), its train and test risk and
  their difference (the ramp loss's GE).
- The eps-ball around each analysed, correctly classified training sample is searched by two Linf PGD attacks of
  advertorch (`LinfPGDAttack`, started at the sample itself): one maximizing cross-entropy (the paper's adversarial
  samples), one minimizing the margin (advertorch's `LogitMarginLoss` = max_{i != y} f_i - f_y). Every iterate of
  both is scored:
  * u(x) = the smallest margin seen in the ball of x; u_min (eq. 6) = the smallest *positive* u over the analysed
    samples whose ball stayed correctly classified (the theorem's case 1); the first term of Theorem 4.1,
    max{0, 2 (1 - u_min / gamma)} (eq. 7);
  * the loss variation of x (section 4.3, Fig. 3) = the largest |CE(x') - CE(x)| over the iterates x' that are still
    classified correctly.
  Attacks find points, they do not certify: u is an upper estimate of the true minimum margin in the ball and the
  loss variation a lower estimate of the true maximum.
- Spectral norms of every convolution and linear layer (harness.spectral.layer_norms).

The attack's iterates are read by wrapping the model in a recorder that advertorch calls as its `predict`, so
advertorch's own PGD step and projection do the search; only the final iterate needs one extra forward pass.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from harness.compat import import_advertorch
from harness.data import batches
from harness.plugin import DataSplits, Split, adversary_mode, to_unit
from harness.spectral import layer_norms

QUANTILES = {"q05": 0.05, "q25": 0.25, "median": 0.5, "q75": 0.75, "q95": 0.95}


def margins(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """M(f(x), y) = f_y(x) - max_{i != y} f_i(x), per sample (positive iff classified correctly, ties aside)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf"))
    return true - others.max(1).values


def ramp_loss(margin: torch.Tensor, gamma: float) -> torch.Tensor:
    """l_gamma(-M) of Definition 5: 0 for M > gamma, 1 - M/gamma for M in [0, gamma], 1 for M < 0."""
    return (1.0 - margin / gamma).clamp(0.0, 1.0)


def bound_first_term(u_min: float | None, gamma: float) -> float | None:
    """The first term of Theorem 4.1, eq. (7): max{0, 2 (1 - u_min / gamma)}."""
    return None if u_min is None else max(0.0, 2.0 * (1.0 - u_min / gamma))


def summarize(values: torch.Tensor) -> dict:
    """n, mean, min, quantiles, max of a 1-d tensor (None when it is empty)."""
    values = values.detach().double().flatten().cpu()
    out: dict = {"n": int(values.numel())}
    keys = ["mean", "min", *QUANTILES, "max"]
    if values.numel() == 0:
        return out | {k: None for k in keys}
    out |= {"mean": float(values.mean()), "min": float(values.min()), "max": float(values.max())}
    qs = torch.quantile(values, torch.tensor(list(QUANTILES.values()), dtype=torch.float64))
    out |= {name: float(q) for name, q in zip(QUANTILES, qs)}
    return {k: out[k] for k in ["n", *keys]}


class _Recorder(nn.Module):
    """Calls the model and keeps (detached) the logits of every call: advertorch's PGD calls its `predict` once per
    iterate, so this sees every point the attack visits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.outputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        self.outputs.append(out.detach())
        return out


def search_ball(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int,
                step_size: float) -> tuple[torch.Tensor, torch.Tensor]:
    """For each (correctly classified) sample: the smallest margin and the largest |CE(x') - CE(x)| over still
    correctly classified x', over every iterate of two advertorch Linf PGD attacks (CE ascent, margin descent)
    within the eps-ball (eps in [0, 1] units) and the image domain [0, 1]. Returns (u, loss_variation)."""
    with torch.no_grad(), adversary_mode(model):
        clean = model(x)
    u = margins(clean, y)
    ce0 = F.cross_entropy(clean, y, reduction="none")
    variation = torch.zeros_like(ce0)  # x itself is a correctly classified point of its ball
    if eps <= 0 or steps == 0:
        return u, variation
    attacks = import_advertorch()
    import advertorch.loss  # after import_advertorch(): it patches torch for advertorch first

    objectives = [nn.CrossEntropyLoss(reduction="sum"), advertorch.loss.LogitMarginLoss(reduction="sum")]
    for loss_fn in objectives:
        recorder = _Recorder(model)
        pgd = attacks.LinfPGDAttack(recorder, loss_fn=loss_fn, eps=eps, nb_iter=steps, eps_iter=step_size,
                                    rand_init=False, clip_min=0.0, clip_max=1.0)
        with adversary_mode(model):
            x_adv = pgd.perturb(x, y)
            with torch.no_grad():
                recorder(x_adv)
        for logits in recorder.outputs:
            m = margins(logits, y)
            u = torch.minimum(u, m)
            ce = F.cross_entropy(logits, y, reduction="none")
            variation = torch.where(m > 0, torch.maximum(variation, (ce - ce0).abs()), variation)
    return u, variation


def _clean_margins(model: nn.Module, split: Split, data: DataSplits, batch_size: int,
                   device: torch.device, on_batch: Callable[[], None] | None = None) -> torch.Tensor:
    out = []
    with torch.no_grad(), adversary_mode(model):
        for x, y in batches(split, batch_size, device, transform=data.eval_transform):
            out.append(margins(model(x), y).cpu())
            if on_batch is not None:
                on_batch()
    return torch.cat(out) if out else torch.zeros(0)


def resolve_options(analysis: dict, spec: dict) -> dict:
    """The analysis settings with the data-dependent defaults filled: the ball radius defaults to the first
    evaluation attack's eps (one fixed radius for every cell, as Fig. 3 needs), the step size to 2.5 eps / steps."""
    options = dict(analysis)
    if options.get("eps") is None:
        options["eps"] = float(spec["evaluation"]["attacks"][0]["eps"])
    if options.get("step_size") is None:
        options["step_size"] = 2.5 * options["eps"] / max(options["steps"], 1)
    return options


def analyze(model: nn.Module, data: DataSplits, options: dict, batch_size: int, device: torch.device,
            seed: int = 0, on_batch: Callable[[], None] | None = None) -> dict:
    """The per-cell `analysis` object of the report (see the module docstring); `options` as resolve_options gives
    them (eps and step_size on the 0-255 scale). `on_batch` is called after every batch (the runner's stop check)."""
    started = time.perf_counter()
    gamma = float(options["gamma"])
    eps, step_size = to_unit(options["eps"]), to_unit(options["step_size"])

    train_m = _clean_margins(model, data.train, data, batch_size, device, on_batch)
    test_m = _clean_margins(model, data.test, data, batch_size, device, on_batch)
    ramp_train, ramp_test = float(ramp_loss(train_m, gamma).mean()), float(ramp_loss(test_m, gamma).mean())

    subset = data.train.subset(options["max_train"], seed)
    us, variations, analysed = [], [], 0
    for x, y in batches(subset, batch_size, device, transform=data.eval_transform):
        analysed += len(y)
        with torch.no_grad(), adversary_mode(model):
            correct = margins(model(x), y) > 0
        if correct.any():
            u, variation = search_ball(model, x[correct], y[correct], eps, options["steps"], step_size)
            us.append(u.cpu())
            variations.append(variation.cpu())
        if on_batch is not None:
            on_batch()
    u = torch.cat(us) if us else torch.zeros(0)
    variation = torch.cat(variations) if variations else torch.zeros(0)
    robust = u > 0
    u_min = float(u[robust].min()) if robust.any() else None

    spectral = layer_norms(model, data.input_shape, device, iterations=options["power_iterations"])
    if on_batch is not None:
        on_batch()  # the spectral norms count as one more unit of work (batch_count), and a stop is polled after them
    return {
        "eps": options["eps"],
        "steps": options["steps"],
        "step_size": options["step_size"],
        "gamma": gamma,
        "train_samples": analysed,
        "correct": int(len(u)),
        "robust": int(robust.sum()),
        "loss_variation": summarize(variation),
        "margin_in_ball": summarize(u),
        "u_min": u_min,
        "u_min_all": float(u.min()) if len(u) else None,
        "bound_first_term": bound_first_term(u_min, gamma),
        "margins": {"train": summarize(train_m), "test": summarize(test_m)},
        "ramp": {"train": ramp_train, "test": ramp_test, "ge": ramp_test - ramp_train},
        "spectral": spectral,
        "seconds": time.perf_counter() - started,
    }


def batch_count(data: DataSplits, spec: dict) -> int:
    """How many times analyze calls `on_batch`: after each batch of the clean margins (train and test) and of the
    ball searches, and once after the spectral norms (the size of the analysis's progress bar)."""
    limit = (spec.get("analysis") or {}).get("max_train")
    size = spec["evaluation"]["batch_size"]
    searched = len(data.train) if limit is None else min(limit, len(data.train))  # the size of analyze's subset
    return sum(-(-n // size) for n in (len(data.train), len(data.test), searched)) + 1


def analyze_cell(model: nn.Module, data: DataSplits, spec: dict, device: torch.device,
                 on_batch: Callable[[], None] | None = None) -> dict | None:
    """The runner's hook: the cell's `analysis` object, or None when the spec disables it (or predates it)."""
    settings = spec.get("analysis") or {}
    if not settings.get("enabled", False):
        return None
    return analyze(model, data, resolve_options(settings, spec), spec["evaluation"]["batch_size"], device,
                   seed=spec["seed"], on_batch=on_batch)


ANALYSIS_ROWS = [  # (row, getter, format)
    ("max |ΔCE|", lambda a: a["loss_variation"]["max"], "{:.4f}"),
    ("mean |ΔCE|", lambda a: a["loss_variation"]["mean"], "{:.4f}"),
    ("robust %", lambda a: 100.0 * a["robust"] / a["correct"] if a["correct"] else None, "{:.2f}"),
    ("u_min", lambda a: a["u_min"], "{:.4f}"),
    ("median u", lambda a: a["margin_in_ball"]["median"], "{:.4f}"),
    ("Thm 4.1 (7)", lambda a: a["bound_first_term"], "{:.4f}"),
    ("ramp GE", lambda a: a["ramp"]["ge"], "{:.4f}"),
    ("max ‖layer‖", lambda a: max((la["operator_norm"] for la in a["spectral"]["layers"]), default=None), "{:.3g}"),
    # the bound where one was computed (harness.spectral.lipschitz_bound), never the bare product of layer norms,
    # which bounds nothing for a network with skips or batch norm; reports from before it show "—"
    ("L2 Lip. bound", lambda a: (a["spectral"].get("lipschitz") or {}).get("bound"), "{:.3g}"),
]


def render_analysis_table(report: dict, console) -> None:
    """Print the cells' analysis in the table's layout (a block per model, a column per strength); nothing when no
    cell has one."""
    from rich.table import Table

    cells = [c for c in report["cells"] if c.get("status") == "done" and c.get("analysis")]
    if not cells:
        return
    strengths = sorted({c["strength"] for c in cells})
    radii = sorted({c["analysis"]["eps"] for c in cells})
    gammas = sorted({c["analysis"]["gamma"] for c in cells})
    table = Table(title=f"analysis: L∞ ball {', '.join(f'{r:g}' for r in radii)}/255, "
                        f"ramp γ {', '.join(f'{g:g}' for g in gammas)}", title_justify="left")
    table.add_column("model")
    table.add_column("")
    for s in strengths:
        table.add_column(f"{s:g}", justify="right")
    by_model: dict[str, dict[float, dict]] = {}
    for cell in cells:
        by_model.setdefault(cell["model"], {})[cell["strength"]] = cell["analysis"]
    for model, analyses in by_model.items():
        for i, (row, get, fmt) in enumerate(ANALYSIS_ROWS):
            values = []
            for s in strengths:
                value = get(analyses[s]) if s in analyses else None
                values.append("—" if value is None else fmt.format(value))
            table.add_row(model if i == 0 else "", row, *values, end_section=(i == len(ANALYSIS_ROWS) - 1))
    console.print(table)
    console.print("|ΔCE|: loss variation in the ball over correctly classified training samples (nats); robust %: of "
                  "those, no misclassified point found; u: smallest margin found in a ball (logits); Thm 4.1 (7) = "
                  "max{0, 2(1 − u_min/γ)}; max ‖layer‖: the largest conv/linear norm on its actual input (> 1: "
                  "that layer amplifies); L2 Lip. bound: an upper bound on the network's L2 Lipschitz constant, the "
                  "product of the layer norms for a plain chain, composed over the graph otherwise (a residual block "
                  "x + F(x) counts 1 + ‖F‖, batch norm its largest scale)", highlight=False)
    reasons = sorted({f"{c['model']}: {c['analysis']['spectral']['lipschitz']['detail']}" for c in cells
                      if (c["analysis"]["spectral"].get("lipschitz") or {}).get("bound") is None
                      and c["analysis"]["spectral"].get("lipschitz")})
    for reason in reasons:
        console.print(f"L2 Lip. bound of {reason}", highlight=False, markup=False)
