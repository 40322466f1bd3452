"""Paths built from strings in a spec (the run's name, model labels, cell ids), paths a spec names, the one way
files are written (atomically, with disk errors turned into a clear `WriteFailed`), the one way JSON files are read
(regular files only, size-capped), and the locks that let several jobs share one output folder.

The schema already restricts `name` and `label` to `[A-Za-z0-9][A-Za-z0-9_.+@-]*`, but the runner can be called
with a spec that never went through the CLI, so every path made from a spec string goes through `safe_component`
and `inside`: no separator, no `..`, no absolute path, no NUL can move a file outside its output folder.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import stat
import tempfile
import time
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from harness.errors import BadInput, RunFailure

try:  # POSIX; on a system without fcntl (Windows) the locks below do nothing
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

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


# ------------------------------------------------------------------------------------- writing

# Every temporary file is `.<name>.<pid>.<random>.tmp` beside its target: unique per process and call (two jobs
# writing the same file never share one), and a stale one (left by kill -9) is recognisable with its writer's pid.
TMP_PATTERN = re.compile(r"^\.(?P<name>.+)\.(?P<pid>[0-9]+)\.[A-Za-z0-9_]+\.tmp$")

# errno values that mean "this disk cannot take the file" rather than a bug: the write fails with WriteFailed.
NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class WriteFailed(RunFailure):
    """A file could not be written (no space left, a read-only file system, no permission). Exit code 1.

    The previous version of the file is intact (writes are atomic). The runner adds which checkpoint is the last
    good one (`add_context`)."""

    def __init__(self, path: Path, error: OSError, needed: int | None):
        self.path, self.errno, self.needed = Path(path), error.errno, needed
        folder = self.path.parent
        if error.errno in NO_SPACE:
            free = _free_bytes(folder)
            message = (f"no space left on the device of {folder} (writing {self.path.name}); "
                       f"{needed if needed is not None else 'an unknown number of'} bytes needed"
                       + (f", {free} free" if free is not None else ""))
            fix = "free some space on that disk (or choose another --out) and run the same command again"
        else:
            reason = {errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                      errno.EPERM: "operation not permitted"}.get(error.errno, error.strerror or str(error))
            message = f"cannot write {self.path}: {reason}"
            fix = "make the folder writable (or choose another --out) and run the same command again"
        super().__init__(message, fix=fix)

    def add_context(self, text: str) -> "WriteFailed":
        self.message = f"{self.message}; {text}"
        return self


def _free_bytes(folder: Path) -> int | None:
    for candidate in (folder, *folder.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


class _CountingSink:
    """The file object a writer callback writes into: it passes bytes on to the temporary file and counts them.
    After the first OSError (a full disk) it keeps counting without writing, so that the error can say how many
    bytes the whole file needs, and remembers the error: torch.save would otherwise turn it into an opaque
    `RuntimeError: [enforce fail at inline_container.cc] unexpected pos`. It has no fileno() on purpose: Pillow
    (matplotlib's PNG writer) would then write to the descriptor directly, past the count."""

    def __init__(self, fh: BinaryIO | None):
        self.fh, self.size, self.error = fh, 0, None

    def write(self, data) -> int:
        n = memoryview(data).nbytes
        self.size += n
        if self.fh is not None and self.error is None:
            try:
                self.fh.write(data)
            except OSError as exc:
                self.error = exc
        return n

    def flush(self) -> None:
        if self.fh is not None and self.error is None:
            try:
                self.fh.flush()
            except OSError as exc:
                self.error = exc

    def tell(self) -> int:
        return self.size


def _size_of(write: Callable[[BinaryIO], None]) -> int | None:
    """How many bytes `write` produces, measured without writing anything (for the message of a failed write)."""
    sink = _CountingSink(None)
    try:
        write(sink)  # type: ignore[arg-type]
    except Exception:
        return None
    return sink.size


def _read_umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it: set it back at once (at import, one thread)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def write_atomic(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Call `write` on a temporary file beside `path`, fsync it and rename it into place: a reader (or a crash)
    never sees half a file, and an existing file is replaced only by a complete one.

    A disk error (no space, read-only, no permission) raises WriteFailed naming the file and the bytes it needs;
    the previous file at `path`, if any, is left as it was."""
    path = Path(path)
    tmp = None
    sink = _CountingSink(None)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
        if hasattr(os, "fchmod"):  # mkstemp makes 0600; the file gets the mode a plain open() would give it
            os.fchmod(fd, 0o666 & ~_UMASK)
        _lock_temp(fd)  # held until the rename: remove_stale_temps never takes a file being written
        with os.fdopen(fd, "wb") as fh:
            sink = _CountingSink(fh)
            write(sink)  # type: ignore[arg-type]
            sink.flush()
            if sink.error is not None:
                raise sink.error
            os.fsync(fh.fileno())
            if fcntl is not None:  # POSIX renames an open file: the lock lasts until the name is gone
                os.replace(tmp, path)
                tmp = None
        if tmp is not None:
            os.replace(tmp, path)
    except OSError as exc:
        _discard(tmp)
        needed = sink.size if sink.fh is not None and sink.error is not None else _size_of(write)
        raise WriteFailed(path, exc, needed) from exc
    except BaseException:
        _discard(tmp)
        if sink.error is not None:  # the writer turned the disk error into its own exception (torch.save)
            raise WriteFailed(path, sink.error, sink.size) from sink.error
        raise


def _lock_temp(fd: int) -> None:
    if fcntl is not None:
        with contextlib.suppress(OSError):  # a file system without flock: remove_stale_temps goes by age there
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


# A temporary file is stale when no writer holds its lock and its writer is gone: its pid is no process here, or it
# was last written longer ago than this (a pid of another machine sharing the folder, or one reused since).
STALE_AFTER_S = 6 * 3600


def remove_stale_temps(*folders: Path) -> list[Path]:
    """Remove the temporary files (`.<name>.<pid>.<random>.tmp`, TMP_PATTERN) that writers killed mid-write left in
    `folders` (not recursively); return them. Never one another job is writing (in this folder, perhaps from another
    machine): a temp file is removed only when no process holds its lock (write_atomic holds one until the rename)
    and either its pid is no live process on this machine or it is older than STALE_AFTER_S. Where the file
    system cannot tell about locks, only files older than STALE_AFTER_S go; hidden `.*.tmp` files without a pid
    (older harnesses) go at that age too."""
    removed = []
    now = time.time()
    for folder in folders:
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            if not (entry.name.startswith(".") and entry.name.endswith(".tmp")):
                continue
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue
                old = now - entry.stat(follow_symlinks=False).st_mtime > STALE_AFTER_S
                match = TMP_PATTERN.match(entry.name)
                gone = match is not None and not _alive(int(match["pid"]))
                if (gone or old) and _unlocked(entry.path, lenient=old):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
            except OSError:  # removed meanwhile, or not ours to remove: leave it
                continue
    return removed


def _alive(pid: int) -> bool:
    """Whether `pid` is a process on this machine (signal 0 tests without sending anything; POSIX only)."""
    if pid == os.getpid():
        return True
    if os.name != "posix":  # os.kill(pid, 0) would send CTRL_C_EVENT on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, under another user
        return True
    return True


def _unlocked(path: str, *, lenient: bool) -> bool:
    """True when no process holds the flock of `path`. Where flock is unsupported the answer is `lenient`."""
    if fcntl is None:
        return lenient
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True  # released at once: temp names are never reused, so no writer can take it meanwhile
    except BlockingIOError:
        return False
    except OSError:
        return lenient
    finally:
        os.close(fd)


def _discard(tmp: str | None) -> None:
    if tmp is not None:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def check_writable(folder: Path, what: str = "--out") -> None:
    """Create `folder` if needed and write (then remove) a probe file in it, before any work that must be saved.

    A read-only or forbidden folder is BadInput (exit 2); a full disk is WriteFailed (exit 1)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=f".write-probe.{os.getpid()}.", suffix=".tmp")
        try:
            os.write(fd, b"0")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        if exc.errno in NO_SPACE:
            raise WriteFailed(folder / ".write-probe", exc, 1) from exc
        reason = {errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                  errno.EPERM: "operation not permitted", errno.ENOTDIR: "a file is in the way",
                  errno.EEXIST: "a file is in the way"}.get(exc.errno, exc.strerror or str(exc))
        raise BadInput(f"{what} {folder} cannot be written: {reason}",
                       fix=f"choose a writable folder for {what}") from exc


# ------------------------------------------------------------------------------------- reading

# Caps on what is read into memory: a spec is a few kB; a report holds every cell (a few kB each) of a run.
SPEC_MAX_BYTES = 16 * 2**20
REPORT_MAX_BYTES = 256 * 2**20

_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))


