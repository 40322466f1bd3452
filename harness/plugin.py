"""The public plugin protocols: what a model, dataset, defense or attack plugin provides.

A plugin is a class registered under an entry point in one of the groups of harness.registry. The harness
validates the spec's `options` for it against its `options_schema` (a JSON Schema object) and then calls
`Plugin(**options)` (defenses and attacks also get `eps`). Subclassing the bases below is convenient, not
required: anything with the same attributes works.

Units: perturbation sizes in specs and reports are on the paper's 0-255 scale (8 means 8/255). The harness
hands plugins `eps` already divided by SCALE; options a plugin declares on the 0-255 scale (step sizes) it
converts with `to_unit`.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize

from harness.spectral import apply_spectral_norm

SCALE = 255.0


def to_unit(value_0_255: float) -> float:
    """A perturbation size on the paper's 0-255 scale, as a distance between images in [0, 1]."""
    return float(value_0_255) / SCALE


# The options of a Linf PGD, as every built-in PGD attack and defense declares them (step size on the 0-255 scale).
PGD_OPTIONS = {
    "steps": {"description": "PGD iterations.", "type": "integer", "minimum": 1, "default": 10},
    "step_size": {"description": "Step size on the 0-255 scale.", "type": "number", "exclusiveMinimum": 0,
                  "default": 2.0},
    "random_start": {"description": "Start from a uniform random point in the eps-ball.", "type": "boolean",
                     "default": True},
}


# The defenses' option for batch norm while their training adversaries are crafted (adversary_mode's `batch_norm`).
ATTACK_BN_OPTION = {
    "attack_bn": {
        "description": "Batch norm while the training adversary is crafted. eval (default, as MadryLab robustness "
                       "and TRADES): running statistics, i.e. the attack maximizes the loss of the network as it is "
                       "evaluated. train (as Madry et al.'s original TensorFlow code): the batch's own statistics, "
                       "as the training step then uses them; running statistics are never updated while crafting "
                       "and the spectral-norm power iteration never advances. No effect on a model without batch "
                       "norm (LeNet, VGG).",
        "enum": ["eval", "train"], "default": "eval"},
}


class PGDSettings:
    """Mixin for a Linf PGD attack or defense: the PGD_OPTIONS schema, and steps / step_size (in [0, 1] units) /
    random_start set from them. Put it before the plugin base: `class MyPGD(PGDSettings, AttackPlugin)`."""

    options_schema: ClassVar[dict] = {"type": "object", "additionalProperties": False, "properties": PGD_OPTIONS}

    def __init__(self, eps: float, steps: int = 10, step_size: float = 2.0, random_start: bool = True):
        super().__init__(eps)  # type: ignore[call-arg]  # the plugin base's
        self.steps, self.step_size, self.random_start = steps, to_unit(step_size), random_start


def empty_schema() -> dict:
    return {"type": "object", "properties": {}, "additionalProperties": False}


class Plugin:
    """Common base: a JSON-Schema for the options, a one-line summary (the class docstring's first line).

    Optional: `check_options(options) -> list[str]`, a static or class method for what a JSON Schema cannot say
    (a bound on several options together, e.g. the memory they allocate). `harness validate` calls it with the
    options already valid under `options_schema` and their defaults filled; each string it returns is one problem
    (what is wrong and how to fix it), reported at the options' JSON path, so that what validate accepts, run can
    run."""

    options_schema: ClassVar[dict] = empty_schema()


# ----------------------------------------------------------------------------------------------- datasets


