"""Evaluate existing weights (RobustBench's use case): `harness eval SPEC --weights FILE`.

The spec names the dataset, the model plugin and the evaluation (attacks, checks) as for `harness run`; its
`training` and `defense` parts may be left out. The weights are read with `torch.load(weights_only=True)` (no
code from the file is executed) into the model the plugin builds, and evaluated with the same attacks, checks
and report as a trained cell. A checkpoint that does not fit the model is BadInput (exit 2) naming the missing
and unexpected keys and the shape mismatches.
"""

from __future__ import annotations

import copy
import hashlib
import time
from pathlib import Path
from typing import Iterable

import torch
from rich.console import Console
from rich.markup import escape as rich_escape
from torch import nn

from harness import registry
from harness import spec as spec_mod
from harness.errors import BadInput
from harness.paths import require_regular
from harness.evaluate import evaluate
from harness.performance import Performance
from harness.report import validate_report, write_json_atomic
from harness.runner import (build_attacks, build_model, environment, load_data, pick_device, report_document,
                            seed_everything)

STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net")
SHOWN = 8


def read_spec(source: str | Path | dict, overrides: Iterable[str] = (), *, models: bool = True) -> dict:
    """A spec for evaluation only (a path, or a parsed dict): `defense` and `training` may be absent; `--set`
    overrides are applied first. `models=False` (an in-memory model is evaluated): the spec's `models` are
    ignored and may be absent."""
    raw = copy.deepcopy(source) if isinstance(source, dict) else spec_mod.read_json(source, "spec")
    raw = spec_mod.apply_overrides(raw, overrides)
    if isinstance(raw, dict) and not models:
        raw.pop("models", None)
    # `defense` and `training` stay null when absent: the report says weights were evaluated, nothing trained
    return spec_mod.validate_overridden(raw, overrides, models=models, evaluation_only=True)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.exists():
        raise BadInput(f"checkpoint not found: {path}", fix="give the path of a file saved with torch.save")
    require_regular(path, "checkpoint", fix="give the path of a file saved with torch.save")  # not a FIFO, /dev/zero
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError... for files it cannot read
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadInput(f"cannot load checkpoint {path} with torch.load(weights_only=True): {first}",
                       fix="save the model's state_dict (torch.save(model.state_dict(), path)); pickled code "
                           "objects are refused on purpose") from exc
    if isinstance(obj, dict):
        for key in STATE_DICT_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise BadInput(f"checkpoint {path} holds no state_dict (a mapping of names to tensors)",
                       fix=f"save model.state_dict(), alone or under one of the keys {', '.join(STATE_DICT_KEYS)}")
    if all(k.startswith("module.") for k in obj):  # saved from nn.DataParallel / DistributedDataParallel
        obj = {k[len("module."):]: v for k, v in obj.items()}
    bad = {k: int((~torch.isfinite(v)).sum()) for k, v in obj.items()
           if (v.is_floating_point() or v.is_complex()) and not bool(torch.isfinite(v).all())}
    if bad:  # NaN weights give NaN logits: every metric would be meaningless (and NaN is not JSON)
        raise BadInput(f"checkpoint {path} holds non-finite values (NaN or infinity) in {len(bad)} tensor"
                       f"{'s' if len(bad) > 1 else ''}: " + _listing([f"{k} ({n})" for k, n in bad.items()]),
                       fix="evaluate weights of a model whose training did not diverge (an earlier checkpoint)")
    return obj


def _listing(keys: list[str]) -> str:
    return ", ".join(keys[:SHOWN]) + (f" and {len(keys) - SHOWN} more" if len(keys) > SHOWN else "")


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Load `state` into `model` strictly; any mismatch is BadInput naming the keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches ({len(shapes)}): {_listing(shapes)}")
    if problems:
        raise BadInput(f"checkpoint {where} does not fit the model:\n  " + "\n  ".join(problems),
                       fix="evaluate it with the model plugin and options it was trained with (for lenet, "
                           "spectral_norm must match), on a dataset with the same input shape and classes")
    model.load_state_dict(state, strict=True)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def pick_model(spec: dict, model_label: str | None) -> dict:
    """The spec's model entry labelled `model_label` (default: the first)."""
    models = {m["label"]: m for m in spec["models"]}
    if model_label is None:
        return spec["models"][0]
    if model_label in models:
        return models[model_label]
    raise BadInput(f"the spec has no model labelled {model_label!r}", fix=f"choose one of: {', '.join(models)}")


