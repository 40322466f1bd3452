"""The one place where third-party libraries are patched or configured before import.

advertorch 0.2.3 (its last release) does `from torch.autograd.gradcheck import zero_gradients`, a function
torch removed in 1.9. `import torch.autograd.gradcheck as m` would bind the *function* torch.autograd.gradcheck
(the package re-exports it under the module's name), so the module is patched through sys.modules.

foolbox imports GitPython, which raises at import time when no git binary is on PATH unless told to be quiet.
"""

from __future__ import annotations

import os
import sys
from types import ModuleType


def _zero_gradients(x) -> None:
    # The body torch had before removing it (torch 1.8, torch/autograd/gradcheck.py).
    import torch

    if isinstance(x, torch.Tensor):
        if x.grad is not None:
            x.grad.detach_()
            x.grad.zero_()
    elif isinstance(x, (list, tuple)):
        for elem in x:
            _zero_gradients(elem)


def import_advertorch() -> ModuleType:
    """Import advertorch.attacks on any torch, patching the removed `zero_gradients` first."""
    import torch.autograd.gradcheck  # noqa: F401  (puts the module into sys.modules)

    gradcheck_module = sys.modules["torch.autograd.gradcheck"]
    if not hasattr(gradcheck_module, "zero_gradients"):
        gradcheck_module.zero_gradients = _zero_gradients
    import advertorch.attacks

    return advertorch.attacks


def import_foolbox() -> ModuleType:
    """Import foolbox where no git binary may exist."""
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    import foolbox

    return foolbox
