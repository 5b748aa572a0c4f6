"""Isolated, warm worker processes that run generated scikit-learn code.

:class:`SandboxPool` keeps ``n_workers`` worker processes (:mod:`envs._sandbox_worker`) that have numpy and
scikit-learn imported already; :meth:`SandboxPool.evaluate` sends one job (code + ``x_train``, ``y_train``,
``x_val``) to a free worker, which runs it in a forked, resource-limited child and returns the
``predict_proba(x_val)`` array. Validation *labels* are never sent: scoring happens in the caller's process.
``evaluate`` is thread-safe (``TextVectorEnv`` threads call it concurrently) and blocks in ``select``, which
releases the GIL.

Isolation layers (``isolation="auto"`` picks the strongest available and warns once when it falls back):

``"bwrap"`` (Linux with bubblewrap)
    Each worker runs under ``bwrap`` with its own PID, network (no interfaces but loopback: no route out),
    IPC, UTS and cgroup namespaces, ``--die-with-parent`` and ``--new-session``, and a *minimal* read-only
    view of the filesystem: ``/usr`` (+ the ``/bin``, ``/lib*`` links), the dynamic-loader cache, the Python
    installation and the site-packages that hold numpy/scikit-learn, the worker script, fresh ``/dev`` and
    ``/proc``, and a per-worker directory as ``/tmp`` in which every job gets a fresh directory (removed
    afterwards); the root itself is remounted read-only, so ``/tmp`` is the only writable place. A plain
    ``--ro-bind / /`` is deliberately *not* used: the dataset files (with every label) and the user's files
    would be readable from generated code.

    As root (the project machines run everything as root) bwrap runs in its privileged mode without a user
    namespace and the worker keeps only ``CAP_SETUID``, ``CAP_SETGID`` and ``CAP_KILL``; each job child then
    switches to the unprivileged ``sandbox_uid``/``sandbox_gid`` (65534 = nobody) for real. This matters:
    ``--unshare-user --uid 65534`` would only *map* the code to root, and the kernel exempts the root user
    from ``RLIMIT_NPROC`` and grants it owner access to every root-owned file. Without root, bwrap uses an
    unprivileged user namespace (``--unshare-user --uid 65534 --gid 65534``); the code then runs as the
    caller's uid seen as 65534 (the seccomp filter forbids creating further namespaces).
``"rlimits"`` (fallback)
    A plain subprocess in its own session, with the same per-job limits, seccomp filter and, as root, all
    capabilities dropped - but the code sees the real filesystem and network.

Per-job limits, applied in the job child (see :mod:`envs._sandbox_worker`): wall-clock ``timeout`` (the
worker kills the child and, inside the PID namespace, every other process; the parent kills the whole worker
process group if the worker itself does not answer within ``timeout + grace``), ``RLIMIT_AS`` (memory
budget on top of the warm worker's address space), ``RLIMIT_CPU``, ``RLIMIT_FSIZE`` (also caps captured
output), ``RLIMIT_NOFILE``, ``RLIMIT_NPROC`` (namespace modes), a seccomp filter that forbids creating
processes (threads are fine), signalling other processes, ptrace and cross-process memory access, and a
scrubbed environment (``PATH``, ``HOME=TMPDIR=<job dir>``, one BLAS/OpenMP thread, joblib without
multiprocessing). Results come back as ``.npy`` bytes parsed with ``allow_pickle=False``; nothing from the
sandbox is ever unpickled. An ordinary timeout only kills the job child (the warm worker survives); a worker
that stops answering, dies or sends a malformed reply is killed and replaced.

Known limits: the disk space a job can fill in its directory is bounded by ``RLIMIT_FSIZE`` per file and by
the timeout, not in total (everything is deleted after the job); ``RLIMIT_AS`` counts virtual memory, not
resident memory; in the rlimits fallback the code can read and write whatever the caller's user can, reach
the network, and (same uid) read the caller's memory through ``/proc``.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import queue
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _sandbox_worker as _proto

__all__ = [
    "SandboxPool",
    "SandboxResult",
    "SandboxError",
    "validate_proba",
    "bwrap_available",
    "default_n_workers",
    "get_default_pool",
    "shutdown_default_pool",
]

log = logging.getLogger(__name__)

_WORKER_SCRIPT = os.path.abspath(_proto.__file__)
_WORKER_IN_SANDBOX = "/opt/etpo_sandbox/worker.py"  # where the script is bound inside bubblewrap
_MB = 1 << 20


class SandboxError(RuntimeError):
    """The sandbox itself cannot work (worker does not start, bwrap requested but unusable, pool closed)."""


@dataclass
class SandboxResult:
    """Outcome of one :meth:`SandboxPool.evaluate` call.

    ``status`` is ``"ok"`` (``proba`` holds the validated ``predict_proba`` output), ``"error"`` (the code
    raised, crashed, hit a limit, or returned unusable output; ``error`` says what) or ``"timeout"``.
    ``stdout`` is the tail of the code's captured stdout+stderr; ``duration`` the child's run time and
    ``wall_time`` the whole call as seen by the caller (both seconds). ``worker_replaced``: this call started
    a new worker process in place of one that had died or been killed, or killed an unresponsive one.
    """

    status: str
    proba: np.ndarray | None = None
    error: str | None = None
    stdout: str = ""
    duration: float = 0.0
    wall_time: float = 0.0
    worker_replaced: bool = False
    isolation: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def validate_proba(proba: np.ndarray, n_rows: int, n_classes: int, atol: float = 1e-3) -> str | None:
    """Check a ``predict_proba`` output; return an error message, or None when it is usable.

    Required: a 2-D array of shape ``(n_rows, n_classes)`` (no 1-D binary shortcut is accepted, so a model
    that returns hard labels is caught), finite, within [0, 1], each row summing to 1 within ``atol``.
    """
    proba = np.asarray(proba)
    if proba.ndim != 2 or proba.shape != (n_rows, n_classes):
        return (
            f"predict_proba must return an array of shape (n_samples, n_classes) = ({n_rows}, {n_classes}); "
            f"got shape {proba.shape}"
        )
    if not np.all(np.isfinite(proba)):
        return "predict_proba returned NaN or infinite values"
    if proba.min() < -atol or proba.max() > 1 + atol:
        return f"predict_proba returned values outside [0, 1] (min {proba.min():.4g}, max {proba.max():.4g})"
    sums = proba.sum(axis=1)
    if not np.allclose(sums, 1.0, atol=atol, rtol=0):
        bad = int(np.argmax(np.abs(sums - 1.0)))
        return f"predict_proba rows must sum to 1; row {bad} sums to {sums[bad]:.4g}"
    return None


def default_n_workers() -> int:
    """Workers for the default pool: one per available CPU, between 2 and 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 2
    return max(2, min(8, cpus))


