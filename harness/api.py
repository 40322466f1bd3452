"""The Python API, for notebooks and scripts: what `harness run`, `harness eval` and `harness validate` do.

    import harness

    report = harness.run("specs/digits_lenet.json", out="reports/mine", overrides={"training.epochs": 4})
    report = harness.evaluate(model, "digits", attacks=["advertorch-pgd", "autoattack"], eps=8, n_examples=100)
    spec = harness.validate("specs/digits_lenet.json", overrides=["defense.strengths=[0,8]"])

Each returns a document (the report of `report.json`, or the resolved spec) and raises the harness's exceptions
(harness.errors): `BadInput` for wrong input (its `message` names the JSON path, its `fix` the remedy),
`RunFailure` when running fails, `harness.interrupt.Interrupted` when SIGINT/SIGTERM stopped a run after a
checkpoint. Nothing here calls sys.exit. The CLI is a thin layer over these functions: `harness run` calls
`prepare_run` and `execute_run`, `harness eval` `prepare_evaluation` and `execute_evaluation`, each through the
same spec reading and validation (harness.spec), the same runner (harness.runner) and the same evaluation of
weights (harness.weights).

Overrides are what the CLI's `--set PATH=VALUE` gives: a list of "PATH=VALUE" strings (VALUE parsed as JSON,
else a string) or a mapping {PATH: value} (the value as it is), applied to the spec before it is validated
(harness.spec.apply_overrides); the report records them under "overrides". This module imports nothing heavy
until a function is called, so `import harness` stays fast.
"""

from __future__ import annotations

import json
import re
import warnings
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Union

from harness.errors import BadInput, RunFailure

if TYPE_CHECKING:  # pragma: no cover
    from rich.console import Console
    from torch import nn

Overrides = Union[Iterable[str], Mapping[str, Any], None]
SpecSource = Union[str, PathLike, dict]


# ----------------------------------------------------------------------------------------- shared parts


def overrides_list(overrides: Overrides, download: bool = False) -> list[str]:
    """Overrides as the CLI's "PATH=VALUE" strings (a mapping's values written as JSON); `download` adds
    `dataset.download=true` (the CLI's --download)."""
    if overrides is None:
        items: list[str] = []
    elif isinstance(overrides, Mapping):
        items = []
        for path, value in overrides.items():
            try:
                items.append(f"{path}={json.dumps(value)}")
            except (TypeError, ValueError) as exc:
                raise BadInput(f"override {path!r}: {type(value).__name__} {value!r} is not a JSON value",
                               fix="give numbers, strings, booleans, None, lists or dicts") from exc
    elif isinstance(overrides, str):
        items = [overrides]  # one "PATH=VALUE"
    else:
        items = [str(o) for o in overrides]
    return items + (["dataset.download=true"] if download else [])


def _source(spec: Any) -> str | Path | dict:
    if isinstance(spec, dict):
        return spec
    if isinstance(spec, (str, PathLike)):
        return Path(spec)
    raise BadInput(f"a spec is the path of a JSON file or a dict, not {type(spec).__name__}",
                   fix="pass harness.run('specs/digits_lenet.json') or harness.run({...the spec...})")


def _seed(seed: Any) -> int | None:
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise BadInput(f"seed must be an integer >= 0, not {seed!r}", fix="pass seed=0, 1, 2, ...")
    return seed


def _console(console: "Console | None", quiet: bool) -> "Console":
    from rich.console import Console

    return console if console is not None else Console(quiet=quiet)


def validate(spec: SpecSource, *, overrides: Overrides = None, download: bool = False) -> dict:
    """Check a spec (a JSON file's path, or a dict) as `harness validate` does: its JSON, the schema, plugin names,
    plugin options and the plan of cells; return it resolved (defaults filled, labels given).

    Raises BadInput listing every problem with its JSON path (`$.training.lr: 'x' is not of type 'number'`)."""
    from harness import spec as spec_mod
    from harness.runner import plan

    resolved = spec_mod.load(_source(spec), overrides_list(overrides, download))
    plan(resolved)  # two cells with one id are refused here, as `harness validate` does
    return resolved


