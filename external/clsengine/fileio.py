"""File output that loses nothing: readers see the old file or the complete new one, never a half-written
file; a full disk or a refused permission is one WriteError naming the path and the space, and the file
that was there stays as it was."""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import DataError, UserError

# Errors of the medium, not of the program: the user frees space or fixes permissions.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
NO_PERMISSION = (errno.EACCES, errno.EPERM, errno.EROFS)
NOT_A_FOLDER = (errno.ENOTDIR, errno.EEXIST)   # a folder wanted where a file is (mkdir under or over a file)
WRITE_ERRNOS = NO_SPACE + NO_PERMISSION + NOT_A_FOLDER  # what a script reports as one line
LOW_SPACE_BYTES = 1 << 20  # after a failed write by a library that hides the OSError: the disk is full

# Test hook: CLSENGINE_FAULT="kill:best.pth,enospc:latest.pth:3" kills this process (SIGKILL) or fails with
# ENOSPC / EACCES at the n-th (default first) atomic write of a file of that name, after its temporary file
# was written and before it replaces the file: the crash points of tests and tools/benchmark_faults.py.
FAULT_ENV = "CLSENGINE_FAULT"
_writes: dict[str, int] = {}


class WriteError(UserError):
    """A file could not be written (no space, no permission); what was there before is intact."""


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _size_text(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free space on the file system of `path` (or of its nearest existing parent)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def write_error(path: str | os.PathLike, exc: BaseException, needed: int | None = None) -> WriteError | None:
    """The WriteError for a failed write of `path`, or None when `exc` is not about the medium."""
    code = getattr(exc, "errno", None)
    free = free_bytes(Path(path).parent)
    space = f"{_size_text(free)} free" if free is not None else "free space unknown"
    if needed:
        space = f"needs about {_size_text(needed)}, {space}"
    if code in NO_SPACE or (not isinstance(exc, OSError) and free is not None and free < LOW_SPACE_BYTES):
        return WriteError(f"cannot write {path}: no space left on the device ({space} in {Path(path).parent}); "
                          f"free some space and run again (the earlier file, if any, is unchanged)")
    if code in NO_PERMISSION:
        return WriteError(f"cannot write {path}: {os.strerror(code).lower()}; write to a folder you own, or fix "
                          f"its permissions")
    if code in NOT_A_FOLDER:
        blocking = next((p for p in (Path(path), *Path(path).parents) if p.is_file()), None)
        if blocking is not None:
            return WriteError(f"cannot write {path}: {blocking} is a file, not a folder; choose an output path "
                              f"that is a folder or does not exist yet")
    if isinstance(exc, OSError) and code is not None:
        return WriteError(f"cannot write {path}: {exc.strerror or os.strerror(code)}")
    return None


def _fault_point(path: Path) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    count = _writes[path.name] = _writes.get(path.name, 0) + 1
    for item in spec.split(","):
        action, _, rest = item.strip().partition(":")
        name, _, nth = rest.partition(":")
        if name != path.name or count != (int(nth) if nth else 1):
            continue
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if action in ("enospc", "eacces"):
            code = errno.ENOSPC if action == "enospc" else errno.EACCES
            raise OSError(code, os.strerror(code), str(path))


@contextmanager
def atomic_output(path: str | os.PathLike, needed: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block succeeds it replaces `path`, else it is removed.
    A full disk or a refused permission, in the block or in the rename, becomes one WriteError."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes owner-only files; give the usual permissions
        os.close(fd)
        yield Path(tmp)
        _fault_point(path)
        os.replace(tmp, path)
    except UserError:
        raise
    except Exception as exc:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)  # first: the free space reported is what the user has without it
        error = write_error(path, exc, needed)
        if error is None:
            raise
        raise error from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_outputs(*paths: str | os.PathLike) -> Iterator[list[Path]]:
    """atomic_output for a writer of several files at once (an IR's .xml and .bin): temporary paths of the
    same names in a hidden folder beside the first; when the block succeeds each replaces its file (the last
    path last: name the file readers open first last, e.g. the .xml), else nothing of the old files changes."""
    paths = [Path(p) for p in paths]
    tmp_dir = None
    try:
        paths[0].parent.mkdir(parents=True, exist_ok=True)
        tmp_dir = Path(tempfile.mkdtemp(dir=paths[0].parent, prefix=f".{paths[0].name}.", suffix=".tmp"))
        yield [tmp_dir / p.name for p in paths]
        for p in paths:
            _fault_point(p)
        for p in paths:
            os.replace(tmp_dir / p.name, p)
    except UserError:
        raise
    except Exception as exc:
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        error = write_error(paths[0], exc)
        if error is None:
            raise
        raise error from None
    finally:
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)


def write_bytes(path: str | os.PathLike, data: bytes, sync: bool = False) -> Path:
    """Atomically write `data` to `path`; `sync`: on the disk before it replaces the old file (checkpoints)."""
    with atomic_output(path, needed=len(data)) as tmp, open(tmp, "wb") as f:
        f.write(data)
        if sync:
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomically write UTF-8 `text` to `path`."""
    return write_bytes(path, text.encode("utf-8"))


_TEMPORARY = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")  # atomic_output's names: .<file>.<random>.tmp


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files that writes interrupted by a kill left in `folder`. Only for a folder this
    process owns (its run lock held): a live writer's temporary file would go too."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in sorted(folder.iterdir()):
        if _TEMPORARY.match(p.name) and (p.is_file() or p.is_dir()):
            try:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
                removed.append(p)
            except OSError:
                pass
    return removed


def load_json(path: str | os.PathLike, what: str) -> Any:
    """Parse a JSON file (a UTF-8 byte-order mark is allowed); a missing file or bad JSON is one DataError
    naming `what`, the path and the line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} {path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        line = f", line {exc.lineno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise DataError(f"{what} {path}{line}: not valid JSON ({exc})") from None
