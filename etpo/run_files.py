"""The files of a run directory that a resume reads, written so that a kill, a power loss or a full disk leaves each
of them whole -- the previous version or the new one -- and read back tolerantly.

* :func:`write_atomic`: a temporary file in the same directory, flushed and fsynced, renamed over the old one (the
  directory fsynced too): checkpoints (through :class:`AtomicCheckpointIO`, the strategy's ``checkpoint_io``),
  ``summary.json``, ``best_code.py``, ``config.yaml`` and a log that a resume trims.
* :func:`append_lines`: the append-only logs (``history.jsonl``, ``samples.jsonl``), fsynced before the step's
  checkpoint is written; an append that fails is cut back to the last whole line.
* :func:`read_jsonl`: a log's records and the lines that are not one (a line torn by a kill is dropped, not fatal).
* :func:`inspect_checkpoint`, :func:`intact_checkpoints`: what is wrong with a checkpoint file, if anything, and
  the intact ones of a run, newest first.
* :class:`RunWriteError`: an ``OSError`` that names the file, the bytes the write needed and the space left.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from lightning.fabric.plugins import TorchCheckpointIO

__all__ = ["AtomicCheckpointIO", "CheckpointState", "RunWriteError", "append_lines", "format_size",
           "inspect_checkpoint", "intact_checkpoints", "is_partial_write", "read_jsonl", "remove_partial_writes",
           "write_atomic", "writing"]

# a temporary file of write_atomic: ".<final name>.<pid>.tmp", next to the file it becomes
_PARTIAL = re.compile(r"^\..+\.\d+\.tmp$")


def format_size(n: float) -> str:
    """Bytes as people read them: ``512 B``, ``227 kB``, ``1.3 GB`` (powers of 1000, like ``df -H``)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" or abs(n) >= 100 else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


class RunWriteError(OSError):
    """A write into the run directory failed: which file, what the write was, the bytes it needed (None where a
    library wrote it and did not say), the space left on that file system when it failed (None where the system
    does not say). ``errno`` and ``strerror`` are the failed call's."""

    def __init__(self, path: str | os.PathLike, action: str, needed: Optional[int], cause: OSError):
        super().__init__(cause.errno, cause.strerror or str(cause), str(path))
        self.path, self.action, self.needed, self.cause = Path(path), action, needed, cause
        try:
            self.free: Optional[int] = shutil.disk_usage(self.path.parent).free
        except OSError:
            self.free = None

    def __str__(self) -> str:
        space = [f"it needed {format_size(self.needed)}"] if self.needed is not None else []
        space += [f"{format_size(self.free)} free there"] if self.free is not None else []
        return f"{self.action} {self.path} failed: {self.strerror}" + (f" ({', '.join(space)})" if space else "")


@contextlib.contextmanager
def writing(path: str | os.PathLike, action: str = "writing"):
    """Around a library's write into ``path`` (peft's adapters, matplotlib's figure): a failed write leaves the block
    as a :class:`RunWriteError` naming ``path`` -- from an ``OSError``, or from an error that quotes the failed
    call's number the way Rust libraries do ("... (os error 28)": safetensors). Any other error passes unchanged."""
    try:
        yield
    except RunWriteError:
        raise
    except Exception as err:  # noqa: BLE001 - only the failed writes among them are turned into RunWriteError
        quoted = re.search(r"\(os error (\d+)\)", str(err))
        if isinstance(err, OSError):
            cause = err
        elif quoted is not None:
            cause = OSError(int(quoted.group(1)), os.strerror(int(quoted.group(1))))
        else:
            raise
        raise RunWriteError(path, action, None, cause) from err


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)  # a full disk may take part of it first; the next write raises
        view = view[written:]


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (a power loss after it must not bring back the old name)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # a platform or file system without directory handles: the rename is as durable as it gets
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, data: bytes | str, action: str = "writing") -> None:
    """Replace ``path`` by ``data`` so that no crash, power loss or full disk leaves a mix of the two: written to a
    temporary name in the same directory, fsynced, renamed into place. On an ``OSError`` the temporary file is
    removed, ``path`` is as it was, and a :class:`RunWriteError` is raised."""
    path = Path(path)
    payload = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            _write_all(fd, payload)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise RunWriteError(path, action, len(payload), err) from err
    _fsync_directory(path.parent)


def append_lines(path: str | os.PathLike, lines: list[str]) -> None:
    """Append ``lines`` (each without its newline) to ``path`` and fsync it, so that a checkpoint written after it
    never holds a step whose lines are missing. A failed append is cut back to where it started (no torn line is
    left) and raised as a :class:`RunWriteError`."""
    path = Path(path)
    payload = "".join(line + "\n" for line in lines).encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    except OSError as err:
        raise RunWriteError(path, "appending to", len(payload), err) from err
    try:
        start = os.fstat(fd).st_size
        _write_all(fd, payload)
        os.fsync(fd)
    except OSError as err:
        try:
            os.ftruncate(fd, start)  # needs no space: the file is whole again
        except OSError:
            pass  # a torn last line is dropped when the run resumes (read_jsonl)
        raise RunWriteError(path, "appending to", len(payload), err) from err
    finally:
        os.close(fd)