# ------------------------------------------------------------------------------------------------ run


def default_out(spec: dict, seed: int | None, smoke: bool) -> Path:
    """`harness run`'s (and `harness submit`'s) output folder when none is given: reports/<name>[-seedN][-smoke]/."""
    from harness.paths import inside

    name = spec["name"] + (f"-seed{seed}" if seed is not None else "") + ("-smoke" if smoke else "")
    return inside(Path("reports"), name, where="$.name")


def prepare_run(spec: SpecSource, out: str | PathLike | None = None, *, overrides: Overrides = None,
                download: bool = False, smoke: bool = False, data_root: str | PathLike | None = None,
                seed: int | None = None) -> tuple[dict, Path, list[str]]:
    """The spec as `harness run` runs it (read, overridden, validated, with --data-root and --seed applied), the
    output folder, and the overrides applied (for the report)."""
    from harness import spec as spec_mod

    applied = overrides_list(overrides, download)
    resolved = spec_mod.load(_source(spec), applied)
    if data_root is not None:
        resolved["dataset"]["root"] = str(data_root)
    seed = _seed(seed)
    if seed is not None:
        resolved["seed"] = seed
    out_dir = Path(out) if out is not None else default_out(resolved, seed, smoke)
    return resolved, out_dir, applied


def execute_run(spec: dict, out_dir: Path, console: "Console", *, smoke: bool = False,
                cells: str | Iterable[str] | None = None, fresh: bool = False, force: bool = False,
                overrides: list[str] | None = None, figures: bool = True,
                keep_checkpoints: bool = False, formats: Iterable[str] = ("png",),
                log: Mapping[str, Any] | Iterable[tuple[str, Any]] | None = None) -> tuple[dict | None, list[Path]]:
    """Run a spec from prepare_run with harness.runner.run; return the report (None on torchrun ranks but 0) and
    the figures drawn beside it (while report.json is locked, from the report just written). `keep_checkpoints`:
    a smoke run keeps its cells' checkpoints (harness.runner.run). `formats`: the figures' file formats
    (harness.figures.FORMATS). `log`: experiment tracking, {"tensorboard": DIR} or the CLI's (kind, DIR) pairs
    (harness.tracking; the library's presence is checked here, before anything trains)."""
    from harness import tracking
    from harness.runner import run as run_spec

    tracker = tracking.create(log)

    cell_ids = [cells] if isinstance(cells, str) else list(cells or [])
    drawn: list[Path] = []

    def draw(written: dict) -> None:
        from harness.figures import write_figures

        drawn.extend(write_figures(written, out_dir, formats=tuple(formats)))

    report = run_spec(spec, out_dir, console, smoke=smoke, cell_ids=cell_ids, fresh=fresh, force=force,
                      overrides=overrides or None, on_report=draw if figures else None,
                      keep_checkpoints=keep_checkpoints, tracker=tracker)
    return report, drawn


def failed_cells(report: dict) -> list[str]:
    return [c["id"] for c in report["cells"] if c["status"] != "done"]


