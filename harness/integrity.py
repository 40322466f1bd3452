"""Content checksums of the files a run reads back (training checkpoints, cell results), and the one reader and
writer of cell result files (OUT/cells/<cell id>.json).

Each such file carries `checksum`: "sha256:<hex>" of its own content, written with it and verified whenever it is
read. What a reader does with a file (README, "Checkpoints, resuming, interruption"):

- **damaged**: the content does not match the checksum written with it (a flipped bit on disk or in memory, an
  edit by hand). BadInput (exit 2) naming the file and what to do: delete it (that cell is trained or evaluated
  again) or start over with --fresh. The harness does not guess which cells are still good.
- **unusable**: the file parses but is not a checkpoint or cell result of this harness (a list, a string, a field
  of the wrong type or missing). `Unusable`: the caller treats the file as missing (the cell is trained or
  evaluated again, which replaces it) and says so in the terminal.
- **without a checksum** but otherwise valid: written by a harness from before checksums; used as it is.

A checksum protects against damage, not against tampering: anyone can compute one.

A checkpoint's checksum covers its content, not its bytes on disk (the bytes are torch's zip container, which the
checksum cannot live inside): every tensor's dtype, shape and raw bytes and every other value, in sorted key order
(`state_checksum`). A cell file's checksum covers its canonical JSON (sorted keys, no spaces, `json_checksum`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from harness.errors import BadInput
from harness.paths import REPORT_MAX_BYTES, read_regular
from harness.report import cell_errors, strict_json, write_json_atomic

KEY = "checksum"
PREFIX = "sha256:"


class Unusable(BadInput):
    """A file that parses but is not a checkpoint or cell result of this harness: callers treat it as missing and
    say why (`reason`). Where none catches it, it is BadInput (exit 2) naming the file, never a traceback."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path} is not a file of this harness: {reason}",
                         fix=f"delete {path} (that cell is then trained or evaluated again) or run again with --fresh")
        self.reason = reason


# ------------------------------------------------------------------------------------- checksums


def json_checksum(document: Mapping) -> str:
    """sha256 of the canonical JSON of `document` without its own checksum."""
    canonical = json.dumps({k: v for k, v in document.items() if k != KEY}, sort_keys=True, separators=(",", ":"),
                           ensure_ascii=True, allow_nan=False)
    return PREFIX + hashlib.sha256(canonical.encode("ascii")).hexdigest()


def state_checksum(state: Mapping) -> str:
    """sha256 of a checkpoint's content without its own checksum: the same before torch.save and after
    torch.load (tuples and lists alike; tensors by dtype, shape and bytes, wherever they live)."""
    digest = hashlib.sha256()
    _feed(digest, {k: v for k, v in state.items() if k != KEY})
    return PREFIX + digest.hexdigest()


def _feed(digest, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        flat = value.detach().reshape(-1).contiguous().cpu()
        digest.update(f"T{flat.dtype}{tuple(value.shape)}:".encode())
        if flat.numel():
            digest.update(flat.view(torch.uint8).numpy())  # the raw bytes of any dtype (bf16 included)
    elif isinstance(value, Mapping):
        digest.update(b"{")
        for key in sorted(value, key=lambda k: (type(k).__name__, repr(k))):
            _feed(digest, key)
            _feed(digest, value[key])
        digest.update(b"}")
    elif isinstance(value, (list, tuple)):
        digest.update(b"[")
        for item in value:
            _feed(digest, item)
        digest.update(b"]")
    else:  # str, int, float (repr is exact), bool, None, bytes
        digest.update(f"{type(value).__name__}:{value!r};".encode())


class Damaged(BadInput):
    """A file whose content does not match the checksum written with it (exit 2: the run stops on it until it is
    deleted). A class of its own so that readers such as `harness status` can tell it from other bad input."""


def damaged(path: Path, what: str, redo: str, stored: Any, actual: str) -> Damaged:
    shown = stored if isinstance(stored, str) and len(stored) < 80 else type(stored).__name__
    return Damaged(f"{what} {path} is damaged: its content does not match the checksum written with it "
                   f"(stored {shown}, content {actual}); it was changed after it was written (a disk or memory "
                   "error, or an edit), so none of it is used",
                   fix=f"delete {path} (that cell is then {redo}) or run again with --fresh (every cell starts "
                       "over)")


def verify(document: Mapping, actual: str, path: Path, what: str, redo: str) -> None:
    """Raise `damaged` when `document` carries a checksum other than `actual`; a document without one passes."""
    if KEY in document and document[KEY] != actual:
        raise damaged(path, what, redo, document[KEY], actual)


# ------------------------------------------------------------------------------------- cell result files

CELL_REDO = "evaluated again from its checkpoint, or trained again without one"


def write_cell(path: Path, cell: dict) -> dict:
    """Write a cell result atomically with its checksum; return the document as written (and as it reads back:
    JSON's types, string keys)."""
    plain = json.loads(strict_json({k: v for k, v in cell.items() if k != KEY}, path))
    sealed = {**plain, KEY: json_checksum(plain)}
    write_json_atomic(path, sealed)
    return sealed


def read_cell(path: Path) -> dict | None:
    """The cell result at `path`, verified and validated against the report schema's cell definition; None when
    there is none. Raises BadInput when it is damaged (checksum), Unusable when it is not a cell result."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return None
    data = read_regular(path, "cell", REPORT_MAX_BYTES, fix=f"remove {path} (that cell is then {CELL_REDO})")
    try:
        cell = json.loads(data.decode("utf-8"), parse_constant=_no_constant)
    except ValueError as exc:  # not UTF-8, not JSON, NaN/Infinity
        raise Unusable(path, f"it is not JSON ({str(exc).splitlines()[0][:120]})") from exc
    if not isinstance(cell, dict):
        raise Unusable(path, f"it holds a JSON {type(cell).__name__}, not an object")
    verify(cell, json_checksum(cell), path, "cell result", CELL_REDO)
    errors = cell_errors(cell)
    if errors:
        raise Unusable(path, "it does not match the report schema's cell: " + "; ".join(errors[:3]))
    return cell


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")