_BWRAP_PROBE: dict[str, Any] = {}
_BWRAP_LOCK = threading.Lock()


def _bwrap_base_args(privileged: bool) -> list[str]:
    args = [
        "--unshare-pid",
        "--unshare-net",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--die-with-parent",
        "--new-session",
        "--hostname",
        "sandbox",
    ]
    if privileged:
        args += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_KILL"]
    else:
        # unprivileged: bwrap needs a user namespace; seccomp in the job child forbids nesting another one
        args += ["--unshare-user", "--uid", "65534", "--gid", "65534", "--cap-drop", "ALL"]
    return args


def _python_paths() -> list[str]:
    """Directories the worker's interpreter needs: the installation and the site-packages of its imports."""
    import numpy
    import scipy
    import sklearn

    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    exe = os.path.realpath(sys.executable)
    paths.add(os.path.dirname(os.path.dirname(exe)))
    for mod in (numpy, scipy, sklearn):
        paths.add(os.path.dirname(os.path.dirname(os.path.abspath(mod.__file__))))
    for name in ("joblib", "threadpoolctl"):
        mod = sys.modules.get(name)
        if mod is None:
            try:
                mod = __import__(name)
            except ImportError:
                continue
        paths.add(os.path.dirname(os.path.abspath(mod.__file__)))
    expanded = set()
    for p in paths:
        for q in (os.path.abspath(p), os.path.realpath(p)):
            if os.path.isdir(q) and q != "/":
                expanded.add(q.rstrip("/"))
    # keep only outermost directories
    out: list[str] = []
    for p in sorted(expanded, key=len):
        if not any(p == q or p.startswith(q + "/") for q in out):
            out.append(p)
    return out


