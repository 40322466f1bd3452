"""Spectral normalization of a network (Miyato et al., 2018), applied uniformly by model plugins.

torch's `parametrizations.spectral_norm` divides each weight by an estimate of the largest singular value of
the weight reshaped to a matrix (out_channels x in_channels*k*k for a convolution), refined by one power
iteration per training forward pass.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
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


# ----------------------------------------------------------------------------------------------- measured norms
# What the report shows about "no amplification" (paper section 4.1.2): spectral normalization bounds the largest
# singular value of each weight *reshaped to a matrix*; the map a convolution applies to its actual input is a
# different, larger matrix (each weight is reused at every position), whose norm can exceed the reshaped one.

LINEAR_MAPS = NORMALIZED_LAYERS


def matrix_sigma(module: nn.Module) -> float:
    """Largest singular value (exact, by SVD) of the layer's weight as used (normalized, if it is), reshaped to
    out_features x rest: the quantity spectral normalization divides by."""

    with torch.no_grad():
        weight = module.weight.detach()
        return float(torch.linalg.matrix_norm(weight.reshape(weight.shape[0], -1).double(), ord=2))


def operator_norm(module: nn.Module, input_shape: tuple[int, ...], iterations: int = 100, tol: float = 1e-6,
                  seed: int = 0) -> float:
    """Largest singular value of the linear part of an affine layer, z -> module(z) - module(0), as a map on inputs
    of `input_shape` (one sample, batch dimension included, e.g. (1, C, H, W)), by power iteration on A^T A: A by
    a forward pass, A^T by autograd's vector-Jacobian product (a transposed convolution, with the layer's own
    stride, padding and padding mode). Call it with the model's parameters frozen (adversary_mode).
    Power iteration approaches the largest singular value from below."""

    param = next(module.parameters())
    with single_thread_on_cpu(param.device):
        return _power_iteration(module, input_shape, iterations, tol, seed, param)


@contextmanager
def single_thread_on_cpu(device) -> Iterator[None]:
    """One-sample convolutions and small SVDs are latency-bound: on a busy CPU the thread pool's synchronization
    made them up to 50x slower with 2 threads than with 1 (measured on this project's 2-core machine)."""

    threads = torch.get_num_threads()
    if torch.device(device).type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _power_iteration(module: nn.Module, input_shape: tuple[int, ...], iterations: int, tol: float, seed: int,
                     param) -> float:

    with torch.no_grad():
        offset = module(torch.zeros(input_shape, device=param.device, dtype=param.dtype))
    v = torch.randn(input_shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    v = (v / v.norm()).to(param.device, param.dtype)
    sigma = 0.0
    for _ in range(max(iterations, 1)):
        v.requires_grad_(True)
        out = module(v) - offset  # A v
        (w,) = torch.autograd.grad(out, v, grad_outputs=out.detach())  # A^T A v
        new_sigma = float(out.detach().double().norm())  # ||A v|| with ||v|| = 1
        norm = float(w.double().norm())
        if norm == 0.0:
            return 0.0
        v = (w / norm).detach()
        converged = abs(new_sigma - sigma) <= tol * max(new_sigma, 1e-30)
        sigma = new_sigma
        if converged:
            break
    with torch.no_grad():
        return max(sigma, float((module(v) - offset).double().norm()))


def layer_norms(model: nn.Module, input_shape: tuple[int, ...], device, iterations: int = 100) -> dict:
    """Per convolution / linear layer, in forward order: its input shape, whether it is spectrally normalized,
    `matrix_sigma` (the reshaped weight's largest singular value) and `operator_norm` (the layer's norm as a map on
    its actual input: power iteration for convolutions, the same SVD for linear layers); and the products of both
    over the network (an upper bound on its L2 Lipschitz constant when the other layers are 1-Lipschitz, as ReLU
    and max pooling are; batch norm is not counted)."""
    import math


    from harness.plugin import adversary_mode

    shapes: dict[str, tuple[int, ...]] = {}
    names = {m: name for name, m in model.named_modules() if isinstance(m, LINEAR_MAPS)}

    def record(module: nn.Module, args: tuple, _output) -> None:  # a hook returning a value would replace the output
        shapes.setdefault(names[module], tuple(args[0].shape))

    hooks = [m.register_forward_hook(record) for m in names]
    try:
        with torch.no_grad(), adversary_mode(model):
            model(torch.zeros((1, *input_shape), device=device))
    finally:
        for h in hooks:
            h.remove()
    layers = []
    with adversary_mode(model), single_thread_on_cpu(device):
        for module, name in names.items():
            if name not in shapes:  # never called in the forward pass
                continue
            sigma = matrix_sigma(module)
            is_linear = isinstance(module, nn.Linear)
            norm = sigma if is_linear else operator_norm(module, shapes[name], iterations)
            layers.append({"name": name, "type": type(module).__name__, "input_shape": list(shapes[name][1:]),
                           "normalized": parametrize.is_parametrized(module, "weight"),
                           "matrix_sigma": sigma, "operator_norm": norm})
    order = list(shapes)
    layers.sort(key=lambda layer: order.index(layer["name"]))
    return {"layers": layers,
            "product_matrix_sigma": math.prod(layer["matrix_sigma"] for layer in layers),
            "product_operator_norm": math.prod(layer["operator_norm"] for layer in layers),
            "power_iterations": iterations}
