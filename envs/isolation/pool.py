"""The warm worker pool: :class:`SandboxPool` runs code through a :class:`SandboxTask` in isolated workers."""

from __future__ import annotations

import atexit
import io
import json
import logging
import os
import queue
import select
import signal
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import view
from . import worker as _proto
from .errors import SandboxError
from .modes import Isolation, resolve_isolation
from .view import DIR_PREFIX, MountPlan, TaskFiles, _bwrap_base_args, _remove_stale_dirs, _rmtree_hard, _worker_env
from .view import mount_plan, task_files

__all__ = ["SandboxTask", "SandboxResult", "SandboxPool", "default_n_workers", "get_default_pool", "close_all_pools",
           "isolation_report", "isolation_mark"]

log = logging.getLogger(__name__)
_MB = 1 << 20

# ---------------------------------------------------------------------------------------------------
# what a pool runs


@dataclass(frozen=True)
class SandboxTask:
    """What the workers of a pool run.

    Args:
        name: a short name (log lines, default-pool key).
        runner: path of a Python file that defines ``run(code, inputs, params) -> numpy.ndarray``; it is loaded
            by path inside the sandbox and may import only the standard library and ``modules``.
        preload: modules imported once per worker, before its first job (what makes the pool warm).
        modules: further modules the code may import; with ``preload`` they decide which package directories
            the isolated sandbox shows (every package their import loads, nothing else).
        hide: called with the package directories shown in the sandbox; returns paths inside them to hide
            (an empty directory or file is shown instead), e.g. datasets bundled with a package.
    """

    name: str
    runner: str
    preload: tuple[str, ...] = ()
    modules: tuple[str, ...] = ()
    hide: Callable[[Sequence[str]], Sequence[str]] | None = field(default=None, compare=False)