def _filesystem_args(worker_dir: str) -> list[str]:
    """bwrap arguments for the minimal read-only filesystem view (see module docstring)."""
    args: list[str] = []
    covered: list[str] = []  # destinations that exist in the sandbox (bound trees)
    for d in ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(d):
            args += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            args += ["--ro-bind", d, d]
            covered.append(d)
    args += ["--perms", "0755", "--dir", "/etc"]
    for f in ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime"):
        if os.path.exists(f):
            args += ["--ro-bind", f, f]
    made: set[str] = {"/etc"}

    def under_covered(p: str) -> bool:
        return any(p == c or p.startswith(c + "/") for c in covered)

    def make_parents(p: str) -> None:
        # bubblewrap creates missing parents with mode 0700, which the unprivileged code could not traverse
        parts = p.strip("/").split("/")[:-1]
        cur = ""
        for part in parts:
            cur += "/" + part
            if cur in made or under_covered(cur):
                continue
            args.extend(["--perms", "0755", "--dir", cur])
            made.add(cur)

    for p in _python_paths():
        if under_covered(p):
            continue
        make_parents(p)
        args += ["--ro-bind", p, p]
        covered.append(p)
    make_parents(_WORKER_IN_SANDBOX)
    args += ["--ro-bind", _WORKER_SCRIPT, _WORKER_IN_SANDBOX]
    args += ["--bind", worker_dir, "/tmp", "--dev", "/dev", "--proc", "/proc", "--chdir", "/tmp"]
    # the root is bwrap's own tmpfs: make it read-only too, so only /tmp (the worker directory) is writable
    args += ["--remount-ro", "/"]
    return args


def bwrap_available() -> tuple[bool, str]:
    """Whether bubblewrap can start a sandbox here (probed once per process); returns ``(ok, reason)``."""
    with _BWRAP_LOCK:
        if "ok" in _BWRAP_PROBE:
            return _BWRAP_PROBE["ok"], _BWRAP_PROBE["reason"]
        exe = shutil.which("bwrap")
        if exe is None:
            ok, reason = False, "bubblewrap (bwrap) is not installed"
        elif not sys.platform.startswith("linux"):
            ok, reason = False, "bubblewrap needs Linux"
        else:
            probe_dir = tempfile.mkdtemp(prefix="etpo-bwrap-probe-")
            try:
                cmd = [exe, *_bwrap_base_args(os.geteuid() == 0), *_filesystem_args(probe_dir), "--", sys.executable, "-I", "-c", "pass"]
                proc = subprocess.run(cmd, capture_output=True, timeout=60, env=_worker_env("/tmp"))
                ok = proc.returncode == 0
                reason = "ok" if ok else f"bwrap failed: {proc.stderr.decode(errors='replace').strip()[:500]}"
            except (OSError, subprocess.SubprocessError) as exc:
                ok, reason = False, f"bwrap failed: {exc}"
            finally:
                shutil.rmtree(probe_dir, ignore_errors=True)
        _BWRAP_PROBE.update(ok=ok, reason=reason, exe=exe)
        return ok, reason


