"""One run per folder: an exclusive lock file for a run's lifetime, and no silent reuse of an earlier run's folder.

``output.dir/.condvec-train.lock`` is created with ``O_CREAT | O_EXCL`` (atomic on every local file system) and holds
the owner's pid and host. A second ``condvec-train`` on the same folder is refused in one line naming that pid; a
lock left by a killed run (its pid no longer running on this host) is taken over. The lock goes when the process
exits.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import socket

from conditioner.errors import CondvecError

LOCK_NAME = ".condvec-train.lock"
#: What a run writes into its folder: any of these means the folder holds an earlier run.
RUN_OUTPUTS = ("checkpoints", "table.safetensors", "table-ema.safetensors", "metrics.jsonl", "config.yaml", "model",
               "samples", "loss.png")

_held: set[str] = set()


class RunFolderError(CondvecError):
    """The run folder is in use by another process, or holds an earlier run."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
        return value if isinstance(value, dict) else {}
    except (OSError, ValueError):
        return {}


def acquire(folder: str) -> str:
    """Take the folder's lock (creating the folder); returns the lock path.

    Raises:
        RunFolderError: another live process holds it.
    """
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_NAME)
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError as err:
            holder = _read(path)
            pid, host = holder.get("pid"), holder.get("host")
            if pid == me["pid"] and host == me["host"]:
                _remember(path)
                return path  # this process already holds it (a second Trainer in the same process)
            if isinstance(pid, int) and host == me["host"] and _alive(pid):
                raise RunFolderError(f"output.dir {folder!r} is in use by another condvec-train (pid {pid}); wait "
                                     "for it to finish or choose another output.dir") from err
            if host not in (None, me["host"]):
                raise RunFolderError(f"output.dir {folder!r} is locked by a run on host {host!r} (pid {pid}); if no "
                                     f"run uses it, delete {path}") from err
            _take_over(path, holder)
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(me, f)
        _remember(path)
        return path
    raise RunFolderError(f"could not take the lock {path}: other processes keep taking it")


def _take_over(path: str, holder: dict) -> None:
    """Remove a stale lock, unless another process replaced it in the meantime."""
    stale = f"{path}.stale-{os.getpid()}"
    try:
        os.replace(path, stale)
    except FileNotFoundError:
        return
    if _read(stale) != holder:  # someone else's fresh lock: put it back
        try:
            os.link(stale, path)
        except FileExistsError:
            pass
    os.unlink(stale)


def _remember(path: str) -> None:
    if path not in _held:
        _held.add(path)
        if len(_held) == 1:
            atexit.register(release_all)


def release(path: str) -> None:
    """Give the lock back (only if this process holds it)."""
    holder = _read(path)
    if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    _held.discard(path)


def release_all() -> None:
    """Give back every lock this process holds (run at exit)."""
    for path in list(_held):
        release(path)


def earlier_outputs(folder: str) -> list[str]:
    """What an earlier run left in ``folder`` (names from :data:`RUN_OUTPUTS`)."""
    return [name for name in RUN_OUTPUTS if os.path.lexists(os.path.join(folder, name))]


def check_fresh(folder: str, resume: bool, overwrite: bool) -> list[str]:
    """Refuse a folder holding an earlier run unless the run resumes it or ``overwrite`` is set.

    With ``overwrite``, the earlier run's ``checkpoints/`` and ``samples/`` are removed (a later
    ``output.resume=latest`` must not pick up the old run's checkpoints); its other files are replaced as the new
    run writes them. Returns what was there.

    Raises:
        RunFolderError: the folder holds an earlier run and neither ``resume`` nor ``overwrite`` is set.
    """
    found = earlier_outputs(folder)
    if not found or resume:
        return found
    if not overwrite:
        raise RunFolderError(f"output.dir {folder!r} already holds a run ({', '.join(found)}): continue it with "
                             "output.resume=latest, replace it with output.overwrite=true, or choose a new "
                             "output.dir")
    for name in ("checkpoints", "samples"):
        target = os.path.join(folder, name)
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target)
    return found