@dataclass
class Split:
    """Images (N, C, H, W), uint8 in [0, 255] or float in [0, 1], and int64 labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, n: int | None, seed: int, first: bool = False) -> "Split":
        """A fixed, seeded random subset of n samples (all of them when n is None or >= len); `first`: the first n."""
        if n is None or n >= len(self):
            return self
        if first:
            return Split(self.images[:n], self.labels[:n])
        idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n]
        return Split(self.images[idx], self.labels[idx])


Transform = Callable[[torch.Tensor, torch.Generator | None], torch.Tensor]


@dataclass
class DataSplits:
    """What a dataset plugin returns.

    `augment` (training only) and `eval_transform` (train-loss, test-loss and attacks) take a float batch in
    [0, 1] on the compute device and return a float batch of `input_shape`; both are batched so that they can run
    on the GPU beside a device-resident dataset. None means identity.

    `train` may be None for a test-only dataset (a held-out corruption set, a RobustBench-style test set):
    `harness eval` / `harness.evaluate` then evaluate the test split as usual and report the train-set
    quantities (train loss, GE) as null with the reason (metrics.unavailable); `harness run` and `harness bench`
    refuse such a dataset (exit 2), since training needs a training split.
    """

    train: Split | None
    test: Split
    num_classes: int
    input_shape: tuple[int, int, int]
    augment: Transform | None = None
    eval_transform: Transform | None = None
    source: str = ""  # where the data came from, for the report
    stand_in: bool = False  # True for synthetic data standing in for a real dataset (smoke runs)
    notes: list[str] = field(default_factory=list)


# The dataset root a plugin's `load` receives when neither --data-root nor the spec's dataset.root names one.
DEFAULT_DATA_ROOT = "data"


class DatasetPlugin(Plugin):
    """`load(root, download)`: `root` is --data-root, else the spec's `dataset.root`, else DEFAULT_DATA_ROOT
    ("data", relative to the working directory); never None. Raise harness.errors.DatasetNotFound when the data is
    not there (smoke runs then use `stand_in(train_size, test_size, seed)` if the plugin has one), BadInput for
    other wrong input."""

    def load(self, root: str, download: bool) -> DataSplits:  # pragma: no cover - protocol
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------- models


SPECTRAL_NORM_OPTION = {"description": "Spectrally normalize every convolution and linear layer.",
                        "type": "boolean", "default": True}


class ModelPlugin(Plugin):
    """Builds an nn.Module whose input is an image batch in [0, 1]; normalization, if any, is a layer inside.

    Spectral normalization is one option applied uniformly to every model: subclasses keep `spectral_norm` in
    their schema (extend `options_schema["properties"]`) and finish `build` with `self.normalize(model)`.
    """

    options_schema: ClassVar[dict] = {"type": "object", "additionalProperties": False,
                                      "properties": {"spectral_norm": SPECTRAL_NORM_OPTION}}

    def __init__(self, spectral_norm: bool = True):
        self.spectral_norm = spectral_norm

    def normalize(self, model: nn.Module) -> nn.Module:
        """The built model, spectrally normalized when the `spectral_norm` option asks for it."""
        return apply_spectral_norm(model) if self.spectral_norm else model

    def build(self, num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:  # pragma: no cover
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------- defenses


class DefensePlugin(Plugin):
    """Turns a training batch into the training loss, at a defensive strength `eps` (in [0, 1] units).

    The model is in train mode when `loss` is called; the harness calls backward on the result. To compute an
    adversary inside `loss`, wrap the attack in `adversary_mode(model)` (or `adversary_mode(model, "train")` to
    craft against batch-norm batch statistics: the built-in defenses' `attack_bn` option, ATTACK_BN_OPTION).
    """

    def __init__(self, eps: float, **options):
        self.eps = float(eps)
        self.options = options

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------- attacks


class AttackPlugin(Plugin):
    """Returns adversarial images for a batch within the Linf ball of radius `eps` (in [0, 1] units).

    The harness calls `perturb` inside `adversary_mode(model)` and checks every result itself: inside the
    eps-ball, inside [0, 1], finite. An attack that breaks this contract fails the evaluation by name.

    Optional, for minimal-norm attacks: `minimal_perturb(model, x, y) -> x_adv`, the closest adversarial example
    found at any distance (x itself where none was found). The harness then measures each Linf distance, keeps
    only examples the model misclassifies, and reports accuracy at every eps of a curve from one run.
    Optional class attribute `gradient_free = True` marks an attack that uses no gradients (the gradient-masking
    check of harness.checks compares it against the gradient-based ones).
    """

    def __init__(self, eps: float, **options):
        self.eps = float(eps)
        self.options = options

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------- adversary policy

ADVERSARY_POLICY = (
    "while an adversary is computed: parameters frozen (requires_grad=False, so .grad stays clean), "
    "model in eval mode (no spectral-norm power iteration, batch-norm running statistics), and "
    "parametrized weights computed once per batch (torch.nn.utils.parametrize.cached); a defense's "
    "training adversaries with attack_bn \"train\" (its resolved options say which) use each batch's own "
    "batch-norm statistics instead, without updating the running statistics"
)

BATCH_NORM_MODES = ("eval", "train")


@contextmanager
def adversary_mode(model: nn.Module, batch_norm: str = "eval") -> Iterator[nn.Module]:
    """Freeze the model while an adversary is computed, then restore it exactly (every module's mode included).

    Libraries' attacks call `loss.backward()`, which would also fill the parameters' .grad; frozen parameters
    keep it clean and skip the weight-gradient work. Eval mode stops the spectral-norm power iteration (it
    advances only in training mode: one iteration per training step, as in Miyato et al.) and keeps batch-norm
    statistics from being updated by intermediate adversaries (advertorch's own `ctx_noparamgrad_and_eval`
    does the same). `parametrize.cached()` computes each normalized weight once for all attack steps.

    `batch_norm="train"` (a defense's `attack_bn` option) puts only the batch-norm layers in training mode, so
    that they normalize with the batch's own statistics, as the training step's forward pass will; with
    `track_running_stats` off meanwhile, torch's (and timm's) batch norm neither updates its running statistics
    nor counts the batch (num_batches_tracked). Everything else, the spectral-norm parametrizations included,
    stays in eval mode: the power iteration does not advance, and dropout stays off.
    """
    if batch_norm not in BATCH_NORM_MODES:
        raise ValueError(f"batch_norm must be one of {BATCH_NORM_MODES}, not {batch_norm!r}")
    modes = [(m, m.training) for m in model.modules()]
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    model.eval()
    batch_stats = [m for m in model.modules() if isinstance(m, _BatchNorm)] if batch_norm == "train" else []
    tracked = [(m, m.track_running_stats) for m in batch_stats]
    for m in batch_stats:
        m.train()
        m.track_running_stats = False  # batch statistics, running ones untouched (see _BatchNorm.forward)
    try:
        with parametrize.cached():
            yield model
    finally:
        for p in frozen:
            p.requires_grad_(True)
        for m, value in tracked:
            m.track_running_stats = value
        for m, training in modes:
            m.training = training