def _worker_env(home: str) -> dict[str, str]:
    """The scrubbed environment of a worker: nothing is inherited from the caller."""
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": home,
        "TMPDIR": home,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "MPLBACKEND": "Agg",
        "MPLCONFIGDIR": home,
        # JOBLIB_MULTIPROCESSING=0 makes joblib run process-parallel code sequentially (process creation is
        # forbidden in the sandbox); LOKY_MAX_CPU_COUNT=1 turns n_jobs=-1 into one job.
        "JOBLIB_MULTIPROCESSING": "0",
        "LOKY_MAX_CPU_COUNT": "1",
    }
    for var in (
        "OMP_NUM_THREADS",
        "OPENBLAS_NUM_THREADS",
        "MKL_NUM_THREADS",
        "BLIS_NUM_THREADS",
        "NUMEXPR_NUM_THREADS",
        "VECLIB_MAXIMUM_THREADS",
    ):
        env[var] = "1"
    return env


def _rmtree_hard(path: str) -> None:
    """Remove ``path`` even if the code made parts of it unreadable (chmod 000)."""

    def onerror(func, p, exc_info):  # noqa: ARG001
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
        except OSError:
            pass
        try:
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p, ignore_errors=True)
            else:
                os.unlink(p)
        except OSError:
            pass

    if os.path.lexists(path):
        shutil.rmtree(path, onerror=onerror)


_DIR_PREFIX = "etpo-sandbox-"
_STALE_CHECKED = False