def _not_regular(mode: int) -> str | None:
    if stat.S_ISREG(mode):
        return None
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def require_regular(path: Path, what: str, fix: str = "give the path of a regular file") -> None:
    """BadInput unless `path` is a regular file (checked without opening it: opening a FIFO blocks)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise BadInput(f"cannot read {what} {path}: {exc.strerror or exc}", fix="check the path") from exc
    kind = _not_regular(mode)
    if kind is not None:
        raise BadInput(f"{what} {path} is {kind}, not a regular file: harness reads only regular files "
                       "(a FIFO would block the read forever, a device file never ends)", fix=fix)


def read_regular(path: Path, what: str, max_bytes: int, fix: str = "give the path of a regular file") -> bytes:
    """The bytes of `path`, which must be a regular file of at most `max_bytes`; anything else is BadInput.

    The file is opened non-blocking and checked on the open descriptor (fstat), so a FIFO swapped in after a
    check can neither block nor be read, and a file that grows past the cap while being read is refused too."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except OSError as exc:
        raise BadInput(f"cannot read {what} file {path}: {exc.strerror or exc}",
                       fix="check the path and the file's permissions") from exc
    try:
        st = os.fstat(fd)
        kind = _not_regular(st.st_mode)
        if kind is not None:
            raise BadInput(f"{what} file {path} is {kind}, not a regular file: harness reads only regular files "
                           "(a FIFO would block the read forever, a device file never ends)", fix=fix)
        too_big = BadInput(f"{what} file {path} is larger than {max_bytes} bytes, more than a {what} can be",
                           fix=f"check that {path} is the {what} you mean")
        if st.st_size > max_bytes:
            raise too_big
        chunks, total = [], 0
        while total <= max_bytes:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > max_bytes:
            raise too_big
        return b"".join(chunks)
    except OSError as exc:
        raise BadInput(f"cannot read {what} file {path}: {exc.strerror or exc}",
                       fix="check the file's permissions") from exc
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------- locks