@dataclass
class SandboxResult:
    """Outcome of one :meth:`SandboxPool.run` call.

    ``status`` is ``"ok"`` (``output`` holds the returned array), ``"error"`` (the code raised, crashed, hit a
    limit, or returned unusable output; ``error`` says what) or ``"timeout"``. ``stdout`` is the tail of the
    code's captured stdout+stderr; ``duration`` the child's run time and ``wall_time`` the whole call as seen
    by the caller (both seconds). ``worker_replaced``: this call started a new worker process in place of one
    that had died or been killed, or killed an unresponsive one. ``isolation``: ``"isolated"`` or ``"rlimits"``.
    """

    status: str
    output: np.ndarray | None = None
    error: str | None = None
    stdout: str = ""
    duration: float = 0.0
    wall_time: float = 0.0
    worker_replaced: bool = False
    isolation: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def default_n_workers() -> int:
    """Workers for a default pool: one per available CPU, between 2 and 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 2
    return max(2, min(8, cpus))


# ---------------------------------------------------------------------------------------------------
# the pool


class _WorkerDied(Exception):
    pass


@dataclass
class _Launch:
    """How a pool starts its workers (shared by its worker slots)."""

    isolation: str
    privileged: bool
    files: TaskFiles
    runner: str
    preload: tuple[str, ...]
    hide: tuple[str, ...]
    empty_dir: str


class _Worker:
    """One worker process and its private scratch directory (parent side)."""

    # No reference to the pool itself: the pool's finalizer holds the workers, and must not keep it alive.
    def __init__(self, base_dir: str, index: int, launch: _Launch):
        self.index = index
        self.launch = launch
        self.dir = os.path.join(base_dir, f"w{index}")
        self.proc: subprocess.Popen | None = None
        self.ready: dict | None = None
        self.jobs = 0
        self.starts = 0  # processes started in this slot; > 0 before a start means a replacement
        self.stderr_path = os.path.join(base_dir, f"w{index}.stderr")
        self.plan: MountPlan | None = None

    @property
    def isolation(self) -> str:
        return self.launch.isolation

    # paths as the worker sees them
    def sandbox_path(self, host_path: str) -> str:
        if self.isolation == "isolated":
            return self.plan.scratch.rstrip("/") + "/" + os.path.relpath(host_path, self.dir)
        return host_path

    def command(self) -> tuple[list[str], dict[str, str], str]:
        launch = self.launch
        config = {"mode": launch.isolation, "preload": list(launch.preload), "sys_path": list(launch.files.sys_path)}
        if launch.isolation == "isolated":
            self.plan = mount_plan(launch.files, self.dir, launch.empty_dir, launch.runner, launch.hide)
            config["runner"] = self.plan.private + "/runner.py"
            cmd = [view.bwrap_executable(), *_bwrap_base_args(launch.privileged), *self.plan.args, "--",
                   launch.files.executable, "-I", "-S", "-B", self.plan.private + "/worker.py", json.dumps(config)]
            return cmd, _worker_env(self.plan.scratch), "/"
        config["runner"] = os.path.realpath(launch.runner)
        cmd = [launch.files.executable, "-I", "-S", "-B", view.WORKER_SCRIPT, json.dumps(config)]
        return cmd, _worker_env(self.dir), self.dir

    def start(self) -> None:
        os.makedirs(self.dir, exist_ok=True)
        os.chmod(self.dir, 0o755)
        cmd, env, cwd = self.command()
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                env=env,
                cwd=cwd,
                start_new_session=True,
                close_fds=True,
            )
        self.ready = None
        self.jobs = 0
        self.starts += 1

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _read_exact(self, n: int, deadline: float) -> bytes:
        proc = self.proc
        if proc is None:
            raise _WorkerDied("worker was stopped")
        fd = proc.stdout.fileno()
        chunks, got = [], 0
        while got < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            try:
                ready, _, _ = select.select([fd], [], [], remaining)
                chunk = os.read(fd, min(n - got, 1 << 20)) if ready else None
            except (OSError, ValueError) as exc:  # the pipe was closed under us (pool closed)
                raise _WorkerDied(f"worker pipe closed: {exc}") from None
            if chunk is None:
                raise TimeoutError
            if not chunk:
                raise _WorkerDied("worker closed its output")
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def read_frame(self, deadline: float, max_len: int) -> bytes:
        (length,) = _proto.FRAME.unpack(self._read_exact(_proto.FRAME.size, deadline))
        if length > max_len:
            raise _WorkerDied(f"worker sent a frame of {length} bytes (limit {max_len})")
        return self._read_exact(length, deadline)

    def wait_ready(self, timeout: float) -> dict:
        if self.ready is not None:
            return self.ready
        try:
            raw = self.read_frame(time.monotonic() + timeout, 1 << 20)
            msg = json.loads(raw)
            if msg.get("op") != "ready":
                raise _WorkerDied(f"unexpected first message {msg!r}")
        except (TimeoutError, _WorkerDied, ValueError) as exc:
            err = self.stderr_tail()
            self.kill()
            raise SandboxError(f"sandbox worker ({self.isolation}) failed to start ({type(exc).__name__}: {exc}); "
                               f"stderr: {err or '(empty)'}") from None
        failures = list(msg.get("import_failures") or [])
        outside = {f.split(":", 1)[0] for f in self.launch.files.failed}  # these fail without a sandbox too
        inside_only = [f for f in failures if f.split(":", 1)[0] not in outside]
        if inside_only:
            # the worker started but cannot import what imports outside: the sandbox hides something it needs,
            # and every job would fail - an error, not a run that silently scores -1
            self.kill()
            raise SandboxError(f"sandbox worker ({self.isolation}) cannot import what imports outside the sandbox: "
                               f"{'; '.join(inside_only)[:1500]}")
        if failures:
            log.warning("sandbox worker could not preload: %s", failures)
        self.ready = msg
        return msg

    def stderr_tail(self, n: int = 2000) -> str:
        try:
            with open(self.stderr_path, "rb") as fh:
                data = fh.read()[-n:]
            return data.decode(errors="replace").strip()
        except OSError:
            return ""

    def send(self, payload: bytes) -> None:
        proc = self.proc
        if proc is None:
            raise _WorkerDied("worker was stopped")
        try:
            _proto.write_all(proc.stdin.fileno(), _proto.FRAME.pack(len(payload)) + payload)
        except (BrokenPipeError, OSError, ValueError) as exc:
            raise _WorkerDied(f"cannot send job: {exc}") from None

    def kill(self) -> None:
        proc, self.proc, self.ready = self.proc, None, None
        if proc is None:
            return
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # bwrap and everything in its session
        except OSError:
            pass
        try:
            proc.kill()
        except OSError:
            pass
        for stream in (proc.stdin, proc.stdout):
            try:
                stream.close()
            except OSError:
                pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            log.warning("sandbox worker %s did not exit after SIGKILL", proc.pid)

    def stop(self) -> None:
        """Ask the worker to exit, then make sure it has."""
        if self.proc is not None and self.alive():
            try:
                self.send(json.dumps({"op": "exit"}).encode())
                self.proc.wait(timeout=2)
            except (_WorkerDied, subprocess.TimeoutExpired, OSError, AttributeError):
                pass
        self.kill()

    def clear_dir(self) -> None:
        """Empty the scratch directory: nothing a job wrote reaches the next one."""
        try:
            names = os.listdir(self.dir)
        except OSError:
            return
        for name in names:
            _rmtree_hard(os.path.join(self.dir, name))


class SandboxPool:
    """A pool of warm, isolated worker processes that run untrusted code through a :class:`SandboxTask`.

    Args:
        task: what the workers run (runner file, modules to preload and to show).
        n_workers: worker processes (default :func:`default_n_workers`). Workers start lazily on first use
            (or all at once with ``prestart=True``) and are replaced after a timeout, crash or bad reply.
        timeout: default wall-clock seconds per :meth:`run` call.
        memory_limit_mb: default memory budget per call, on top of the warm worker's address space
            (``RLIMIT_AS``; virtual memory, so leave room for allocator slack).
        isolation: ``"auto"``, ``"isolated"``, ``"rlimits"`` or None (``ETPO_SANDBOX``, else ``"auto"``), see
            :func:`resolve_isolation`; or an :class:`Isolation` already resolved.
        cpu_time_limit: CPU seconds per call, all threads together (default ``ceil(timeout) + 1``).
        max_output_mb: cap on captured output and on any single file the code writes (``RLIMIT_FSIZE``).
        max_code_bytes: longest code accepted (longer is an ``"error"`` result without running anything).
        sandbox_uid, sandbox_gid: the unprivileged user the code runs as when the pool runs as root.
        max_processes: ``RLIMIT_NPROC`` in the namespace modes (counts threads too).
        startup_timeout: seconds to wait for a worker's imports.
        grace: extra seconds the parent waits beyond ``timeout`` before killing an unresponsive worker.
    """

    def __init__(
        self,
        task: SandboxTask,
        n_workers: int | None = None,
        timeout: float = 30.0,
        memory_limit_mb: int = 2048,
        *,
        isolation: str | Isolation | None = None,
        cpu_time_limit: int | None = None,
        max_output_mb: int = 32,
        max_code_bytes: int = 1 << 20,
        sandbox_uid: int = 65534,
        sandbox_gid: int = 65534,
        max_processes: int = 256,
        max_open_files: int = 256,
        output_tail_bytes: int = 4000,
        startup_timeout: float = 120.0,
        grace: float = 10.0,
        prestart: bool = False,
    ):
        self.task = task
        self.n_workers = int(n_workers) if n_workers is not None else default_n_workers()
        if self.n_workers < 1:
            raise ValueError("n_workers must be >= 1")
        self.timeout = float(timeout)
        self.memory_limit_mb = int(memory_limit_mb)
        self.cpu_time_limit = cpu_time_limit
        self.max_output_mb = int(max_output_mb)
        self.max_code_bytes = int(max_code_bytes)
        self.sandbox_uid, self.sandbox_gid = int(sandbox_uid), int(sandbox_gid)
        self.max_processes = int(max_processes)
        self.max_open_files = int(max_open_files)
        self.output_tail_bytes = int(output_tail_bytes)
        self.startup_timeout = float(startup_timeout)
        self.grace = float(grace)

        self.isolation_info = isolation if isinstance(isolation, Isolation) else resolve_isolation(
            isolation, source="argument" if isolation is not None else "config")
        self.isolation = self.isolation_info.mode
        files = task_files(tuple(dict.fromkeys((*task.preload, *task.modules))), task.runner)
        if files.failed:
            log.warning("sandbox task %s: modules that do not import here: %s", task.name, list(files.failed))
        hide = tuple(task.hide(files.roots)) if task.hide is not None else ()
        self._privileged = os.geteuid() == 0
        _remove_stale_dirs()
        self._base_dir = tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{os.getpid()}-")
        os.chmod(self._base_dir, 0o755)
        empty = os.path.join(self._base_dir, "empty")
        os.mkdir(empty)
        os.chmod(empty, 0o555)
        self._launch = _Launch(self.isolation, self._privileged, files, task.runner, tuple(task.preload), hide, empty)
        self._workers = [_Worker(self._base_dir, i, self._launch) for i in range(self.n_workers)]
        self._idle: queue.Queue[_Worker] = queue.Queue()
        for w in self._workers:
            self._idle.put(w)
        self._lock = threading.Lock()
        self._closed = False
        self._owner_pid = os.getpid()  # pipes to the workers must not be shared with a forked copy of us
        self._job_counter = 0
        self.stats = {"jobs": 0, "replaced": 0}
        self._finalizer = weakref.finalize(self, SandboxPool._finalize, list(self._workers), self._base_dir, os.getpid())
        _register(self)
        if prestart:
            for w in self._workers:
                w.start()

    # ------------------------------------------------------------------ lifecycle
    @staticmethod
    def _finalize(workers: list[_Worker], base_dir: str, owner_pid: int) -> None:
        if os.getpid() != owner_pid:  # a forked copy exiting: the workers belong to the parent
            return
        for w in workers:
            try:
                w.stop()
            except Exception:  # noqa: BLE001 - best effort at shutdown
                pass
        _rmtree_hard(base_dir)

    def close(self) -> None:
        """Stop every worker and remove the pool's temporary directory (idempotent, callable from any thread)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._finalizer()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def directory(self) -> str:
        """The pool's temporary directory (workers' scratch directories and logs); removed by :meth:`close`."""
        return self._base_dir

    def check(self) -> dict:
        """Start one worker (if none is running) and wait until it is ready; :class:`SandboxError` if it cannot.

        Returns the worker's ``ready`` message (``pid_namespace``, ``uid``, ``import_failures``, ...).
        """
        if self._closed:
            raise SandboxError("the sandbox pool is closed")
        worker = self._idle.get()
        try:
            if not worker.alive():
                worker.kill()
                worker.start()
            return dict(worker.wait_ready(self.startup_timeout))
        finally:
            self._idle.put(worker)

    def __enter__(self) -> "SandboxPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(task={self.task.name!r}, n_workers={self.n_workers}, "
                f"isolation={self.isolation!r}, closed={self._closed})")

    # ------------------------------------------------------------------ jobs
    def run(
        self,
        code: str,
        inputs: Mapping[str, np.ndarray],
        *,
        params: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        memory_limit_mb: int | None = None,
        max_result_values: int = 1 << 20,
    ) -> SandboxResult:
        """Run ``code`` through the task's runner in a worker; return the array it produces.

        ``inputs``: numeric arrays by name (``.npy`` without pickle); ``params``: JSON-serialisable options for
        the runner; ``max_result_values``: the largest result accepted. Thread-safe; blocks until a worker is
        free. Never raises for anything the code does (only :class:`SandboxError` for a closed pool or a worker
        that cannot start).
        """
        if self._closed:
            raise SandboxError("the sandbox pool is closed")
        if os.getpid() != self._owner_pid:
            raise SandboxError("this SandboxPool belongs to another process (used after fork); create a new pool")
        timeout = self.timeout if timeout is None else float(timeout)
        memory_mb = self.memory_limit_mb if memory_limit_mb is None else int(memory_limit_mb)
        arrays = {name: np.ascontiguousarray(a) for name, a in inputs.items()}
        for name, arr in arrays.items():
            if arr.dtype.kind not in "biuf":  # .npy without pickle: numbers only
                raise ValueError(f"input {name!r} must be a numeric array, got dtype {arr.dtype}")
        t0 = time.monotonic()
        if not isinstance(code, str) or len(code.encode("utf-8", errors="surrogatepass")) > self.max_code_bytes:
            size = len(code) if isinstance(code, str) else type(code).__name__
            return SandboxResult(status="error", error=f"the code is too long ({size} characters; the sandbox takes at "
                                 f"most {self.max_code_bytes} bytes)", isolation=self.isolation)
        max_result = max(1 << 20, int(max_result_values) * 8)
        worker = self._idle.get()
        replaced = False
        try:
            if self._closed:
                raise SandboxError("the sandbox pool is closed")
            if not worker.alive():
                worker.kill()  # reap a worker that died while idle (no-op if already killed)
                replaced = worker.starts > 0
                worker.start()
            try:
                worker.wait_ready(self.startup_timeout)
            except SandboxError:
                if self._closed:  # close() from another thread while the worker started: say so, not "failed"
                    raise SandboxError("the sandbox pool was closed while its worker started") from None
                raise
            with self._lock:
                self._job_counter += 1
                job_name = f"job{self._job_counter:07d}"
            job_dir = os.path.join(worker.dir, job_name)
            os.mkdir(job_dir)
            os.chmod(job_dir, 0o755)  # explicit: independent of the caller's umask
            # Uncompressed .npz in the job directory: one write, read back from the page cache by the child
            # (which deletes it); the worker process itself never holds the data.
            input_path = os.path.join(job_dir, "input.npz")
            np.savez(input_path, **arrays)
            os.chmod(input_path, 0o644)
            privileged_isolated = self.isolation == "isolated" and self._privileged
            if privileged_isolated:
                os.chown(job_dir, self.sandbox_uid, self.sandbox_gid)
            spec = {
                "job_dir": worker.sandbox_path(job_dir),
                "code": code,
                "params": dict(params or {}),
                "timeout": timeout,
                "memory_bytes": memory_mb * _MB,
                "cpu_seconds": int(self.cpu_time_limit or (int(np.ceil(timeout)) + 1)),
                "fsize_bytes": self.max_output_mb * _MB,
                "nofile": self.max_open_files,
                "nproc": self.max_processes if self.isolation == "isolated" else None,
                "max_result_bytes": max_result,
                "output_tail_bytes": self.output_tail_bytes,
                "uid": self.sandbox_uid if privileged_isolated else None,
                "gid": self.sandbox_gid if privileged_isolated else None,
            }
            payload = json.dumps(spec).encode()
            try:
                try:
                    worker.send(payload)
                except _WorkerDied:
                    if self._closed:
                        raise
                    # died before the job reached it (not the code's doing): one retry on a fresh worker
                    worker.kill()
                    worker.start()
                    replaced = True
                    worker.wait_ready(self.startup_timeout)
                    worker.send(payload)
                raw = worker.read_frame(time.monotonic() + timeout + self.grace, max_result + (2 << 20))
                header, body = self._parse_reply(raw)
            except TimeoutError:
                worker.kill()
                replaced = True
                header, body = {"status": "timeout", "error": f"timed out after {timeout:g} s (worker unresponsive)"}, b""
            except _WorkerDied as exc:
                worker.kill()
                replaced = True
                if self._closed:
                    header = {"status": "error", "error": "the sandbox pool was closed while the code ran"}
                else:
                    header = {"status": "error", "error": f"the sandbox worker died while running the code ({exc}); "
                              "did the code kill its own process or exhaust a limit?"}
                body = b""
            finally:
                worker.clear_dir()
            worker.jobs += 1
        finally:
            self._idle.put(worker)
        result = SandboxResult(
            status=header.get("status", "error"),
            error=header.get("error"),
            stdout=header.get("stdout", "") or "",
            duration=float(header.get("duration", 0.0) or 0.0),
            worker_replaced=replaced,
            isolation=self.isolation,
        )
        if result.status == "ok":
            output, err = self._load_array(body)
            if err is not None:
                result.status, result.error, output = "error", err, None
            result.output = output
        elif result.status not in ("error", "timeout"):
            result.status, result.error = "error", f"unexpected sandbox status {result.status!r}"
        result.wall_time = time.monotonic() - t0
        with self._lock:
            self.stats["jobs"] += 1
            self.stats["replaced"] += int(replaced)
        return result

    @staticmethod
    def _parse_reply(raw: bytes) -> tuple[dict, bytes]:
        try:
            (hlen,) = _proto.HEADER.unpack_from(raw)
            header = json.loads(raw[_proto.HEADER.size : _proto.HEADER.size + hlen])
            if not isinstance(header, dict):
                raise ValueError("header is not an object")
        except Exception as exc:  # noqa: BLE001 - any malformed reply
            raise _WorkerDied(f"malformed reply: {exc}") from None
        for key in ("error", "stdout"):
            if header.get(key) is not None and not isinstance(header[key], str):
                header[key] = str(header[key])
        return header, raw[_proto.HEADER.size + hlen :]

    @staticmethod
    def _load_array(body: bytes) -> tuple[np.ndarray | None, str | None]:
        try:
            arr = np.load(io.BytesIO(body), allow_pickle=False)
        except Exception as exc:  # noqa: BLE001 - anything unparsable is the code's fault
            return None, f"the result could not be read back: {exc}"
        if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "biuf":
            return None, "the result is not a numeric array"
        return arr.astype(np.float64, copy=False), None


