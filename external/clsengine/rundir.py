"""A run folder has one owner at a time and keeps its history: a lock while a run writes to it, a refusal to
start a fresh run over another run's checkpoints, and the clean-up a killed run leaves to the next start."""
from __future__ import annotations

import atexit
import datetime
import fcntl
import json
import os
import shutil
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError
from .fileio import remove_stale_temporaries, write_error

LOCK_FILE = ".lock"


class RunFolderError(UserError):
    """The folder is another run's: locked by a live process, or holding checkpoints of a finished one."""


@dataclass
class RunLock:
    """An exclusive flock on <folder>/.lock, held for the life of the process (the kernel drops it when the
    process dies, however it dies, so a lock can never outlive its owner). The file names the owner."""
    path: Path
    fd: int
    notes: list[str] = field(default_factory=list)  # warnings for the run's log: take-over, clean-up

    def release(self) -> None:
        """Unlock, leaving an empty lock file: a lock file that names an owner is one that was never
        released, i.e. a killed run's."""
        if self.fd >= 0:
            try:
                os.ftruncate(self.fd, 0)
            except OSError:
                pass
            os.close(self.fd)
            self.fd = -1
        _held.pop(self.path, None)


def _owner_text(info: dict) -> str:
    return (f"pid {info.get('pid', '?')} on {info.get('host', '?')}, started {info.get('started', '?')}"
            + (f": {info['command']}" if info.get("command") else ""))


def _read_owner(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 65536).decode("utf-8", "replace")
        info = json.loads(text) if text.strip() else {}
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def lock_run_folder(folder: str | os.PathLike, what: str) -> RunLock:
    """Take the folder's lock or raise RunFolderError naming the live owner; a lock file left by a process
    that no longer runs (killed, crashed) is taken over with a warning in `notes`."""
    folder = Path(folder).resolve()
    path = folder / LOCK_FILE
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise (write_error(path, exc) or exc) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        owner = _read_owner(fd)
        os.close(fd)
        raise RunFolderError(f"{folder} is in use by another {owner.get('what', 'run')} ({_owner_text(owner)}); "
                             f"wait for it to end, or write to another folder") from None
    previous = _read_owner(fd)
    info = {"what": what, "pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)}
    try:
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(info).encode())
    except OSError:
        pass  # the flock is what guards the folder; the text only names the owner in messages
    lock = _held[path] = RunLock(path, fd)
    if previous:
        lock.notes.append(f"{folder}: took over the lock of a {previous.get('what', 'run')} that is no longer "
                          f"running ({_owner_text(previous)})")
    return lock


_held: dict[Path, RunLock] = {}


def release_all() -> None:
    """Release this process's run locks: at exit, and when a script's main returns in a longer-lived process."""
    for lock in list(_held.values()):
        lock.release()


atexit.register(release_all)


def run_files(folder: Path, names: tuple[str, ...]) -> list[Path]:
    """Those of `names` that exist in `folder` (files or folders)."""
    return [folder / n for n in names if (folder / n).exists()]


def claim_run_folder(folder: str | os.PathLike, what: str, *, run_names: tuple[str, ...], resuming: bool,
                     overwrite: bool, resume_hint: str, clear_names: tuple[str, ...] = ()) -> RunLock:
    """Make `folder` this run's: lock it, remove temporary files of interrupted writes, and refuse to start
    a fresh run where `run_names` (e.g. latest.pth, best.pth) of an earlier run exist, unless `resuming`
    that run or `overwrite` (which removes them and `clear_names`, noted for the log)."""
    folder = Path(folder)
    lock = lock_run_folder(folder, what)
    try:
        removed = remove_stale_temporaries(folder)
        if removed:
            lock.notes.append(f"{folder}: removed {len(removed)} temporary file(s) of an interrupted write, "
                              f"e.g. {removed[0].name}")
        earlier = run_files(folder, run_names)
        if earlier and not resuming:
            if not overwrite:
                raise RunFolderError(
                    f"{folder} already holds a run ({', '.join(p.name for p in earlier)}): continue it with "
                    f"{resume_hint}, start a fresh one in another folder, or replace it with --overwrite")
            gone = earlier + run_files(folder, clear_names)
            for p in gone:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
            lock.notes.append(f"--overwrite: removed the earlier run's {', '.join(p.name for p in gone)} "
                              f"from {folder}")
    except BaseException:
        lock.release()
        raise
    return lock


__all__ = ["LOCK_FILE", "RunFolderError", "RunLock", "claim_run_folder", "lock_run_folder", "release_all", "run_files"]
