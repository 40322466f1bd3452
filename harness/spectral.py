"""Spectral normalization of a network (Miyato et al., 2018), applied uniformly by model plugins.

torch's `parametrizations.spectral_norm` divides each weight by an estimate of the largest singular value of
the weight reshaped to a matrix (out_channels x in_channels*k*k for a convolution), refined by one power
iteration per training forward pass.
"""

from __future__ import annotations

from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm

NORMALIZED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def apply_spectral_norm(model: nn.Module, n_power_iterations: int = 1) -> nn.Module:
    """Spectrally normalize the weight of every convolution and linear layer of `model`, in place."""
    for module in list(model.modules()):
        if isinstance(module, NORMALIZED_LAYERS) and not parametrize.is_parametrized(module, "weight"):
            spectral_norm(module, n_power_iterations=n_power_iterations)
    return model


def normalized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs whose weight is spectrally normalized."""
    return [
        (name, m) for name, m in model.named_modules()
        if isinstance(m, NORMALIZED_LAYERS) and parametrize.is_parametrized(m, "weight")
    ]