def report_lock(out_dir: Path) -> Path:
    """The lock under which out_dir's report.json and figures are rewritten (by `harness run` jobs and
    `harness report`), one writer at a time."""
    return Path(out_dir) / ".locks" / "report.lock"


@contextlib.contextmanager
def locked(lock_path: Path, *, on_wait: Callable[[str], None] | None = None,
           poll: Callable[[], None] | None = None, interval: float = 0.2) -> Iterator[bool]:
    """Hold an exclusive lock on `lock_path` (created if absent, never deleted) for the block; yields whether it
    had to wait for another holder.

    fcntl.flock, not a library: the kernel releases it when its holder exits in any way (kill -9 included), so a
    crashed job never leaves a stale lock behind, and it works between processes on one machine (on network file
    systems only where they support flock). While another process holds the lock, `on_wait(holder)` is called
    once (holder: the pid written into the lock file) and `poll()` every `interval` seconds: a blocking flock would
    not return for a signal, so polling is what lets a waiting job honour SIGTERM (`poll` raises)."""
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    waited = False
    try:
        if fcntl is not None:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if not waited and on_wait is not None:
                        on_wait(_holder(fd))
                    waited = True
                    if poll is not None:
                        poll()
                    time.sleep(interval)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield waited
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def _holder(fd: int) -> str:
    try:
        return os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
    except OSError:
        return "unknown"