# ---------------------------------------------------------------------------------------------------
# pools of this process: what they use, default pools, shutdown

_LIVE: "weakref.WeakSet[SandboxPool]" = weakref.WeakSet()
# (task, mode) -> (sequence number, isolation) of the latest pool created or requested here
_USED: dict[tuple[str, str], tuple[int, Isolation]] = {}
_SEQUENCE = [0]
_REGISTRY_LOCK = threading.RLock()  # re-entered: a pool created by get_default_pool registers itself
_DEFAULT_POOLS: dict[tuple[str, str], SandboxPool] = {}
_STOPPING = False


def _register(pool: SandboxPool) -> None:
    with _REGISTRY_LOCK:
        _LIVE.add(pool)
        _note_use(pool.task.name, pool.isolation_info)


def _note_use(task: str, iso: Isolation) -> None:
    with _REGISTRY_LOCK:
        _SEQUENCE[0] += 1
        _USED[(task, iso.mode)] = (_SEQUENCE[0], iso)


def isolation_mark() -> int:
    """A point in this process's sandbox history: :func:`isolation_report` ``(since=mark)`` covers what came after."""
    with _REGISTRY_LOCK:
        return _SEQUENCE[0]


def isolation_report(since: int = 0) -> dict | None:
    """What the sandbox pools created (or requested) in this process since ``since`` (:func:`isolation_mark`) use;
    None if there were none.

    ``{"isolation": "isolated" | "rlimits" | "mixed", "pools": [{"task", "mode", "requested", "source",
    "detail"}, ...]}`` - written to a run's log, ``summary.json`` and TensorBoard by :mod:`etpo.fit`.
    """
    with _REGISTRY_LOCK:
        used = [{"task": task, **iso.as_dict()} for (task, _), (seq, iso) in _USED.items() if seq > since]
    if not used:
        return None
    modes = {u["mode"] for u in used}
    return {"isolation": modes.pop() if len(modes) == 1 else "mixed", "pools": used}


