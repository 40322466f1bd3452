"""Spectral normalization of a network (Miyato et al., 2018), applied uniformly by model plugins.

torch's `parametrizations.spectral_norm` divides each weight by an estimate of the largest singular value of
the weight reshaped to a matrix (out_channels x in_channels*k*k for a convolution), refined by one power
iteration per training forward pass.
"""

from __future__ import annotations

import math
import operator
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
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
# The product of the layers' norms bounds the network's L2 Lipschitz constant only for a plain chain of layers
# (LeNet, VGG); `lipschitz_bound` composes an honest bound over the network's actual graph instead (residual
# additions, batch-norm scales and pooling included), or says why it does not.

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
    its actual input: power iteration for convolutions, the same SVD for linear layers); the products of both over
    the layers (plain numbers: not a Lipschitz bound of a network with skips, branches or batch norm); and
    `lipschitz`, the L2 Lipschitz bound of the whole network composed over its graph (`lipschitz_bound`)."""
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
    with adversary_mode(model):
        lipschitz = lipschitz_bound(model, input_shape, device, {la["name"]: la["operator_norm"] for la in layers})
    return {"layers": layers,
            "product_matrix_sigma": math.prod(layer["matrix_sigma"] for layer in layers),
            "product_operator_norm": math.prod(layer["operator_norm"] for layer in layers),
            "power_iterations": iterations, "lipschitz": lipschitz}


# ----------------------------------------------------------------------------------------------- Lipschitz bound
# An upper bound on the network's L2 Lipschitz constant (logits as a function of the input image, the model in eval
# mode as it is attacked and evaluated), composed node by node over its torch.fx graph. With L(v) a bound for the
# map input -> v:  L(layer(v)) <= ||layer|| L(v) for a conv / linear layer (its operator norm on its actual input),
# max_c |gamma_c| / sqrt(var_c + eps) L(v) for batch norm on running statistics (a diagonal scale), sup |phi'| L(v)
# for an elementwise activation, and L(a + b) <= L(a) + L(b) for a sum, so a residual block x + F(x) gets
# (1 + ||F||) L(x) and one with a projection shortcut (||S|| + ||F||) L(x). For a plain chain (LeNet, VGG) this is
# the product of the layers' norms. Anything without a rule here leaves the bound "not computed", with the reason.

# sup |phi'(x)| of elementwise activations (GELU, SiLU: the derivative's maximum, measured on a fine grid, rounded up)
_ACTIVATION_LIPSCHITZ = {nn.ReLU: 1.0, nn.ReLU6: 1.0, nn.Tanh: 1.0, nn.Hardtanh: 1.0, nn.Softplus: 1.0,
                         nn.Sigmoid: 0.25, nn.GELU: 1.129, nn.SiLU: 1.1}
# maps that move coordinates without changing values (dropout: the identity in eval mode)
_ISOMETRIES = (nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
               nn.AlphaDropout)
_AVERAGES = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
             nn.AdaptiveAvgPool3d)
_MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
_SUMS = {operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub, "add", "add_", "sub",
         "sub_"}
_RESHAPES = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.permute, torch.transpose,
             "flatten", "view", "reshape", "contiguous", "permute", "transpose", "squeeze", "unsqueeze", "clone"}
_RELUS = {torch.relu, torch.nn.functional.relu, "relu", "relu_"}
_MEANS = {torch.mean, torch.nn.functional.adaptive_avg_pool1d, torch.nn.functional.adaptive_avg_pool2d,
          torch.nn.functional.adaptive_avg_pool3d, torch.nn.functional.avg_pool1d, torch.nn.functional.avg_pool2d,
          torch.nn.functional.avg_pool3d, "mean"}


class _NoRule(Exception):
    pass


def lipschitz_bound(model: nn.Module, input_shape: tuple[int, ...], device, layer_norm: dict[str, float]) -> dict:
    """{"bound": an upper bound on the L2 Lipschitz constant of `model` on inputs of `input_shape` (C, H, W), or None
    when not computed; "structure": "chain" (every operation has one input: the product of the layers' norms is
    the bound) or "branching" (residual additions or concatenations, composed as in the comment above), or None;
    "detail": how it was computed, or why not}. `layer_norm` maps each conv / linear module name to its operator
    norm (layer_norms). Call it with the model in eval mode (adversary_mode)."""
    try:
        graph = fx.symbolic_trace(model)
    except Exception as exc:  # data-dependent control flow and the like: no graph, no bound
        return _not_computed(f"the model could not be traced by torch.fx ({type(exc).__name__}: "
                             f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''})")
    try:
        with torch.no_grad():
            ShapeProp(graph).propagate(torch.zeros((1, *input_shape), device=device))
    except Exception as exc:
        return _not_computed(f"shape propagation failed ({type(exc).__name__})")
    modules = dict(graph.named_modules())
    bound: dict[fx.Node, float] = {}  # for the tensors that depend on the image (structurally, whatever the value)
    branching, result = False, None
    try:
        for node in graph.graph.nodes:
            inputs = [a for a in node.all_input_nodes if a in bound]
            if len(inputs) > 1:
                branching = True
            if node.op == "placeholder":
                bound[node] = 1.0
            elif node.op == "output":
                result = bound.get(node.args[0]) if isinstance(node.args[0], fx.Node) else None
            elif node.op == "get_attr" or "tensor_meta" not in node.meta or not inputs:
                continue  # constants, shapes and sizes: no bound needed
            elif node.op == "call_module":
                bound[node] = _module_factor(node, modules[node.target], layer_norm) * bound[inputs[0]]
            else:
                bound[node] = _function_bound(node, inputs, bound)
    except _NoRule as exc:
        return _not_computed(str(exc))
    if result is None:
        return _not_computed("the model's output is not a tensor that depends on its input")
    if not math.isfinite(result):
        return _not_computed("the composed bound overflows a float")
    how = ("product of the layers' operator norms" if not branching else
           "composed over the graph: residual and other sums add their branches' bounds, concatenations add them "
           "in quadrature")
    return {"bound": float(result), "structure": "branching" if branching else "chain",
            "detail": f"{how}; conv/linear norms by power iteration (which approaches each norm from below), batch "
                      "norm as its largest running-statistics scale, activations and pooling by their Lipschitz "
                      "constants"}


def _not_computed(reason: str) -> dict:
    return {"bound": None, "structure": None, "detail": f"not computed: {reason}"}


def _module_factor(node: fx.Node, module: nn.Module, layer_norm: dict[str, float]) -> float:
    """The Lipschitz factor of one call of a leaf module."""
    name = node.target
    if isinstance(module, LINEAR_MAPS):
        if name not in layer_norm:
            raise _NoRule(f"no operator norm for layer {name}")
        return layer_norm[name]
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if module.training or module.running_var is None:
            raise _NoRule(f"batch norm {name} normalizes with batch statistics (not a fixed map)")
        scale = 1.0 / torch.sqrt(module.running_var.detach().double() + module.eps)
        if module.weight is not None:
            scale = scale * module.weight.detach().double().abs()
        return float(scale.max())
    if isinstance(module, _ISOMETRIES):
        return 1.0
    if isinstance(module, nn.LeakyReLU):
        return max(1.0, abs(module.negative_slope))
    if isinstance(module, nn.ELU):
        return max(1.0, module.alpha)
    for kind, value in _ACTIVATION_LIPSCHITZ.items():
        if type(module) is kind:
            return value
    if isinstance(module, _MAX_POOLS):
        return _max_pool_factor(module, len(node.meta["tensor_meta"].shape) - 2)
    if isinstance(module, _AVERAGES):
        return _averaging_bound(module, _input_shape(node))
    raise _NoRule(f"no Lipschitz rule for layer {name} ({type(module).__name__})")


def _max_pool_factor(module: nn.Module, dims: int) -> float:
    """|max over a window of a - of b| <= the L2 norm of a - b on the window; each input lies in at most
    ceil(((k - 1) d + 1) / s) windows per axis, so the map is Lipschitz with the square root of their product."""
    def per_axis(value):
        return tuple(value) if isinstance(value, (tuple, list)) else (value,) * dims
    kernel, stride, dilation = per_axis(module.kernel_size), per_axis(module.stride or module.kernel_size), \
        per_axis(module.dilation)
    cover = math.prod(math.ceil(((k - 1) * d + 1) / s) for k, s, d in zip(kernel, stride, dilation))
    return math.sqrt(cover)


def _averaging_bound(fn, shape: tuple[int, ...]) -> float:
    """A linear map with non-negative coefficients (average pooling, means): its norm is at most
    sqrt(max row sum * max column sum) (Schur's test), both read off the map itself: A 1 and A^T 1."""
    ones = torch.ones(shape, dtype=torch.float64, requires_grad=True)
    with torch.enable_grad():
        rows = fn(ones)
        (columns,) = torch.autograd.grad(rows, ones, torch.ones_like(rows))
    return math.sqrt(float(rows.detach().max()) * float(columns.max()))


def _input_shape(node: fx.Node) -> tuple[int, ...]:
    return tuple(node.all_input_nodes[0].meta["tensor_meta"].shape)


def _function_bound(node: fx.Node, inputs: list[fx.Node], bound: dict) -> float:
    """The bound of a call_function / call_method node whose `inputs` depend on the image."""
    target = node.target
    first = bound[inputs[0]]
    if target in _SUMS:
        return sum(bound[a] for a in inputs)
    if target in (torch.cat, torch.concat, torch.stack):
        return math.sqrt(sum(bound[a] ** 2 for a in inputs))
    if len(inputs) == 1 and (target in _RESHAPES or target in _RELUS):
        return first
    if len(inputs) == 1 and target in (operator.mul, operator.imul, torch.mul, "mul", "mul_",
                                       operator.truediv, torch.div, "div"):
        other = [a for a in node.args if a is not inputs[0]]
        if len(other) == 1 and isinstance(other[0], (int, float)):
            factor = abs(other[0])
            return first * (factor if target not in (operator.truediv, torch.div, "div") else 1.0 / factor)
    if len(inputs) == 1 and target in _MEANS and node.args and node.args[0] is inputs[0]:
        rest, kwargs = node.args[1:], node.kwargs

        def fn(z):
            return getattr(z, target)(*rest, **kwargs) if isinstance(target, str) else target(z, *rest, **kwargs)

        return _averaging_bound(fn, _input_shape(node)) * first
    name = target if isinstance(target, str) else getattr(target, "__name__", str(target))
    raise _NoRule(f"no Lipschitz rule for the operation {name} (node {node.name})")
