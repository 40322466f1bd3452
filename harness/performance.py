"""The fast path: how a cell's computation is executed (precision, memory layout, compilation, where the data
lives), resolved from the spec's `performance` section.

Two of these options change *what* is computed, and are therefore part of the experiment: the training
precision and TF32. bf16 training reaches other weights than fp32 training from the same seed (on digits/LeNet:
per-strength means over seeds 0-2 within 0.55 points of Acc., 0.0020 of GE and 0.84 points of PGD, against seed
standard deviations of up to 1.05 / 0.0043 / 1.94; README "Performance"), and TF32 rounds fp32 matmul and
convolution inputs to a 10-bit mantissa on CUDA. Both, as resolved for each cell (`training_view`, after the
CPU fallback of `for_model`), are in the cell's training fingerprint (harness.checkpoint.training_view):
resuming a checkpoint, or merging cells into one table, across a change of either is refused like any other
training change. The other options (layout, compile, data on the device) change float reassociation at most.

Defaults are the fastest settings that keep results sound:
- `precision: "auto"` is bf16 autocast where the device computes bf16 natively (`native_bf16`): CUDA GPUs
  from Ampere on (with TF32 for the fp32 matmuls and convolutions that remain) and CPUs with AMX tiles (Intel
  Sapphire Rapids and later), where oneDNN's bf16 kernels ran a LeNet/VGG16 PGD-AT step 1.7-2.4x faster than
  fp32 (README "Performance"); fp32 elsewhere (bf16 is emulated there, and slower). It applies to training,
  training adversaries included. Evaluation (the reported clean loss, accuracy and attack success, the checks and
  the analysis) always runs in fp32, and on CUDA with TF32 off unless `eval_tf32` asks for it (`evaluation`).
  bf16 adversaries were checked against fp32 ones (attack success rate; see README "Performance") and the test
  tests/test_performance.py keeps that agreement within its stated tolerance.
  One known exception is checked per model (`for_model`): oneDNN's bf16 convolution writes garbage into the
  weight gradient (uninitialised memory, up to 1e38, varying from call to call) when a convolution's stride
  exceeds its input size along a spatial dimension (e.g. a stride-2 3x3 conv on a 1x1 feature map: timm
  ResNets on 16x16 inputs). A model with such a convolution trains in fp32 on CPU, and its cells say why.
- `tf32: true`: TF32 for the fp32 matmuls and convolutions of training on CUDA (no effect on CPU).
- `eval_tf32: false`: evaluation on CUDA in full fp32 (TF32 would round the reported numbers' inputs).
- `channels_last: "auto"` is on for CUDA (tensor cores want NHWC) and for CPU bf16 (oneDNN's AMX kernels want
  it too: +23% VGG16, +52% LeNet), off for CPU fp32 (there it slowed VGG16 by 19%).
  Not every model runs in NHWC: code written for NCHW, e.g. advertorch's LeNet5 with `out.view(n, -1)` after its
  last convolution, raises "view size is not compatible with input tensor's size and stride". `for_model` probes
  each model once in channels_last (one forward and backward pass of two images, in training and in evaluation
  mode, on a copy) and falls back to NCHW for a model that fails there but runs in NCHW, saying why in `note`.
- `data_on_device: "auto"` moves both splits to the GPU once, as uint8 (or whatever dtype the plugin gave);
  batches are then gathered, scaled and augmented on the device. On CPU it is a no-op.
- `compile: false`: torch.compile is opt-in (its first steps compile for tens of seconds; worth it for long
  runs only, and only on GPU in practice).
- Parameters frozen and spectral-norm weights cached during every adversary is not an option: it is
  `harness.plugin.adversary_mode`, always on, because it changes nothing but speed and .grad hygiene.

The distributed part (DistributedDataParallel under torchrun) lives in harness/distributed.py; `Runtime`
joins both so that the training loop calls one object at a few points.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, replace
from typing import Callable, Iterator

import torch
from torch import nn

from harness import threads
from harness.plugin import DataSplits, DefensePlugin, Split

# bf16 adversaries must fool the model as often as fp32 ones: the attack success rate (over the correctly
# classified test samples) may differ by at most this many percentage points. Measured (CPU autocast, LeNet+SN
# trained on digits, 330 attacked samples, PGD-10 without random start): 0.31 / 0.00 / 0.00 points at eps
# 8 / 16 / 32 (per-sample agreement 99.7 / 100 / 99.4 %). tests/test_performance.py checks it on every run.
BF16_ASR_TOLERANCE_PP = 2.0

DEFAULTS = {"precision": "auto", "channels_last": "auto", "data_on_device": "auto", "compile": False, "tf32": True,
            "eval_tf32": False}


def native_bf16(device: torch.device) -> bool:
    """Whether `device` runs bf16 matmuls and convolutions natively, i.e. faster than fp32: a CUDA GPU with
    bf16 tensor cores (not emulation), or a CPU with AMX tiles. CPUs with AVX512-BF16 only are not assumed
    faster (not measured)."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":  # a private torch API (2.1+): a torch without it is treated as no AMX
        amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
        return bool(amx()) if callable(amx) else False
    return False


