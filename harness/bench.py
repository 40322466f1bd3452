"""`harness bench SPEC`: how fast each cell's training step and evaluation run, against two baselines timed in
the same process, interleaved step by step (so a shared or throttling machine slows all three alike).

Per cell configuration (model x defensive strength), on one training batch of the spec's batch size:
- `train`: the harness's training step exactly as harness.train runs it (defense loss under the spec's
  performance options, adversaries inside adversary_mode, backward, SGD step); images/s;
- `eval`: the harness's evaluation path on one evaluation batch: the clean pass plus the first attack on every
  image (all treated as correctly classified: the worst case) and the forward on the adversaries; images/s;
- FLOPs per image of both (torch.utils.flop_counter.FlopCounterMode: matmuls and convolutions, backward included)
  and, on a GPU whose peak is in PEAK_TFLOPS, the fraction of that peak reached;
- for the `pgd-at` defense at a strength > 0, the same training step done by
  (a) `plain`: advertorch's LinfPGDAttack called plainly, as one writes it without the harness: fp32, NCHW,
      on the model as it is during training (train mode, parameters trainable, no spectral-norm cache: each
      attack forward runs a power iteration and each attack backward also computes the weight gradients);
  (b) `plain_same`: the same plain call under the harness's autocast and memory layout, run only when those
      are not fp32/NCHW: it isolates what *how the library is called* buys from what precision and layout buy;
  (c) `hand`: a minimal hand-written PGD loop (eval mode, torch.autograd.grad with respect to the input only),
      under the harness's autocast and layout: it measures the cost of the harness's machinery, nothing else;
  reported as speedups `vs_plain` = t_plain / t_harness (the whole fast path), `vs_plain_same` =
  t_plain_same / t_harness (the call site alone; equal to vs_plain when the harness runs fp32/NCHW) and
  `vs_hand` = t_hand / t_harness.

Timing: `warmup` untimed rounds, then `repeats` timed rounds; each round runs one step of every variant; the
median per variant is reported (CUDA synchronized around every timed step), with ratios also from the fastest
round (`*_min`). The order of the variants rotates from round to round. Each variant trains its own copy of
the model from the same initialisation.
"""

from __future__ import annotations

import copy
import math
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from rich import box
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import harness
from harness import registry, threads
from harness.compat import import_advertorch
from harness.data import batches
from harness.evaluate import adversarial_correct, clean_pass
from harness.performance import Performance, Runtime
from harness.plugin import DataSplits, Split, to_unit
from harness.report import write_json_atomic
from harness.runner import Cell, load_data, pick_device, plan, require_train_split, seed_everything, select
from harness.train import make_optimizer

