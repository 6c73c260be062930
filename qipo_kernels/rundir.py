"""Run directories: the folders ``train`` / ``demo`` write into, and the rules that keep them safe.

- A folder the package creates for a run gets a marker file (``MARKER_NAME``). ``--fresh`` removes only
  such a folder (or an empty one): a folder the user made, with the user's files in it, is never
  deleted (``clear_run_dir`` refuses with a one-line message).
- ``run_lock(path)`` holds an exclusive lock on ``<path>/.qipo-kernels.lock`` while a run writes there,
  so a second process on the same folder is refused instead of interleaving its logs with the first
  (``RunDirBusy``). The lock is an OS file lock: it goes away with the process that held it, so a
  killed run never leaves a stale lock behind. It is re-entrant within one process.
- ``check_writable(path)`` says early, in one line, that a folder cannot be written (read-only, full,
  not a folder), before hours of work are spent on results that could not be saved.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from typing import Dict, Iterator, List

MARKER_NAME = ".qipo-kernels-run"
LOCK_NAME = ".qipo-kernels.lock"


class RunDirError(ValueError):
    """A run directory cannot be used as asked (not ours to delete, not writable, ...)."""


class RunDirBusy(RunDirError):
    """Another process holds the run directory's lock."""


def is_package_run_dir(path: str) -> bool:
    """True when ``path`` is a folder this package created (it holds the marker file)."""
    return os.path.isfile(os.path.join(path, MARKER_NAME))


def ensure_run_dir(path: str) -> str:
    """Create the run folder ``path`` if it is missing, marking it as the package's; returns ``path``.

    A folder that already exists is left as it is (no marker is added: it was not created here). One
    that the package did not make, holding no checkpoint but files a run would overwrite or append to
    (config.json, summary.json, CSV logs), is refused: they are somebody else's.
    """
    if os.path.isdir(path):
        if not is_package_run_dir(path) and not os.path.exists(os.path.join(path, "checkpoint.pt")):
            try:
                names = sorted(os.listdir(path))
            except OSError:
                names = []
            clash = [n for n in names if n in ("config.json", "summary.json") or n.endswith(".csv")]
            if clash:
                raise RunDirError(f"output folder {path} was not made by qipo-kernels and holds {', '.join(clash[:4])}"
                                  f"{' ...' if len(clash) > 4 else ''}, which a run would overwrite; pass a new --out folder")
        return path
    if os.path.exists(path):
        raise RunDirError(f"output path {path} exists and is not a folder")
    try:
        os.makedirs(path)
    except FileExistsError:  # made meanwhile by another process: not ours
        return path
    with open(os.path.join(path, MARKER_NAME), "w") as f:
        f.write("created by qipo-kernels for a training run; `--fresh` may delete this folder\n")
    return path


def check_writable(path: str, run_dir: bool = True) -> str:
    """Raise RunDirError (one line, naming ``path``) unless files can be created in folder ``path``.

    Creates the folder when it is missing (as a marked run folder when ``run_dir``, see ensure_run_dir);
    writes and removes a probe file.
    """
    try:
        if run_dir:
            ensure_run_dir(path)
        else:
            os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(prefix=".write-probe-", dir=path) as f:
            f.write(b"0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except RunDirError:
        raise
    except OSError as e:
        why = e.strerror or str(e)
        if e.errno == errno.ENOSPC:
            why = "no space left on the device"
        raise RunDirError(f"cannot write to {path}: {why}") from None
    return path


def clear_run_dir(path: str) -> None:
    """Empty the run folder ``path`` for a fresh start (the lock and marker files stay).

    Only a folder this package created (marker file) or an empty one is cleared; anything else raises
    RunDirError, naming the folder and what to do, and nothing is deleted.
    """
    if not os.path.exists(path):
        return
    if not os.path.isdir(path):
        raise RunDirError(f"output path {path} exists and is not a folder")
    entries = [e for e in os.listdir(path) if e != LOCK_NAME]
    if not entries:
        return
    if not is_package_run_dir(path):
        raise RunDirError(f"--fresh refuses to delete {path}: it was not created by qipo-kernels (no {MARKER_NAME} "
                          f"file) and holds {len(entries)} entries; delete it yourself or pass a new --out folder")
    for e in entries:
        if e == MARKER_NAME:
            continue
        p = os.path.join(path, e)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        else:
            os.unlink(p)


# ---- locking -----------------------------------------------------------------------------------

_HELD: Dict[str, List] = {}   # realpath -> [fd, depth]


def _try_lock(fd: int) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return False
        raise


def _unlock(fd: int) -> None:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        return
    fcntl.flock(fd, fcntl.LOCK_UN)


@contextlib.contextmanager
def run_lock(path: str) -> Iterator[None]:
    """Hold the exclusive lock of run folder ``path`` (created, marked, if missing) for the ``with`` block.

    Raises RunDirBusy naming the folder (and the holder's pid when known) if another process holds it.
    """
    ensure_run_dir(path)
    key = os.path.realpath(path)
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield
        finally:
            _HELD[key][1] -= 1
        return
    lock_path = os.path.join(path, LOCK_NAME)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not _try_lock(fd):
            try:
                holder = os.read(fd, 64).decode(errors="replace").strip()
            except OSError:
                holder = ""
            who = f" (pid {holder})" if holder.isdigit() else ""
            raise RunDirBusy(f"run directory {path} is in use by another process{who}; wait for it to finish "
                             "or pass another --out folder")
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, str(os.getpid()).encode())
    except BaseException:
        os.close(fd)
        raise
    _HELD[key] = [fd, 1]
    try:
        yield
    finally:
        del _HELD[key]
        try:
            _unlock(fd)
        finally:
            os.close(fd)
