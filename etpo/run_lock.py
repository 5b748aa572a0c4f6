"""One run per run directory at a time: an exclusive ``flock`` on ``<run_dir>/.run.lock``.

Two processes writing one run directory (a sweep and a hand-started resume, or two sweeps sharing a folder) would
interleave history lines and overwrite each other's checkpoints. ``etpo.fit`` takes this lock before it touches the
directory and refuses, with one line naming the holder, when another process has it; ``etpo.benchmark`` takes it
before starting a run and hands it to the run's process (``ETPO_RUN_LOCK_FD``), so the lock lasts exactly as long
as the run, even when the sweep itself is killed. The lock is the kernel's: it goes when the last process holding it
ends (a crash or a machine restart leaves nothing to clean up). Where ``fcntl`` is missing (Windows) nothing is
locked. No torch, no Lightning: the sweep imports this.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Iterator, Optional

__all__ = ["LOCK_NAME", "INHERITED_FD_ENV", "RunDirectoryBusy", "try_lock", "let_go", "hold", "release", "exclusive"]

LOCK_NAME = ".run.lock"
INHERITED_FD_ENV = "ETPO_RUN_LOCK_FD"  # set by etpo.benchmark: the run's lock is already held through this fd

_HELD: dict[str, int] = {}  # lock files this process holds (real path -> fd), so holding again is a no-op


class RunDirectoryBusy(ValueError):
    """Another process holds the run directory's lock."""


def _lock_path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / LOCK_NAME


def _flock(path: Path, wait: bool) -> Optional[int]:
    """An exclusive ``flock`` on ``path`` (created if missing): its file descriptor, None when another process holds
    it and ``wait`` is off, -1 where there is no ``flock``."""
    try:
        import fcntl
    except ImportError:
        return -1
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def let_go(fd: Optional[int]) -> None:
    """Close a descriptor :func:`try_lock` gave (the lock goes with the last process holding it)."""
    if fd is not None and fd >= 0:
        os.close(fd)


@contextlib.contextmanager
def exclusive(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` for the block, waiting for it (e.g. a read-modify-write of a shared file)."""
    fd = _flock(Path(path), wait=True)
    try:
        yield
    finally:
        let_go(fd)


def try_lock(run_dir: str | os.PathLike) -> tuple[Optional[int], str]:
    """Take the lock without waiting: (its file descriptor, "") or (None, who holds it: "pid N since TIME").
    (-1, "") where there is no ``flock``. :func:`let_go` lets go."""
    path = _lock_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _flock(path, wait=False)
    if fd is None:
        try:
            holder = path.read_text().strip()
        except OSError:
            holder = ""
        return None, holder or "another process"
    if fd < 0:
        return fd, ""
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
    return fd, ""


def _inherited(path: Path) -> bool:
    """Whether ``ETPO_RUN_LOCK_FD`` names an open descriptor of this very lock file (the sweep holds it for us)."""
    value = os.environ.get(INHERITED_FD_ENV)
    if not value or not path.exists():
        return False
    try:
        return os.path.samestat(os.fstat(int(value)), os.stat(path))
    except (ValueError, OSError):
        return False


def hold(run_dir: str | os.PathLike) -> None:
    """Hold the run directory's lock until :func:`release` or the process ends; raise :class:`RunDirectoryBusy`
    when another process has it."""
    path = _lock_path(run_dir)
    key = os.path.realpath(path)
    if key in _HELD or _inherited(path):
        return
    fd, holder = try_lock(run_dir)
    if fd is None:
        raise RunDirectoryBusy(f"run directory {run_dir} is in use by another run ({holder}): wait for it to end, "
                               "or pass --run_dir NEW_DIR")
    _HELD[key] = fd


def release(run_dir: str | os.PathLike) -> None:
    let_go(_HELD.pop(os.path.realpath(_lock_path(run_dir)), None))
