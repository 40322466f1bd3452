"""Paths built from strings in a spec (the run's name, model labels, cell ids), paths a spec names, and the one
way files are written (atomically).

The schema already restricts `name` and `label` to `[A-Za-z0-9][A-Za-z0-9_.+@-]*`, but the runner can be called
with a spec that never went through the CLI, so every path made from a spec string goes through `safe_component`
and `inside`: no separator, no `..`, no absolute path, no NUL can move a file outside its output folder.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

from harness.errors import BadInput

_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+@-]{0,127}")


def safe_component(value: object, where: str) -> str:
    """`value` as one file-name component, or BadInput naming `where` (a JSON path) when it is not one."""
    if not isinstance(value, str) or not _SAFE.fullmatch(value) or ".." in value:
        raise BadInput(f"{where}: {value!r} cannot name a file: use letters, digits and _ . + @ - only, starting "
                       "with a letter or digit, without '..' (no path separators, no absolute paths)",
                       fix=f"rename it at {where}")
    return value


def inside(base: Path, *components: str, where: str = "$") -> Path:
    """base/components..., each checked by safe_component, and verified to resolve inside base."""
    path = base.joinpath(*(safe_component(c, where) for c in components))
    if not path.resolve().is_relative_to(base.resolve()):
        raise BadInput(f"{where}: {path} would lie outside {base}", fix=f"rename it at {where}")
    return path


def check_dataset_root(spec: dict) -> None:
    """A dataset root the spec names must exist, unless the dataset may download into it."""
    ds = spec["dataset"]
    root = ds.get("root")
    if root is None or ds.get("download"):
        return
    path = Path(root).expanduser()
    if not path.exists():
        raise BadInput(f"$.dataset.root: folder {str(path)!r} does not exist",
                       fix="give the folder holding the data, or set \"download\": true to let the plugin fetch it")
    if not path.is_dir():
        raise BadInput(f"$.dataset.root: {str(path)!r} is a file, not a folder", fix="give the folder holding the data")


def write_atomic(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Call `write` on a temporary file beside `path`, fsync it and rename it into place: a reader (or a crash)
    never sees half a file, and an existing file is replaced only by a complete one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