def evaluate_checkpoint(spec: dict, weights: Path, out_dir: Path | None, console: Console,
                        model_label: str | None = None, *, overrides: list[str] | None = None) -> dict:
    """Build the spec's model, load the weights, evaluate; write out_dir/report.json and return the report."""
    entry = pick_model(spec, model_label)
    state = read_state_dict(weights)
    device = pick_device(spec["device"])
    data = load_data(spec)
    seed_everything(spec["seed"])
    model = build_model(entry, data.num_classes, data.input_shape)
    load_weights(model, state, str(weights))
    return evaluate_model(spec, model, data, device, out_dir, console, label=entry["label"], model_name=entry["name"],
                          source=str(weights), overrides=overrides,
                          record={"checkpoint": {"path": str(weights), "sha256": file_sha256(Path(weights)),
                                                 "model": entry["label"]}})


def evaluate_model(spec: dict, model: nn.Module, data, device: torch.device, out_dir: Path | None, console: Console,
                   *, label: str, model_name: str, source: str, record: dict, overrides: list[str] | None = None,
                   cell_suffix: str = "checkpoint") -> dict:
    """Evaluate a built model (loaded weights, or a caller's in-memory module) with the spec's attacks and checks,
    as a trained cell is; return the report (`record`: its top-level fields saying what was evaluated), written
    to out_dir/report.json unless out_dir is None."""
    model.to(device).eval()
    attacks = build_attacks(spec)
    console.print(f"[bold]{rich_escape(spec['name'])}[/bold]: evaluating {rich_escape(source)} as "
                  f"{rich_escape(label)} on {device}; {len(data.test)} test samples")
    started = time.perf_counter()
    with Performance.from_spec(spec.get("performance"), device).evaluation():  # on CUDA: TF32 only if eval_tf32
        metrics = evaluate_resumable(spec, model, data, attacks, device, console, label=label, out_dir=out_dir,
                                     weights_sha256=(record.get("checkpoint") or {}).get("sha256"))
    cell = {"id": f"{label}__{cell_suffix}", "model": label, "model_name": model_name,
            "defense": cell_suffix, "strength": 0, "status": "done", "seconds": time.perf_counter() - started,
            "parameters": sum(p.numel() for p in model.parameters()), "history": [], "metrics": metrics}
    report = report_document(spec, data, environment(device), [cell], smoke=False, **record,
                             **({"overrides": list(overrides)} if overrides else {}))
    validate_report(report)
    if out_dir is not None:
        write_json_atomic(out_dir / "report.json", report)
    return report


# --------------------------------------------------------------------------------------- stopping and resuming
# `harness eval` of a large model can run for hours: SIGINT/SIGTERM stop it within one batch, after writing what
# is done (the clean pass and each finished attack, with its per-sample outcomes) to OUT/eval-progress.json; the
# same command then takes the finished attacks from that file instead of running them again.

PROGRESS_FILE = "eval-progress.json"
PROGRESS_KIND = "harness eval progress"


def progress_key(spec: dict, label: str, weights_sha256: str, test_size: int) -> str:
    """What an eval-progress file must match to be resumed from: the spec (all but its name, description and
    performance), the model label, the weights' content and the test split's size."""
    from harness.checkpoint import fingerprint

    core = {k: v for k, v in spec.items() if k not in ("name", "description", "performance")}
    return fingerprint({"spec": core, "model": label, "weights": weights_sha256, "test_size": test_size})


