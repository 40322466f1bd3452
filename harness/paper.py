"""The paper's published numbers (Tables 1-2, appendix A.5), shipped as harness/reference/paper_tables.json, and
their comparison with a measured cell.

A spec's model entry names the block it reproduces (`"paper_block": "cifar100_vgg19"`); each cell of that model
whose strength the block has then carries `paper`: the published Acc., GE and PGD and `diff` = ours - paper.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources


@lru_cache(maxsize=1)
def tables() -> dict:
    return json.loads(resources.files("harness").joinpath("reference", "paper_tables.json").read_text())


def block_ids() -> list[str]:
    return list(tables()["blocks"])


METRICS = {"acc": "clean_acc", "ge": "ge", "pgd": "pgd_acc"}  # paper column -> our metric


def reference(block: str, strength: float) -> dict | None:
    """The published values of one cell, or None when the block has no column for this strength."""
    entry = tables()["blocks"][block]
    for i, s in enumerate(entry["strengths"]):
        if abs(float(s) - float(strength)) < 1e-9:
            return {"block": block, "table": entry["table"], "model": entry["model"],
                    **{key: entry[key][i] for key in METRICS}}
    return None


def compare(block: str, strength: float, metrics: dict) -> dict | None:
    """The cell's `paper` entry: published values plus `diff` (ours - paper) for each of Acc., GE, PGD."""
    ref = reference(block, strength)
    if ref is None:
        return None
    ref["diff"] = {key: (None if metrics.get(ours) is None else metrics[ours] - ref[key])
                   for key, ours in METRICS.items()}
    return ref