def read_jsonl(path: str | os.PathLike) -> tuple[list[tuple[str, dict]], list[int], Optional[int]]:
    """A JSON-lines log as (``[(line, record)]`` of its whole records, the 1-based numbers of the other lines that
    are no JSON object, the number of a last line cut short -- without its newline, which every write of
    :func:`append_lines` ends with -- or None). Empty lines are none of them."""
    raw = Path(path).read_bytes()
    chunks = raw.split(b"\n")
    torn = len(chunks) if chunks[-1].strip() else None  # text after the last newline: a write that did not finish
    records, bad = [], []
    for number, chunk in enumerate(chunks[:-1], start=1):
        if not chunk.strip():
            continue
        try:
            text = chunk.decode("utf-8")
            record = json.loads(text)
        except (UnicodeDecodeError, ValueError):
            bad.append(number)
            continue
        if isinstance(record, dict):
            records.append((text, record))
        else:
            bad.append(number)
    return records, bad, torn


def is_partial_write(path: str | os.PathLike) -> bool:
    """Whether ``path`` is the temporary file of a :func:`write_atomic` (one that a kill may have left behind)."""
    return bool(_PARTIAL.match(Path(path).name))


def remove_partial_writes(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that a killed :func:`write_atomic` left in ``directory`` (never a file a resume
    reads: they are incomplete by construction) and return them."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if is_partial_write(p) and p.is_file()]
    for p in found:
        p.unlink(missing_ok=True)
    return found


@dataclass(frozen=True)
class CheckpointState:
    """One checkpoint file: the global step it holds (None where it cannot be read without running its pickles, or
    for a damaged file) and what is wrong with it (None: intact)."""

    path: Path
    step: Optional[int]
    problem: Optional[str]


def inspect_checkpoint(path: str | os.PathLike) -> CheckpointState:
    """Whether ``path`` is a whole Lightning checkpoint, read without loading its tensors (memory-mapped)."""
    import torch

    path = Path(path)
    if path.is_dir():  # a sharded (distributed) checkpoint: its own format, left to Lightning to judge
        return CheckpointState(path, None, None)
    try:
        size = path.stat().st_size
    except OSError as err:
        return CheckpointState(path, None, f"cannot be read ({err.strerror})")
    if size == 0:
        return CheckpointState(path, None, "is empty (0 bytes): the write that made it did not finish")
    if not zipfile.is_zipfile(path):  # torch.save's archive ends with its directory: a cut-short file has none
        return CheckpointState(path, None, f"is cut short ({format_size(size)}, no end of archive): the write that "
                                           "made it did not finish")
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" in str(err):  # objects beyond tensors: whole, but not ours to unpickle here
            return CheckpointState(path, None, None)
        return CheckpointState(path, None, f"does not load ({_first_line(err)})")
    except Exception as err:  # noqa: BLE001 - whatever torch says of a damaged archive, said in one line
        return CheckpointState(path, None, f"does not load ({type(err).__name__}: {_first_line(err)})")
    if not isinstance(state, dict) or "global_step" not in state or "state_dict" not in state:
        return CheckpointState(path, None, "is not a training checkpoint (no global_step and state_dict)")
    return CheckpointState(path, int(state["global_step"]), None)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def intact_checkpoints(directory: str | os.PathLike) -> tuple[list[CheckpointState], list[CheckpointState]]:
    """The checkpoints (``*.ckpt``) in ``directory``: (the intact ones, newest first -- by global step, ``last.ckpt``
    first among equals -- and the damaged ones)."""
    directory = Path(directory)
    states = [inspect_checkpoint(p) for p in sorted(directory.glob("*.ckpt"))] if directory.is_dir() else []
    intact = [s for s in states if s.problem is None]
    intact.sort(key=lambda s: (s.step if s.step is not None else -1, s.path.name == "last.ckpt"), reverse=True)
    return intact, [s for s in states if s.problem is not None]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer with :func:`write_atomic` for local files: a checkpoint is serialised in memory
    (as Lightning's own writer does), then written to a temporary name, fsynced and renamed, so ``last.ckpt`` and
    ``best-*.ckpt`` are always whole. Remote paths (``s3://`` ...) keep Lightning's transactional write."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options=storage_options)
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint takes no storage_options (the local file system has "
                            f"none), got {storage_options!r}")
        import io

        import torch

        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        write_atomic(path, buffer.getbuffer())
