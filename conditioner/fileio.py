"""Atomic, durable writes: a file (or folder) appears complete at its final path, or not at all.

Write to a temporary path in the same folder, flush it to disk, then rename it over the destination (``os.replace``
is atomic within one file system) and flush the folder so the rename itself survives a power cut. A crash or an
exception at any point leaves the old file untouched and no temporary behind.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

TEMP_PREFIX = ".tmp-"  # every temporary name starts with this, so leftovers of a killed process can be recognised


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary file path beside ``path``; on success it replaces ``path`` atomically and durably.

    The temporary path keeps ``path``'s extension, so writers that pick a format by extension (Pillow, matplotlib)
    work unchanged. Missing parent folders are created. Rewriting an existing file keeps its permission bits (a
    0600 table stays 0600); a new file gets the permissions a plain ``open`` would give it (``0o666`` minus the
    umask), not ``mkstemp``'s private ``0o600``. A symbolic link is followed: its target is rewritten and the link
    stays a link.

    Args:
        path (`str` or `os.PathLike`): the destination file.

    Yields:
        `str`: the temporary path to write to (it exists, empty, when the block starts).

    Raises:
        Whatever the block raises; the temporary file is removed and ``path`` is left as it was.

    Example:
        ```py
        >>> with atomic_path("out/table.safetensors") as tmp:
        ...     save_file(tensors, tmp)
        ```
    """
    path = os.fspath(path)
    if os.path.islink(path):
        path = os.path.realpath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    name = os.path.basename(path)
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        mode = 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{name}-", suffix=os.path.splitext(name)[1], dir=directory)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, mode)
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(directory)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary folder beside ``path``; on success it replaces the folder ``path`` atomically and durably.

    Every file written into the temporary folder is flushed to disk before the rename. An existing ``path`` is
    moved aside first and deleted only after the new folder is in place, so at every moment one complete folder
    exists.

    Args:
        path (`str` or `os.PathLike`): the destination folder.

    Yields:
        `str`: the temporary folder to write into.

    Raises:
        Whatever the block raises; the temporary folder is removed and ``path`` is left as it was.
    """
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    name = os.path.basename(os.path.normpath(path))
    tmp = tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{name}-", dir=parent)
    old = None
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        for root, _, files in os.walk(tmp):
            for file in files:
                _fsync_file(os.path.join(root, file))
            fsync_dir(root)
        if os.path.exists(path):  # never delete the old folder before the new one is in place
            old = tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}old-{name}-", dir=parent)
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not os.path.exists(path):
            os.replace(old, path)
        raise
    fsync_dir(parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def clear_leftovers(folder: str | os.PathLike) -> list[str]:
    """Remove what killed writers left in ``folder``: temporary files and folders (names starting with
    :data:`TEMP_PREFIX`). A folder moved aside by :func:`atomic_dir` whose replacement never arrived is put back
    first, since it is then the only complete copy. Returns the names removed.
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return []
    removed = []
    for name in sorted(os.listdir(folder)):
        if not name.startswith(TEMP_PREFIX):
            continue
        path = os.path.join(folder, name)
        if name.startswith(f"{TEMP_PREFIX}old-") and os.path.isdir(path):
            original = os.path.join(folder, name[len(f"{TEMP_PREFIX}old-"):].rsplit("-", 1)[0])
            if not os.path.exists(original):
                os.replace(path, original)
                continue
        shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.unlink(path)
        removed.append(name)
    if removed:
        fsync_dir(folder)
    return removed


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str) -> None:
    """Flush a file, or a folder's entries (so that a rename or a new file in it survives a power cut), to disk.

    Args:
        path (`str`): the folder. On platforms that cannot open folders (Windows) this does nothing.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms that cannot open folders (Windows) rely on the file fsync alone
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