@dataclass
class Performance:
    """The resolved performance options for one device."""

    device: torch.device
    precision: str = "fp32"  # resolved: "fp32" or "bf16"
    channels_last: bool = False
    data_on_device: bool = False
    compile: bool = False
    tf32: bool = True  # as asked; in effect on CUDA only (training_view)
    eval_tf32: bool = False  # as asked; in effect on CUDA only (evaluation_tf32)
    note: str | None = None  # why the options differ from what the spec resolved to (see for_model)

    @classmethod
    def from_spec(cls, options: dict | None, device: torch.device) -> "Performance":
        opts = dict(DEFAULTS, **(options or {}))
        cuda = device.type == "cuda"

        def auto(value, default):
            return default if value == "auto" else value

        precision = auto(opts["precision"], "bf16" if native_bf16(device) else "fp32")
        channels_last = auto(opts["channels_last"], cuda or precision == "bf16")
        return cls(device=device, precision=precision, channels_last=bool(channels_last),
                   data_on_device=bool(auto(opts["data_on_device"], cuda)) and cuda, compile=bool(opts["compile"]),
                   tf32=bool(opts["tf32"]), eval_tf32=bool(opts["eval_tf32"]))

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if self.precision == "bf16" else None

    def training_view(self) -> dict:
        """What of these options changes the trained weights, as resolved for this device (and, after
        `for_model`, this model): part of a cell's training fingerprint (harness.checkpoint.training_view)."""
        return {"precision": self.precision, "tf32": self.tf32 and self.device.type == "cuda"}

    @property
    def evaluation_tf32(self) -> bool:
        """Whether evaluation (clean passes, attacks, checks, analysis) may use TF32: only on CUDA, and only when
        the spec's `eval_tf32` asks for it; by default the reported numbers are computed in full fp32."""
        return self.eval_tf32 and self.device.type == "cuda"

    def apply_global(self) -> None:
        """Process-wide switches for training: the CPU thread count (harness.threads: one fewer than the usable
        cores unless OMP_NUM_THREADS says otherwise) and TF32 for fp32 matmuls/convolutions on CUDA."""
        threads.configure()
        if self.device.type == "cuda":
            _set_tf32(self.tf32)
            torch.backends.cudnn.benchmark = True

    @contextlib.contextmanager
    def evaluation(self) -> Iterator[None]:
        """Evaluation's TF32 setting (`evaluation_tf32`) for the duration of the block, then the training one
        back. On CPU nothing changes (TF32 is a CUDA mode). The CPU thread count is configured here too, as in
        `apply_global`: `harness eval` and harness.evaluate evaluate without training."""
        threads.configure()
        if self.device.type != "cuda":
            yield
            return
        before = _get_tf32()
        _set_tf32(self.evaluation_tf32)
        try:
            yield
        finally:
            _set_tf32(*before)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision for the training step (forward passes, adversaries included); a no-op in fp32."""
        dtype = self.autocast_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """channels_last memory layout, in place (same parameters, same results up to float reassociation)."""
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        return model

    def compiled(self, model: nn.Module) -> nn.Module:
        """torch.compile'd view of `model` sharing its parameters and buffers (the model itself when off)."""
        return torch.compile(model) if self.compile else model

    def prepare_data(self, data: DataSplits) -> DataSplits:
        """Move both splits to the device once, in their stored dtype (uint8 stays uint8: 4x less memory)."""
        if self.data_on_device:
            if data.train is not None:  # None: a test-only dataset (evaluation only)
                data.train = Split(data.train.images.to(self.device), data.train.labels.to(self.device))
            data.test = Split(data.test.images.to(self.device), data.test.labels.to(self.device))
        return data

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    @property
    def depends_on_model(self) -> bool:
        """Whether `for_model` may change what these options compute (bf16 on CPU: the precision), i.e. the
        precision a cell trains in is known only after seeing its model. (`for_model` may also switch the layout
        back to NCHW, which changes float reassociation at most.)"""
        return self.precision == "bf16" and self.device.type == "cpu"

    def for_model(self, model: nn.Module, input_shape: tuple[int, ...]) -> "Performance":
        """These options for `model` on inputs of `input_shape` (C, H, W), the reason for any change in `note`:
        - fp32 instead of bf16 on CPU when a convolution of the model has the geometry in which oneDNN's bf16
          weight gradient is garbage (module doc);
        - NCHW instead of channels_last when the model fails in channels_last but runs in NCHW (module doc;
          `channels_last_failure`). `model` itself is not changed, nor the global RNG."""
        result = self
        if self.depends_on_model:
            hazards = cpu_bf16_conv_hazards(model, input_shape)
            if hazards:
                more = f" and {len(hazards) - 1} more" if len(hazards) > 1 else ""
                note = (f"trained in fp32, not bf16: on CPU, oneDNN's bf16 convolution returns garbage weight "
                        f"gradients when the stride exceeds the input size, as in {hazards[0]}{more}")
                result = replace(self, precision="fp32", channels_last=False, note=note)
        if result.channels_last:
            failure = channels_last_failure(model, input_shape, result)
            if failure is not None:
                note = (f"trained and evaluated in NCHW, not channels_last: the model fails in channels_last "
                        f"memory format ({failure})")
                result = replace(result, channels_last=False,
                                 note=note if result.note is None else f"{result.note}; {note}")
        return result

    def describe(self) -> dict:
        return {**self.training_view(), "channels_last": self.channels_last,
                "data_on_device": self.data_on_device, "compile": self.compile,
                "eval_tf32": self.evaluation_tf32, **({"note": self.note} if self.note else {})}