# Dense peak TFLOPS (NVIDIA data sheets; "tf32" is the tensor-core rate used for fp32 with TF32 allowed).
# Matched in order against torch.cuda.get_device_name(); an unknown device gives null fractions.
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H200", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("H100 PCIe", {"bf16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    ("H100 NVL", {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    ("H100", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM
    ("A100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
]


def peak_tflops(device: torch.device, performance: Performance) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_TFLOPS:
        if key in name:
            if performance.precision == "bf16":
                return peaks["bf16"]
            return peaks["tf32"] if performance.tf32 else peaks["fp32"]
    return None


def hand_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, step_size: float, steps: int,
             random_start: bool) -> torch.Tensor:
    """A minimal Linf PGD, as one writes it by hand (Madry et al.): eval mode, gradient w.r.t. the input only.
    Written by hand on purpose: it is the baseline the harness's library call is measured against."""
    was_training = model.training
    model.eval()
    delta = torch.empty_like(x).uniform_(-eps, eps) if random_start else torch.zeros_like(x)
    delta = (x + delta).clamp(0, 1) - x
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model(x + delta), y)
        (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + step_size * grad.sign()).clamp(-eps, eps)
        delta = (x + delta).clamp(0, 1) - x
    model.train(was_training)
    return (x + delta).detach()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Variant:
    """One way of doing the training step, on its own copy of the model with its own optimizer."""

    def __init__(self, name: str, model: nn.Module, cfg: dict,
                 step: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor):
        self.name, self.model, self.step_fn, self.x = name, model, step, x  # x in this variant's memory layout
        self.optimizer = make_optimizer(model, cfg)
        self.times: list[float] = []

    def step(self, y: torch.Tensor) -> float:
        self.model.train()
        loss = self.step_fn(self.model, self.x, y)
        value = float(loss.detach())  # the harness's loop reads the loss every step (non-finite check); all do
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return value


def _median_rate(times: list[float], n: int) -> dict:
    med = statistics.median(times)
    return {"seconds_per_step": med, "images_per_s": n / med, "min_seconds_per_step": min(times),
            "samples": len(times)}


def _flops(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def bench_cell(cell: Cell, spec: dict, data: DataSplits, device: torch.device, performance: Performance,
               batch_size: int, eval_batch_size: int, warmup: int, repeats: int) -> dict:
    cfg = spec["training"]
    defense_entry = spec["defense"]
    defense = registry.load("defense", defense_entry["name"])(eps=to_unit(cell.strength), **defense_entry["options"])
    seed_everything(spec["seed"])
    base = registry.load("model", cell.model["name"])(**cell.model["options"]).build(data.num_classes, data.input_shape)
    performance = performance.for_model(base.to(device), data.input_shape)  # as harness.runner.run_cell does
    base = performance.prepare_model(base)
    runtime = Runtime(performance)

    x, y = next(batches(data.train, batch_size, device, transform=data.augment,
                        generator=torch.Generator().manual_seed(spec["seed"])))
    n = len(y)

    def harness_step(model, xb, yb):  # the body of harness.train.train's loop
        return runtime.loss(defense, step_models[model], xb, yb)

    variants = [_Variant("harness", copy.deepcopy(base), cfg, harness_step, performance.inputs(x))]
    step_models = {variants[0].model: runtime.training_model(variants[0].model)}
    baselines = defense_entry["name"] == "pgd-at" and cell.strength > 0
    if baselines:
        # the pgd-at defense's own settings (harness.plugin.PGDSettings), in [0, 1] units
        eps, steps, alpha, rand = defense.eps, defense.steps, defense.step_size, defense.random_start
        attacks = import_advertorch()

        def plain_call(model, xb, yb):
            pgd = attacks.LinfPGDAttack(model, eps=eps, nb_iter=steps, eps_iter=alpha, rand_init=rand,
                                        clip_min=0.0, clip_max=1.0)
            x_adv = pgd.perturb(xb, yb).detach()
            return F.cross_entropy(model(x_adv), yb).float()

        def plain_same_step(model, xb, yb):
            with performance.autocast():
                return plain_call(model, xb, yb)

        def hand_step(model, xb, yb):
            with performance.autocast():
                x_adv = hand_pgd(model, xb, yb, eps, alpha, steps, rand)
                return F.cross_entropy(model(x_adv), yb).float()

        nchw = copy.deepcopy(base).to(memory_format=torch.contiguous_format)
        variants.append(_Variant("plain", nchw, cfg, plain_call, x.contiguous()))
        if performance.autocast_dtype is not None or performance.channels_last:
            variants.append(_Variant("plain_same", copy.deepcopy(base), cfg, plain_same_step, performance.inputs(x)))
        variants.append(_Variant("hand", copy.deepcopy(base), cfg, hand_step, performance.inputs(x)))

    for round_ in range(warmup + repeats):
        shift = round_ % len(variants)  # rotate the order: no variant always runs first, or after another
        for v in variants[shift:] + variants[:shift]:
            _sync(device)
            started = time.perf_counter()
            v.step(y)
            _sync(device)
            if round_ >= warmup:
                v.times.append(time.perf_counter() - started)

    harness_variant = variants[0]
    train_flops = _flops(lambda: harness_variant.step(y)) / n

    # evaluation: the harness's own functions on one batch of the test split; every image attacked
    attack_entries = spec["evaluation"]["attacks"]
    first = attack_entries[0]
    attack = registry.load("attack", first["name"])(eps=to_unit(first["eps"]), **first["options"])
    eval_split = Split(data.test.images[:eval_batch_size], data.test.labels[:eval_batch_size])
    model = harness_variant.model
    m = len(eval_split)

    def eval_once():
        with performance.evaluation():  # as harness.runner evaluates: on CUDA without TF32 unless eval_tf32
            clean_pass(model, eval_split, data, m, device)
            adversarial_correct(model, attack, first["label"], eval_split, torch.ones(m, dtype=torch.bool), data, m,
                                device)

    eval_times = []
    for round_ in range(warmup + repeats):
        _sync(device)
        started = time.perf_counter()
        eval_once()
        _sync(device)
        if round_ >= warmup:
            eval_times.append(time.perf_counter() - started)
    eval_flops = _flops(eval_once) / m

    peak = peak_tflops(device, performance)
    train = _median_rate(harness_variant.times, n)
    evaluation = _median_rate(eval_times, m)
    result = {
        "id": cell.id, "model": cell.model["label"], "defense": defense_entry["name"], "strength": cell.strength,
        "batch_size": n, "eval_batch_size": m, "eval_attack": first["label"], "performance": performance.describe(),
        "train": dict(train, flops_per_image=train_flops,
                      peak_fraction=None if peak is None else train_flops * train["images_per_s"] / (peak * 1e12)),
        "eval": dict(evaluation, flops_per_image=eval_flops,
                     peak_fraction=None if peak is None else eval_flops * evaluation["images_per_s"] / (peak * 1e12)),
        "baselines": None,
    }
    if baselines:
        by_name = {v.name: _median_rate(v.times, n) for v in variants}
        t = {k: r["seconds_per_step"] for k, r in by_name.items()}
        fastest = {k: r["min_seconds_per_step"] for k, r in by_name.items()}
        same = "plain_same" if "plain_same" in by_name else "plain"
        result["baselines"] = dict(
            {k: r for k, r in by_name.items() if k != "harness"},  # the harness's own rate is result["train"]
            vs_plain=t["plain"] / t["harness"], vs_plain_same=t[same] / t["harness"], vs_hand=t["hand"] / t["harness"],
            # from the fastest round of each: on a shared machine, load only ever adds time
            vs_plain_min=fastest["plain"] / fastest["harness"], vs_plain_same_min=fastest[same] / fastest["harness"],
            vs_hand_min=fastest["hand"] / fastest["harness"],
        )
    return result


def bench(spec: dict, console: Console, *, cell_ids: list[str] | None = None, batch_size: int | None = None,
          eval_batch_size: int | None = None, warmup: int = 1, repeats: int = 3) -> dict:
    """Benchmark the selected cells of a validated spec; return the JSON document."""
    cells = select(plan(spec), cell_ids)
    device = pick_device(spec["device"])
    performance = Performance.from_spec(spec.get("performance"), device)
    performance.apply_global()
    data = load_data(spec)
    require_train_split(data, spec, "bench")  # the bench times training steps
    data = performance.prepare_data(data)
    bs = batch_size or spec["training"]["batch_size"]
    ebs = eval_batch_size or spec["evaluation"]["batch_size"]
    results = []
    for cell in cells:
        console.print(f"bench {cell.id} ...", highlight=False)
        results.append(bench_cell(cell, spec, data, device, performance, bs, ebs, warmup, repeats))
    return {
        "harness_version": harness.__version__,
        "spec_name": spec["name"],
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "cpu": threads.describe(),  # the CPU model and how the thread count was chosen (harness.threads)
        "torch": torch.__version__,
        "performance": performance.describe(),
        "peak_tflops": peak_tflops(device, performance),
        "timing": {"warmup": warmup, "repeats": repeats, "statistic": "median seconds per step, variants interleaved"},
        "cells": results,
    }


def _fmt(value: float | None, fmt: str) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value)


def render(doc: dict, console: Console) -> None:
    batch = "/".join(sorted({f"{c['batch_size']} train, {c['eval_batch_size']} eval" for c in doc["cells"]}))
    table = Table(title=f"harness bench {doc['spec_name']} on {doc['device_name']} "
                        f"({doc['performance']['precision']}, {doc['threads']} threads, batch {batch})",
                  title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)  # no vertical rules: fits 80 columns
    for col in ("cell", "train/s", "GFLOP", "%peak", "eval/s", "xplain", "xsame", "xhand"):
        table.add_column(col, justify="left" if col == "cell" else "right", no_wrap=True)
    for c in doc["cells"]:
        b = c["baselines"] or {}
        table.add_row(
            c["id"], _fmt(c["train"]["images_per_s"], "{:.0f}"),
            _fmt(c["train"]["flops_per_image"] / 1e9, "{:.3g}"),
            _fmt(None if c["train"]["peak_fraction"] is None else 100 * c["train"]["peak_fraction"], "{:.1f}"),
            _fmt(c["eval"]["images_per_s"], "{:.0f}"),
            _fmt(b.get("vs_plain"), "{:.2f}x"), _fmt(b.get("vs_plain_same"), "{:.2f}x"), _fmt(b.get("vs_hand"), "{:.2f}x"),
        )
    console.print(table)
    console.print("train/s, eval/s: images per second of the training step and of evaluation; GFLOP and %peak: "
                  "per training image, and of the device's peak (GPUs in the peak table). xplain: time of advertorch's "
                  "LinfPGDAttack called plainly (fp32, NCHW, train mode, trainable parameters); xsame: that call under "
                  "the harness's precision and layout; xhand: a hand-written PGD loop under them; each divided by the "
                  "harness's step (same run, interleaved): > 1 means the harness is faster.", highlight=False)


def write(doc: dict, path: Path) -> None:
    write_json_atomic(path, doc)