def get_default_pool(task: SandboxTask, isolation: str | Isolation | None = None, factory: Callable[..., SandboxPool] | None = None,
                     **kwargs: Any) -> SandboxPool:
    """The process-wide pool for ``task`` and the isolation ``isolation`` resolves to (created lazily, closed at exit).

    ``factory`` builds it (default :class:`SandboxPool`; a task's own pool class otherwise) with ``kwargs``; the
    size can be set before first use with ``ETPO_SANDBOX_WORKERS``. Raises :class:`SandboxError` after
    :func:`close_all_pools` (the process is shutting down) or when the isolation cannot be had.
    """
    iso = isolation if isinstance(isolation, Isolation) else resolve_isolation(isolation)
    key = (task.name, iso.mode)
    with _REGISTRY_LOCK:
        if _STOPPING:
            raise SandboxError("sandbox pools are shut down (the run is stopping)")
        pool = _DEFAULT_POOLS.get(key)
        if pool is not None and pool._owner_pid != os.getpid():
            pool = None  # inherited through fork: the parent's workers are not ours to use or close
        if pool is None or pool.closed:
            n = os.environ.get("ETPO_SANDBOX_WORKERS")
            kwargs.setdefault("n_workers", int(n) if n else None)
            if factory is None:
                pool = SandboxPool(task, isolation=iso, **kwargs)
            else:
                pool = factory(isolation=iso, **kwargs)
            _DEFAULT_POOLS[key] = pool
        _note_use(task.name, iso)  # the latest request: what the report names as the source
        return pool


def close_all_pools(*, final: bool = False) -> None:
    """Close every pool of this process: workers killed, directories removed (idempotent).

    In-flight :meth:`SandboxPool.run` calls return an ``"error"`` result promptly. With ``final=True`` no
    default pool is created afterwards (used when a run is stopping and at exit).
    """
    global _STOPPING
    with _REGISTRY_LOCK:
        if final:
            _STOPPING = True
        pools = [p for p in list(_LIVE) if p._owner_pid == os.getpid()]
        _DEFAULT_POOLS.clear()
    for pool in pools:
        try:
            pool.close()
        except Exception:  # noqa: BLE001 - best effort: the others must still close
            log.exception("closing a sandbox pool failed")


atexit.register(close_all_pools, final=True)