# What of a cell's recorded `performance` (Performance.describe) changes its numbers: cells that differ in these
# are not merged into one table (harness.merge), nor are checkpoints resumed across them (training_view).
NUMERIC_KEYS = ("precision", "tf32", "eval_tf32")


def numeric_view(described: dict) -> dict:
    """The keys of NUMERIC_KEYS present in a cell's recorded `performance` (older reports lack `eval_tf32`)."""
    return {k: described[k] for k in NUMERIC_KEYS if k in described}


def _get_tf32() -> tuple[bool, bool]:
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def _set_tf32(matmul: bool, cudnn: bool | None = None) -> None:
    # The legacy flags, as everywhere in the harness: mixing them with torch's newer `fp32_precision` API makes
    # torch refuse to read the flags back (RuntimeError), so only these two are ever set.
    torch.backends.cuda.matmul.allow_tf32 = matmul
    torch.backends.cudnn.allow_tf32 = matmul if cudnn is None else cudnn


def cpu_bf16_conv_hazards(model: nn.Module, input_shape: tuple[int, ...]) -> list[str]:
    """The convolutions of `model` whose stride exceeds their input size along some spatial dimension, found by
    one forward pass of a zero image of `input_shape`, e.g. ["layer4.0.conv1 (stride 2x2 on 1x1)"].

    Why: measured on torch 2.14.1 (oneDNN, Sapphire Rapids), every observed case of garbage bf16 weight gradients
    in two sweeps (inputs 1-8, strides 1-3, kernels 1/3/5, NCHW and NHWC; inputs 1-6, strides 1-4, kernels 1-5,
    paddings 0-2, dilations 1-2, grouped and dense) had a stride larger than the input; the condition is kept that broad because the garbage comes from
    uninitialised memory and shows up only on some calls."""
    found: list[str] = []
    names = {m: n for n, m in model.named_modules()}

    def check(module: nn.Module, args) -> None:
        x = args[0]
        spatial, strides = x.shape[2:], module.stride
        if any(s > size for s, size in zip(strides, spatial)):
            found.append(f"{names.get(module, type(module).__name__)} (stride {'x'.join(map(str, strides))} on "
                         f"{'x'.join(map(str, spatial))})")

    hooks = [m.register_forward_pre_hook(check) for m in model.modules()
             if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            param = next(model.parameters(), None)
            model(torch.zeros((1, *input_shape), device=param.device if param is not None else None))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return found


def channels_last_failure(model: nn.Module, input_shape: tuple[int, ...], performance: Performance) -> str | None:
    """Why `model` cannot run in channels_last memory format, or None when it can (or when it fails in NCHW too:
    then the layout is not the cause, and training reports the model's own error as it would without the probe).

    The probe runs what a cell runs, once, on a deep copy of the model (its parameters, buffers, spectral-norm
    vectors and batch-norm statistics stay untouched) with the global RNG forked (a dropout layer draws nothing
    from the cell's stream): a forward and backward pass of two random images in training mode under the
    training precision (the training step), then a forward pass and an input gradient in evaluation mode in fp32
    (adversaries and evaluation). Two images, not one: batch norm in training mode needs more than one value."""
    if len(input_shape) != 3:  # channels_last concerns 4-D image batches only; nothing else is converted
        return None

    param = next(model.parameters(), None)
    device = param.device if param is not None else performance.device  # where the model is, i.e. will run

    def run(layout: torch.memory_format) -> None:
        probe = copy.deepcopy(model).to(memory_format=layout)
        x = torch.rand((2, *input_shape), device=device).contiguous(memory_format=layout)
        probe.train()
        dtype = performance.autocast_dtype
        with torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext():
            out = probe(x)
        out.float().sum().backward()
        probe.eval()
        x = x.detach().requires_grad_(True)
        torch.autograd.grad(probe(x).float().sum(), x)

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            run(torch.channels_last)
            return None
        except Exception as exc:  # noqa: BLE001 - any failure of the model's code in this layout
            failure = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        try:
            run(torch.contiguous_format)
        except Exception:  # noqa: BLE001 - it fails in NCHW too: not a layout problem; training will say so
            return None
    return failure if len(failure) <= 300 else failure[:297] + "..."


@dataclass
class Runtime:
    """What the training loop asks at its few hook points; the default does exactly what the plain loop did."""

    performance: Performance | None = None
    distributed: "object | None" = None  # harness.distributed.Distributed

    def training_model(self, model: nn.Module) -> nn.Module:
        """The module the defense's loss is computed with: compiled and/or DDP-routed when asked."""
        compile_fn = self.performance.compiled if self.performance is not None else (lambda m: m)
        if self.distributed is not None:
            return self.distributed.wrap(model, compile_fn)
        return compile_fn(model)

    def batches(self, iterator: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.distributed is not None:
            iterator = self.distributed.shard(iterator)
        for x, y in iterator:
            yield (self.performance.inputs(x) if self.performance is not None else x), y

    def loss(self, defense: DefensePlugin, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.performance is None:
            return defense.loss(model, x, y)
        with self.performance.autocast():
            loss = defense.loss(model, x, y)
        return loss.float()

    def stop_check(self, guard) -> Callable[[], bool]:
        """The stop request of `guard` (harness.interrupt), agreed over all ranks under DDP."""
        return self.distributed.agreed_stop(guard) if self.distributed is not None else guard.requested

    def all_finite(self, value: float) -> bool:
        """Whether the step's loss is finite on every rank (agreed under DDP, so all ranks stop at the same step;
        there it is also where a rank whose loss failed stops the others: harness.distributed)."""
        finite = math.isfinite(value)
        return self.distributed.agree_step(finite) if self.distributed is not None else finite

    def step_failed(self, failure: BaseException, cell_level: bool) -> None:
        """This rank's loss raised `failure` (the caller re-raises it): under DDP, join the step's next agreement
        with it, so that the other ranks stop there too instead of waiting in a collective this rank left
        (harness.distributed). `cell_level`: it fails the cell, not the run."""
        if self.distributed is not None:
            self.distributed.agree_step(failure=failure, cell_level=cell_level)

    def epoch_totals(self, total: float, seen: int) -> tuple[float, int]:
        """The epoch's summed objective and sample count over all ranks."""
        if self.distributed is not None:
            return self.distributed.sum_totals(total, seen)
        return total, seen