def read_progress(path: Path, key: str, test_size: int, labels: list[str], console: Console) -> tuple[dict, dict]:
    """The finished attacks of an earlier, interrupted evaluation: ({label: (robust, entry)}, metrics so far), or
    empty when there is no usable file (one of another evaluation is ignored, and said so)."""
    import json

    if not path.exists():
        return {}, {}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        assert isinstance(doc, dict) and doc.get("kind") == PROGRESS_KIND
        usable = doc["key"] == key
        finished = {}
        for name, bits in doc["robust"].items():
            assert isinstance(bits, str) and len(bits) == test_size and set(bits) <= {"0", "1"}
            if name in labels:
                finished[name] = (torch.tensor([b == "1" for b in bits], dtype=torch.bool),
                                  doc["metrics"]["attacks"][name])
        metrics = doc["metrics"]
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        console.print(f"ignoring {path}: not a readable eval progress file; evaluating from the start",
                      style="yellow", markup=False, highlight=False, soft_wrap=True)
        return {}, {}
    if not usable:
        console.print(f"ignoring {path}: it is the progress of another evaluation (the spec, the model or the "
                      "weights differ); evaluating from the start", style="yellow", markup=False, highlight=False,
                      soft_wrap=True)
        return {}, {}
    if finished:
        console.print(f"resuming the evaluation: {', '.join(finished)} finished earlier ({path}), not run again",
                      markup=False, highlight=False, soft_wrap=True)
    return finished, metrics


def evaluate_resumable(spec: dict, model: nn.Module, data, attacks: list, device: torch.device, console: Console, *,
                       label: str, out_dir: Path | None, weights_sha256: str | None) -> dict:
    """harness.evaluate.evaluate with progress (harness.progress), stop requests polled after every batch and, when
    there is an output folder and weights to identify, the finished attacks kept in OUT/eval-progress.json so that
    an interrupted evaluation resumes. The file is removed once the evaluation is complete."""
    from harness import checks as checks_mod
    from harness.evaluate import batch_count
    from harness.interrupt import InterruptGuard
    from harness.progress import Phases, batch_hook

    bs = spec["evaluation"]["batch_size"]
    path = out_dir / PROGRESS_FILE if out_dir is not None and weights_sha256 is not None else None
    key = progress_key(spec, label, weights_sha256, len(data.test)) if path is not None else None
    finished, so_far = (read_progress(path, key, len(data.test), [e["label"] for e, _ in attacks], console)
                        if path is not None else ({}, {}))
    robust_bits = {name: "".join("1" if v else "0" for v in robust.tolist()) for name, (robust, _) in finished.items()}

    def record(name: str, robust: torch.Tensor, metrics: dict) -> None:
        so_far.clear()
        so_far.update(metrics)
        if path is None:
            return
        robust_bits[name] = "".join("1" if v else "0" for v in robust.tolist())
        write_json_atomic(path, {"kind": PROGRESS_KIND, "key": key, "model": label, "metrics": metrics,
                                 "robust": dict(robust_bits)})

    def done_so_far() -> str:
        attacks_done = so_far.get("attacks") or {}
        if not attacks_done:
            return "no attack had finished"
        text = (f"done so far: clean accuracy {so_far['clean_acc']:.2f}%, "
                + ", ".join(f"{name} {entry['acc']:.2f}%" for name, entry in attacks_done.items()))
        return text + (f"; written to {path}" if path is not None else " (no output folder: not kept)")

    with Phases(console) as phases, InterruptGuard() as guard:
        def stopper(phase: str):
            def stop() -> None:
                if guard.requested():
                    raise guard.interrupted(f"the evaluation of {label} stopped while {phase}; {done_so_far()}")
            return stop

        evaluating = batch_hook(phases, label, "evaluating", batch_count(data, len(attacks) - len(finished), bs),
                                stopper("evaluating"))
        checking = batch_hook(phases, label, "running the sanity checks",
                              lambda: checks_mod.batch_count(attacks, spec["evaluation"].get("checks"),
                                                             len(data.test), bs),
                              stopper("running the sanity checks"))
        evaluating()
        metrics = evaluate(model, data, attacks, bs, device, on_batch=evaluating,
                           checks=spec["evaluation"].get("checks"), seed=spec["seed"], on_checks_batch=checking,
                           finished=finished, on_attack=record)
    if path is not None:
        path.unlink(missing_ok=True)
    return metrics