def _remove_stale_dirs() -> None:
    """Remove pool directories left by processes that were killed before they could clean up (once per process)."""
    global _STALE_CHECKED
    if _STALE_CHECKED:
        return
    _STALE_CHECKED = True
    root = tempfile.gettempdir()
    try:
        names = os.listdir(root)
    except OSError:
        return
    for name in names:
        if not name.startswith(_DIR_PREFIX):
            continue
        pid = name[len(_DIR_PREFIX) :].split("-", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            _rmtree_hard(os.path.join(root, name))
        except OSError:
            pass  # alive (owned by someone else): leave it


class _WorkerDied(Exception):
    pass


class _Worker:
    """One worker process and its private directory (parent side)."""

    # No reference to the pool itself: the pool's finalizer holds the workers, and must not keep it alive.
    def __init__(self, base_dir: str, index: int, isolation: str, privileged: bool):
        self.index = index
        self.isolation = isolation
        self.privileged = privileged
        self.dir = os.path.join(base_dir, f"w{index}")
        self.proc: subprocess.Popen | None = None
        self.ready: dict | None = None
        self.jobs = 0
        self.starts = 0  # processes started in this slot; > 0 before a start means a replacement
        self.stderr_path = os.path.join(base_dir, f"w{index}.stderr")

    # paths as the worker sees them
    def _sandbox_path(self, host_path: str) -> str:
        if self.isolation == "bwrap":
            return "/tmp/" + os.path.relpath(host_path, self.dir)
        return host_path

    def start(self) -> None:
        os.makedirs(self.dir, exist_ok=True)
        os.chmod(self.dir, 0o755)
        if self.isolation == "bwrap":
            cmd = [
                _BWRAP_PROBE["exe"],
                *_bwrap_base_args(self.privileged),
                *_filesystem_args(self.dir),
                "--",
                sys.executable,
                "-I",
                "-B",
                _WORKER_IN_SANDBOX,
                "--mode",
                "bwrap",
            ]
            env = _worker_env("/tmp")
            cwd = "/"
        else:
            cmd = [sys.executable, "-I", "-B", _WORKER_SCRIPT, "--mode", "rlimits"]
            env = _worker_env(self.dir)
            cwd = self.dir
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
        fd = self.proc.stdout.fileno()
        chunks, got = [], 0
        while got < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                raise TimeoutError
            chunk = os.read(fd, min(n - got, 1 << 20))
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
            raise SandboxError(f"sandbox worker failed to start ({type(exc).__name__}: {exc}); stderr: {err}") from None
        self.ready = msg
        if msg.get("import_failures"):
            log.warning("sandbox worker could not preload: %s", msg["import_failures"])
        return msg

    def stderr_tail(self, n: int = 2000) -> str:
        try:
            with open(self.stderr_path, "rb") as fh:
                data = fh.read()[-n:]
            return data.decode(errors="replace").strip()
        except OSError:
            return ""

    def send(self, payload: bytes) -> None:
        fd = self.proc.stdin.fileno()
        try:
            _proto.write_all(fd, _proto.FRAME.pack(len(payload)) + payload)
        except (BrokenPipeError, OSError) as exc:
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
            except (_WorkerDied, subprocess.TimeoutExpired, OSError):
                pass
        self.kill()

    def clear_dir(self) -> None:
        try:
            names = os.listdir(self.dir)
        except OSError:
            return
        for name in names:
            _rmtree_hard(os.path.join(self.dir, name))


class SandboxPool:
    """A pool of warm, isolated worker processes that run generated ``build_model`` code.

    Args:
        n_workers: worker processes (default :func:`default_n_workers`). Workers start lazily on first use
            (or all at once with ``prestart=True``) and are replaced after a timeout, crash or bad reply.
        timeout: default wall-clock seconds per :meth:`evaluate` call.
        memory_limit_mb: default memory budget per call, on top of the warm worker's address space
            (``RLIMIT_AS``; virtual memory, so leave room for allocator slack).
        cpu_time_limit: CPU seconds per call (default ``ceil(timeout) + 1``).
        max_output_mb: cap on captured output and on any single file the code writes (``RLIMIT_FSIZE``).
        isolation: ``"auto"`` (bubblewrap when it works, else ``"rlimits"`` with a warning), ``"bwrap"``
            (raise :class:`SandboxError` if unusable) or ``"rlimits"``.
        sandbox_uid, sandbox_gid: the unprivileged user the code runs as when the pool runs as root.
        max_processes: ``RLIMIT_NPROC`` in the namespace modes (counts threads too).
        startup_timeout: seconds to wait for a worker's imports.
        grace: extra seconds the parent waits beyond ``timeout`` before killing an unresponsive worker.
    """

    def __init__(
        self,
        n_workers: int | None = None,
        timeout: float = 30.0,
        memory_limit_mb: int = 2048,
        *,
        cpu_time_limit: int | None = None,
        max_output_mb: int = 32,
        isolation: str = "auto",
        sandbox_uid: int = 65534,
        sandbox_gid: int = 65534,
        max_processes: int = 256,
        max_open_files: int = 256,
        output_tail_bytes: int = 4000,
        startup_timeout: float = 120.0,
        grace: float = 10.0,
        prestart: bool = False,
    ):
        if isolation not in ("auto", "bwrap", "rlimits"):
            raise ValueError(f"isolation must be 'auto', 'bwrap' or 'rlimits', got {isolation!r}")
        self.n_workers = int(n_workers) if n_workers is not None else default_n_workers()
        if self.n_workers < 1:
            raise ValueError("n_workers must be >= 1")
        self.timeout = float(timeout)
        self.memory_limit_mb = int(memory_limit_mb)
        self.cpu_time_limit = cpu_time_limit
        self.max_output_mb = int(max_output_mb)
        self.sandbox_uid, self.sandbox_gid = int(sandbox_uid), int(sandbox_gid)
        self.max_processes = int(max_processes)
        self.max_open_files = int(max_open_files)
        self.output_tail_bytes = int(output_tail_bytes)
        self.startup_timeout = float(startup_timeout)
        self.grace = float(grace)

        if isolation in ("auto", "bwrap"):
            ok, reason = bwrap_available()
            if not ok and isolation == "bwrap":
                raise SandboxError(f"isolation='bwrap' requested but unusable: {reason}")
            if not ok:
                _warn_once(
                    "envs.sandbox: bubblewrap is unavailable (" + reason + "); generated code runs with "
                    "resource limits and a seccomp filter only - no filesystem, network or PID isolation. "
                    "Install bubblewrap (apt-get install bubblewrap) for full isolation."
                )
            isolation = "bwrap" if ok else "rlimits"
        self.isolation = isolation
        self._privileged = os.geteuid() == 0
        _remove_stale_dirs()
        self._base_dir = tempfile.mkdtemp(prefix=f"{_DIR_PREFIX}{os.getpid()}-")
        os.chmod(self._base_dir, 0o755)
        self._workers = [_Worker(self._base_dir, i, self.isolation, self._privileged) for i in range(self.n_workers)]
        self._idle: queue.Queue[_Worker] = queue.Queue()
        for w in self._workers:
            self._idle.put(w)
        self._lock = threading.Lock()
        self._closed = False
        self._owner_pid = os.getpid()  # pipes to the workers must not be shared with a forked copy of us
        self._job_counter = 0
        self.stats = {"jobs": 0, "replaced": 0}
        self._finalizer = weakref.finalize(self, SandboxPool._finalize, list(self._workers), self._base_dir, os.getpid())
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
        """Stop every worker and remove the pool's temporary directory (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._finalizer()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> "SandboxPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SandboxPool(n_workers={self.n_workers}, isolation={self.isolation!r}, closed={self._closed})"

    # ------------------------------------------------------------------ evaluation
    def evaluate(
        self,
        code: str,
        x_train: np.ndarray,
        y_train: np.ndarray,
        x_val: np.ndarray,
        *,
        n_classes: int | None = None,
        timeout: float | None = None,
        memory_limit_mb: int | None = None,
        function: str = "build_model",
    ) -> SandboxResult:
        """Run ``code`` in a worker: ``model = build_model(x_train, y_train)``; return ``model.predict_proba(x_val)``.

        With ``n_classes`` the output is checked by :func:`validate_proba` (status ``"error"`` if unusable).
        Thread-safe; blocks until a worker is free. Never raises for anything the code does.
        """
        if self._closed:
            raise SandboxError("the sandbox pool is closed")
        if os.getpid() != self._owner_pid:
            raise SandboxError("this SandboxPool belongs to another process (used after fork); create a new pool")
        timeout = self.timeout if timeout is None else float(timeout)
        memory_mb = self.memory_limit_mb if memory_limit_mb is None else int(memory_limit_mb)
        x_train, y_train, x_val = (np.ascontiguousarray(a) for a in (x_train, y_train, x_val))
        for name, arr in (("x_train", x_train), ("y_train", y_train), ("x_val", x_val)):
            if arr.dtype.kind not in "biuf":  # .npy without pickle: numbers only
                raise ValueError(f"{name} must be a numeric array, got dtype {arr.dtype}")
        n_val = int(x_val.shape[0])
        expected = n_val * (n_classes if n_classes else 64)
        max_result = max(1 << 20, expected * 8 * 4)
        t0 = time.monotonic()
        worker = self._idle.get()
        replaced = False
        try:
            if self._closed:
                raise SandboxError("the sandbox pool is closed")
            if not worker.alive():
                worker.kill()  # reap a worker that died while idle (no-op if already killed)
                replaced = worker.starts > 0
                worker.start()
            worker.wait_ready(self.startup_timeout)
            with self._lock:
                self._job_counter += 1
                job_name = f"job{self._job_counter:07d}"
            job_dir = os.path.join(worker.dir, job_name)
            os.mkdir(job_dir)
            os.chmod(job_dir, 0o755)  # explicit: independent of the caller's umask
            # Uncompressed .npz in the job directory: one write, read back from the page cache by the child
            # (which deletes it); the worker process itself never holds the data.
            input_path = os.path.join(job_dir, "input.npz")
            np.savez(input_path, x_train=x_train, y_train=y_train, x_val=x_val)
            os.chmod(input_path, 0o644)
            privileged_bwrap = self.isolation == "bwrap" and self._privileged
            if privileged_bwrap:
                os.chown(job_dir, self.sandbox_uid, self.sandbox_gid)
            spec = {
                "job_dir": worker._sandbox_path(job_dir),
                "code": code,
                "function": function,
                "timeout": timeout,
                "memory_bytes": memory_mb * _MB,
                "cpu_seconds": int(self.cpu_time_limit or (int(np.ceil(timeout)) + 1)),
                "fsize_bytes": self.max_output_mb * _MB,
                "nofile": self.max_open_files,
                "nproc": self.max_processes if self.isolation == "bwrap" else None,
                "max_result_bytes": max_result,
                "output_tail_bytes": self.output_tail_bytes,
                "uid": self.sandbox_uid if privileged_bwrap else None,
                "gid": self.sandbox_gid if privileged_bwrap else None,
            }
            try:
                try:
                    worker.send(json.dumps(spec).encode())
                except _WorkerDied:
                    # died before the job reached it (not the code's doing): one retry on a fresh worker
                    worker.kill()
                    worker.start()
                    replaced = True
                    worker.wait_ready(self.startup_timeout)
                    worker.send(json.dumps(spec).encode())
                raw = worker.read_frame(time.monotonic() + timeout + self.grace, max_result + (2 << 20))
                header, body = self._parse_reply(raw)
            except TimeoutError:
                worker.kill()
                replaced = True
                header, body = {"status": "timeout", "error": f"timed out after {timeout:g} s (worker unresponsive)"}, b""
            except _WorkerDied as exc:
                worker.kill()
                replaced = True
                header = {
                    "status": "error",
                    "error": f"the sandbox worker died while running the code ({exc}); "
                    "did the code kill its own process or exhaust a limit?",
                }
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
            proba, err = self._load_proba(body)
            if err is None and n_classes is not None:
                err = validate_proba(proba, n_val, int(n_classes))
            if err is not None:
                result.status, result.error, proba = "error", err, None
            result.proba = proba
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
        except (ValueError, TypeError, Exception) as exc:  # noqa: BLE001 - any malformed reply
            raise _WorkerDied(f"malformed reply: {exc}") from None
        for key in ("error", "stdout"):
            if header.get(key) is not None and not isinstance(header[key], str):
                header[key] = str(header[key])
        return header, raw[_proto.HEADER.size + hlen :]

    @staticmethod
    def _load_proba(body: bytes) -> tuple[np.ndarray | None, str | None]:
        import io

        try:
            arr = np.load(io.BytesIO(body), allow_pickle=False)
        except Exception as exc:  # noqa: BLE001 - anything unparsable is the code's fault
            return None, f"predict_proba output could not be read back: {exc}"
        if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "biuf":
            return None, "predict_proba output is not a numeric array"
        return arr.astype(np.float64, copy=False), None


# ---------------------------------------------------------------------------------------------------
# module-level default pool

_WARNED: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


_DEFAULT_POOL: SandboxPool | None = None
_DEFAULT_LOCK = threading.Lock()


def get_default_pool() -> SandboxPool:
    """The process-wide pool shared by environments that are not given one (created lazily, closed at exit).

    Size and isolation can be set before first use with ``ETPO_SANDBOX_WORKERS`` and ``ETPO_SANDBOX_ISOLATION``.
    """
    global _DEFAULT_POOL
    with _DEFAULT_LOCK:
        if _DEFAULT_POOL is not None and _DEFAULT_POOL._owner_pid != os.getpid():
            _DEFAULT_POOL = None  # inherited through fork: the parent's workers are not ours to use or close
        if _DEFAULT_POOL is None or _DEFAULT_POOL.closed:
            n = os.environ.get("ETPO_SANDBOX_WORKERS")
            _DEFAULT_POOL = SandboxPool(
                n_workers=int(n) if n else None,
                isolation=os.environ.get("ETPO_SANDBOX_ISOLATION", "auto"),
            )
        return _DEFAULT_POOL


def shutdown_default_pool() -> None:
    """Close the default pool (registered with ``atexit``)."""
    global _DEFAULT_POOL
    with _DEFAULT_LOCK:
        pool, _DEFAULT_POOL = _DEFAULT_POOL, None
    if pool is not None and pool._owner_pid == os.getpid():
        pool.close()


atexit.register(shutdown_default_pool)