def run(spec: SpecSource, out: str | PathLike | None = None, *, overrides: Overrides = None, download: bool = False,
        smoke: bool = False, data_root: str | PathLike | None = None, seed: int | None = None,
        cells: str | Iterable[str] | None = None, fresh: bool = False, force: bool = False, figures: bool = True,
        log: Mapping[str, Any] | None = None, console: "Console | None" = None, quiet: bool = False) -> dict | None:
    """Train and evaluate every cell of a spec, as `harness run SPEC` does; return the report document.

    spec: the path of a JSON spec, or the spec as a dict (validated exactly as a file is).
    out: the output folder (default reports/<spec name>/, as the CLI's). Finished cells there are kept and
        interrupted ones resume, as with the CLI; `fresh=True` starts over, `force=True` resumes despite
        training-relevant changes.
    overrides: ["training.lr=0.05", "defense.strengths=[0,8]"] or {"training.lr": 0.05}, applied before
        validation (the CLI's --set); `download=True` lets the dataset plugin download missing data.
    smoke, data_root, seed, cells: the CLI's --smoke, --data-root, --seed and --cell.
    figures: draw Figures 2-4 beside report.json (the CLI always does).
    log: experiment tracking, the CLI's --log: {"tensorboard": "runs/"} writes TensorBoard scalars per epoch and
        per cell under runs/<spec name>-seed<N>/<cell id>/ (needs `pip install 'harness[tensorboard]'`).
    console: a rich Console for the progress and messages (default: a new one; `quiet=True` silences it).

    Returns the report (as written to OUT/report.json), or None in a torchrun process other than rank 0.
    Raises BadInput (a wrong spec or option), RunFailure (a cell failed: its `report` attribute holds the report,
    written all the same) or harness.interrupt.Interrupted (SIGINT/SIGTERM; the same call resumes)."""
    resolved, out_dir, applied = prepare_run(spec, out, overrides=overrides, download=download, smoke=smoke,
                                             data_root=data_root, seed=seed)
    report, _ = execute_run(resolved, out_dir, _console(console, quiet), smoke=smoke, cells=cells, fresh=fresh,
                            force=force, overrides=applied, figures=figures, log=log)
    if report is not None and failed_cells(report):
        failure = RunFailure(f"{len(failed_cells(report))} cell(s) failed: {', '.join(failed_cells(report))}",
                             fix=f"see each cell's error in {out_dir / 'report.json'} (the exception's .report)")
        failure.report = report
        raise failure
    return report


# ------------------------------------------------------------------------------------------- evaluate


def _is_module(model: Any) -> bool:
    from torch import nn

    return isinstance(model, nn.Module)


def _looks_like_path(value: str | PathLike) -> bool:
    text = str(value)
    return isinstance(value, PathLike) or text.endswith(".json") or "/" in text or "\\" in text or Path(text).is_file()


