"""Smoke mode (`harness run SPEC --smoke`): the whole pipeline of a spec in seconds, never mistakable for a result.

`apply` caps a resolved spec with the spec's `smoke` settings (schema defaults: 64 training / 32 test samples,
batches of 32, 2 batches per epoch, one epoch, 2 iterations for the defense's and every attack's `steps` and for
the analysis's searches and power iterations, and
optionally a subset of the strengths) and lists every change. `stand_in` replaces a dataset that is not on disk
by synthetic data of the same shape and class count, which the dataset plugin provides through its optional
`stand_in(train_size, test_size, seed)` method. The report says `"smoke": true`, `data.stand_in`, and lists
`smoke_overrides`; the terminal says it too.
"""

from __future__ import annotations

import copy
from typing import Any

from harness.errors import BadInput, DatasetNotFound
from harness.plugin import DataSplits


def _cap(spec: dict, keys: list[Any], limit: int, changes: list[dict]) -> None:
    parent = spec
    for key in keys[:-1]:
        parent = parent[key]
    old = parent.get(keys[-1])
    new = limit if old is None else min(old, limit)
    if new != old:
        parent[keys[-1]] = new
        path = "$" + "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in keys)
        changes.append({"path": path, "from": old, "to": new})


def apply(spec: dict) -> tuple[dict, list[dict]]:
    """A copy of the resolved spec with the smoke caps applied, and the list of changes made."""
    spec = copy.deepcopy(spec)
    caps = spec["smoke"]
    changes: list[dict] = []
    _cap(spec, ["training", "epochs"], 1, changes)
    _cap(spec, ["training", "max_batches"], caps["max_batches"], changes)
    _cap(spec, ["training", "batch_size"], caps["batch_size"], changes)
    _cap(spec, ["evaluation", "batch_size"], caps["batch_size"], changes)
    _cap(spec, ["dataset", "max_train"], caps["max_train"], changes)
    _cap(spec, ["dataset", "max_test"], caps["max_test"], changes)
    sites = [["defense"]] + [["evaluation", "attacks", i] for i in range(len(spec["evaluation"]["attacks"]))]
    for site in sites:
        options = spec
        for key in site:
            options = options[key]
        if isinstance(options["options"].get("steps"), int):
            _cap(spec, site + ["options", "steps"], caps["steps"], changes)
    if "analysis" in spec:  # the analysis searches eps-balls and runs power iterations per layer: cap it alike
        _cap(spec, ["analysis", "max_train"], caps["max_train"], changes)
        _cap(spec, ["analysis", "steps"], caps["steps"], changes)
        _cap(spec, ["analysis", "power_iterations"], caps["steps"], changes)
    if caps.get("strengths") is not None:  # a subset of defense.strengths (harness.spec checks it)
        if list(caps["strengths"]) != list(spec["defense"]["strengths"]):
            changes.append({"path": "$.defense.strengths", "from": spec["defense"]["strengths"],
                            "to": list(caps["strengths"])})
            spec["defense"]["strengths"] = list(caps["strengths"])
    return spec, changes


def stand_in(plugin: Any, spec: dict, missing: DatasetNotFound) -> DataSplits:
    """Synthetic data in place of a missing dataset, from the plugin's `stand_in`; the reason goes into the notes."""
    make = getattr(plugin, "stand_in", None)
    if not callable(make):
        raise BadInput(f"{missing.message}\n(smoke mode found no stand-in: dataset {spec['dataset']['name']!r} "
                       "has no stand_in method)", fix=missing.fix)
    ds = spec["dataset"]
    data = make(train_size=ds["max_train"] or 64, test_size=ds["max_test"] or 32, seed=spec["seed"])
    data.stand_in = True
    data.notes.append(f"smoke run on STAND-IN data (synthetic), because: {missing.message.splitlines()[0]}")
    return data