def prepare_evaluation(model: "nn.Module | str | PathLike", data_or_spec: SpecSource, *,
                       attacks: Iterable | None = None,
                       eps: float | None = None, n_examples: int | None = None, batch_size: int | None = None,
                       checks: dict | bool | None = None, device: str | None = None, seed: int | None = None,
                       overrides: Overrides = None, download: bool = False,
                       data_root: str | PathLike | None = None) -> tuple[dict, list[str]]:
    """The evaluation spec as `harness eval` reads it (harness.weights.read_spec), with the keyword arguments as
    overrides before the user's; returns it resolved and the overrides applied (for the report)."""
    from harness import weights

    in_memory = _is_module(model)
    if not in_memory and not isinstance(model, (str, PathLike)):
        raise BadInput(f"model must be a torch nn.Module or the path of a saved state_dict, not {type(model).__name__}",
                       fix="pass the module itself, or the file written by torch.save(model.state_dict(), path)")
    if isinstance(data_or_spec, (str, PathLike)) and not _looks_like_path(data_or_spec):
        if not in_memory:
            raise BadInput(f"evaluating the weights file {model} needs a spec naming its model plugin, not only the "
                           f"dataset {data_or_spec!r}", fix="pass a spec (path or dict) with `models` and "
                           "`evaluation`, or the nn.Module itself")
        name = str(data_or_spec)
        raw: Any = {"name": re.sub(r"[^A-Za-z0-9_.-]", "-", f"eval-{name}")[:64], "dataset": {"name": name},
                    "evaluation": {"attacks": []}}
        if attacks is None:
            raise BadInput(f"evaluating on the dataset {name!r} needs attacks=[...]",
                           fix="e.g. attacks=['advertorch-pgd', 'autoattack'], eps=8 (0-255 scale)")
    else:
        source = _source(data_or_spec)
        from harness import spec as spec_mod

        raw = source if isinstance(source, dict) else spec_mod.read_json(source, "spec")
    if eps is not None and not isinstance(eps, bool) and isinstance(eps, (int, float)) and 0 < eps < 1:
        warnings.warn(f"eps={eps} is on the 0-255 scale, i.e. {eps}/255; for 8/255 pass eps=8", stacklevel=3)
    given: dict[str, Any] = {}
    if attacks is not None:
        entries = []
        for i, attack in enumerate([attacks] if isinstance(attacks, (str, dict)) else list(attacks)):
            entry = {"name": attack} if isinstance(attack, str) else dict(attack) if isinstance(attack, dict) else None
            if entry is None:
                raise BadInput(f"attacks[{i}]: {attack!r} is neither an attack name nor a dict",
                               fix="e.g. attacks=['advertorch-pgd', {'name': 'autoattack', 'eps': 8}]")
            if "eps" not in entry:
                if eps is None:
                    raise BadInput(f"attacks[{i}] ({entry.get('name')!r}) has no eps",
                                   fix="pass eps= on the 0-255 scale (eps=8 is 8/255), or give the entry an 'eps'")
                entry["eps"] = eps
            entries.append(entry)
        given["evaluation.attacks"] = entries
    elif eps is not None:  # the spec's attacks at this eps
        listed = ((raw.get("evaluation") or {}).get("attacks") if isinstance(raw, dict) else None) or []
        count = len(listed) if isinstance(listed, list) else 0
        given.update({f"evaluation.attacks.{i}.eps": eps for i in range(count)})
    if n_examples is not None:  # as RobustBench's n_examples: the first N test samples, not a random subset
        given.update({"dataset.max_test": n_examples, "dataset.test_subset": "first"})
    for path, value in (("evaluation.batch_size", batch_size), ("device", device)):
        if value is not None:
            given[path] = value
    if checks is not None:
        given["evaluation.checks"] = {"enabled": checks} if isinstance(checks, bool) else checks
    applied = overrides_list(given) + overrides_list(overrides, download)
    spec = weights.read_spec(raw, applied, models=not in_memory)
    if data_root is not None:
        spec["dataset"]["root"] = str(data_root)
    seed = _seed(seed)
    if seed is not None:
        spec["seed"] = seed
    return spec, applied


def _module_record(model: "nn.Module", label: str) -> dict:
    """What the report says about an in-memory model: its class, size and a digest of its state_dict."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        digest.update(key.encode())
        flat = value.detach().cpu().contiguous().reshape(-1)
        digest.update(str(value.dtype).encode() + str(tuple(value.shape)).encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    cls = type(model)
    return {"class": f"{cls.__module__}.{cls.__qualname__}", "label": label,
            "parameters": sum(p.numel() for p in model.parameters()), "state_dict_sha256": digest.hexdigest()}


def _probe(model: "nn.Module", data, device) -> None:
    """One forward pass on two test images: a model that does not take the dataset's images or does not return
    one logit per class is BadInput here rather than a traceback inside an attack."""
    import torch

    from harness.data import batches

    x, _ = next(batches(data.test, 2, device, transform=data.eval_transform))
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as exc:  # any error of the caller's module on this input
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise BadInput(f"the model fails on the dataset's images (a batch of shape {tuple(x.shape)} in [0, 1]): "
                       f"{type(exc).__name__}: {first}",
                       fix="evaluate a model built for this dataset's input shape, taking images in [0, 1] "
                           "(normalization inside the model)") from exc
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (x.shape[0], data.num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise BadInput(f"the model returns {shape} for {x.shape[0]} images; expected logits of shape "
                       f"({x.shape[0]}, {data.num_classes}) ({data.num_classes} classes)",
                       fix="return one logit per class (a tensor, not a tuple or dict)")


def execute_evaluation(model: "nn.Module | str | PathLike", spec: dict, out_dir: Path | None, console: "Console", *,
                       model_label: str | None = None, label: str | None = None,
                       overrides: list[str] | None = None) -> dict:
    """Evaluate weights (a state_dict file: harness.weights.evaluate_checkpoint, the `harness eval` path) or an
    in-memory module (harness.weights.evaluate_model, the same evaluation and report); return the report."""
    from harness import weights
    from harness.runner import load_data, pick_device, seed_everything
    from harness.spec import default_label

    if not _is_module(model):
        return weights.evaluate_checkpoint(spec, Path(model), out_dir, console, model_label, overrides=overrides)
    label = default_label({"name": label or type(model).__name__})
    cls = type(model)
    name = f"{cls.__module__}.{cls.__qualname__}"
    # the report's spec names the model it holds: the module's class under its label (no plugin builds it)
    spec = {**spec, "models": [{"name": name, "label": label, "options": {}}]}
    device = pick_device(spec["device"])
    data = load_data(spec)
    params = list(model.parameters()) + list(model.buffers())
    home, was_training = (params[0].device if params else None), model.training
    try:
        model.to(device).eval()
        _probe(model, data, device)
        seed_everything(spec["seed"])
        return weights.evaluate_model(spec, model, data, device, out_dir, console, label=label, model_name=name,
                                      source=f"the in-memory {cls.__name__}", overrides=overrides,
                                      record={"module": _module_record(model, label)}, cell_suffix="module")
    finally:  # the caller's module as it was: its mode and device
        model.train(was_training)
        if home is not None and home != device:
            model.to(home)


def evaluate(model: "nn.Module | str | PathLike", data_or_spec: SpecSource, attacks: Iterable | None = None,
             eps: float | None = None, *, n_examples: int | None = None, batch_size: int | None = None,
             checks: dict | bool | None = None, device: str | None = None, seed: int | None = None,
             label: str | None = None, model_label: str | None = None, out: str | PathLike | None = None,
             overrides: Overrides = None, download: bool = False, data_root: str | PathLike | None = None,
             console: "Console | None" = None, quiet: bool = False) -> dict:
    """Evaluate a model with the harness's attacks, checks and report, without training (RobustBench's
    `benchmark()` use): `harness.evaluate(model, "digits", attacks=["advertorch-pgd", "autoattack"], eps=8)`.

    model: an nn.Module taking images in [0, 1] (normalization inside) and returning logits; or the path of a
        state_dict file, built by the spec's model plugin (`harness eval SPEC --weights FILE`; `model_label`
        picks the spec's model, default the first).
    data_or_spec: a dataset plugin's name ("digits", "cifar10"), or a spec (path or dict) naming the dataset and
        the evaluation, as `harness eval` reads it (`training` and `defense` may be absent; for a module, its
        `models` are ignored).
    attacks: attack plugin names or spec entries ({"name": ..., "eps": ..., "options": {...}}), replacing the
        spec's; eps: their radius on the 0-255 scale (eps=8 is 8/255; without attacks, every spec attack's eps).
    n_examples: evaluate the first N test samples, as RobustBench does (dataset.max_test with test_subset
        "first"); batch_size, device ("auto", "cpu", "cuda"), seed: the spec's; checks: False to skip the
        sanity checks, or the spec's `evaluation.checks` object.
    label: the model's name in the report (default: its class name). out: write OUT/report.json too (default:
        nothing written). overrides, download, data_root, console, quiet: as for run().

    The keyword arguments become overrides of the spec ("evaluation.attacks=[...]", "dataset.max_test=100"),
    validated and recorded in the report like the CLI's --set. A module is evaluated in eval mode on the
    spec's device, then put back in its mode and on its device. Returns the report document: the cell's
    `metrics` hold `clean_acc` and, per attack label, `attacks[label]["acc"]` (percentages). Raises BadInput
    for a wrong spec, option, dataset or a model that does not fit the data."""
    spec, applied = prepare_evaluation(model, data_or_spec, attacks=attacks, eps=eps, n_examples=n_examples,
                                       batch_size=batch_size, checks=checks, device=device, seed=seed,
                                       overrides=overrides, download=download, data_root=data_root)
    return execute_evaluation(model, spec, Path(out) if out is not None else None, _console(console, quiet),
                              model_label=model_label, label=label, overrides=applied)
