"""Process isolation for untrusted code: warm, sandboxed worker processes (task-agnostic).

:class:`SandboxPool` keeps ``n_workers`` worker processes (:mod:`envs._isolation_worker`) that have a task's
modules imported already; :meth:`SandboxPool.run` sends one job (code + named numeric input arrays) to a free
worker, which runs it in a freshly forked, resource-limited child through the task's *runner* and returns one
numeric array. What a task runs is described by a :class:`SandboxTask` (the data-science task and its model
evaluation live in :mod:`envs.datascience.evaluation`); this module knows nothing about any task.
``run`` is thread-safe (``TextVectorEnv`` threads call it concurrently) and blocks in ``select``, which
releases the GIL.

Isolation (``sandbox`` = ``"auto"`` | ``"isolated"`` | ``"rlimits"``; see :func:`resolve_isolation`):

``"isolated"`` (Linux with bubblewrap)
    Each worker runs under ``bwrap`` with its own PID, network (no interfaces but loopback: no route out),
    IPC, UTS and cgroup namespaces, ``--die-with-parent`` and ``--new-session``, and a *minimal*, read-only
    view of the filesystem built from what the task's imports need (probed once, see :func:`task_files`): the
    shared-library directories (``/usr/lib*``, without their Python package directories) and time zones, the
    dynamic-loader cache, the interpreter and its standard library (without ``site-packages``), exactly the
    package directories the task's modules import (e.g. ``numpy/`` and ``scipy/`` - not the rest of the virtual
    environment) minus what the task hides (:attr:`SandboxTask.hide`: bundled datasets), the worker script and
    the runner, fresh ``/dev`` and ``/proc`` (the trainer's processes are not in the namespace), and a per-worker
    *scratch* directory, the only writable place, mounted at ``/tmp`` unless a path the worker needs lies there
    (then at a free path such as ``/scratch``: it never shadows anything). Every job gets a fresh directory in it
    (``HOME`` and ``TMPDIR``), and the whole scratch directory is emptied after every job. Paths are resolved
    (symlinks, spaces, ``/tmp``), so the project, its virtual environment and the interpreter may live anywhere.

    As root (the project machines run everything as root) bwrap runs in its privileged mode without a user
    namespace and the worker keeps only ``CAP_SETUID``, ``CAP_SETGID`` and ``CAP_KILL``; each job child then
    switches to the unprivileged ``sandbox_uid``/``sandbox_gid`` (65534 = nobody) for real. This matters:
    ``--unshare-user --uid 65534`` would only *map* the code to root, and the kernel exempts the root user
    from ``RLIMIT_NPROC`` and grants it owner access to every root-owned file. Without root, bwrap uses an
    unprivileged user namespace (``--unshare-user --uid 65534 --gid 65534``); the code then runs as the
    caller's uid seen as 65534 (the seccomp filter forbids creating further namespaces).
``"rlimits"`` (fallback)
    A plain subprocess in its own session, with the same per-job limits, seccomp filter and, as root, all
    capabilities dropped - but the code sees the real filesystem (the data, with its labels) and network.

``"auto"`` (default) is ``"isolated"`` when bubblewrap is installed - and an *error* with bwrap's own reason
when it is installed but cannot start a sandbox here; ``"rlimits"`` only when bubblewrap is absent, announced
once. The choice comes from the caller (a config's ``sandbox:``), else the ``ETPO_SANDBOX`` environment
variable, else ``"auto"``; :func:`isolation_report` says what the pools of this process actually use.

Per-job limits, applied in the job child (see :mod:`envs._isolation_worker`): wall-clock ``timeout`` (the
worker kills the child and, inside the PID namespace, every other process; the parent kills the whole worker
process group if the worker itself does not answer within ``timeout + grace``), ``RLIMIT_AS`` (memory
budget on top of the warm worker's address space), ``RLIMIT_CPU`` (all threads together), ``RLIMIT_FSIZE``
(also caps captured output), ``RLIMIT_NOFILE``, ``RLIMIT_NPROC`` (namespace modes), a seccomp filter that
forbids creating processes (threads are fine), signalling or re-limiting other processes, ptrace,
cross-process memory access and IPC objects that would outlive the job, and a scrubbed environment
(``PATH``, ``HOME=TMPDIR=<job dir>``, one BLAS/OpenMP thread, joblib without multiprocessing). Results come
back as ``.npy`` bytes parsed with ``allow_pickle=False``; nothing from the sandbox is ever unpickled. An
ordinary timeout only kills the job child (the warm worker survives); a worker that stops answering, dies or
sends a malformed reply is killed and replaced.

Known limits: the disk space a job can fill in its directory is bounded by ``RLIMIT_FSIZE`` per file and by
the timeout, not in total (everything is deleted after the job); ``RLIMIT_AS`` counts virtual memory, not
resident memory; in the rlimits fallback the code can read and write whatever the caller's user can, reach
the network, and (same uid) read the caller's environment and memory through ``/proc``.
"""

from __future__ import annotations

import atexit
import io
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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from . import _isolation_worker as _proto

__all__ = [
    "SANDBOX_MODES",
    "SANDBOX_ENV_VAR",
    "SandboxTask",
    "SandboxPool",
    "SandboxResult",
    "SandboxError",
    "Isolation",
    "resolve_isolation",
    "bwrap_available",
    "task_files",
    "default_n_workers",
    "get_default_pool",
    "close_all_pools",
    "isolation_report",
]

log = logging.getLogger(__name__)

SANDBOX_MODES = ("auto", "isolated", "rlimits")
SANDBOX_ENV_VAR = "ETPO_SANDBOX"
_MODE_ALIASES = {"bwrap": "isolated", "bubblewrap": "isolated"}  # earlier spelling of "isolated"
_WORKER_SCRIPT = os.path.realpath(_proto.__file__)
_MB = 1 << 20


class SandboxError(RuntimeError):
    """The sandbox itself cannot work (bubblewrap unusable, worker does not start, pool closed)."""


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
# which isolation


@dataclass(frozen=True)
class Isolation:
    """The isolation a pool uses: ``mode`` (``"isolated"``/``"rlimits"``), what was ``requested``
    (``"auto"``/``"isolated"``/``"rlimits"``), where that came from (``source``: ``"config"``,
    ``"ETPO_SANDBOX"`` or ``"default"``) and a one-line ``detail``."""

    mode: str
    requested: str
    source: str
    detail: str

    def describe(self) -> str:
        return f"{self.mode} (requested {self.requested!r} by {self.source}): {self.detail}"

    def as_dict(self) -> dict:
        return asdict(self)


def _normalize_mode(value: str, source: str) -> str:
    mode = _MODE_ALIASES.get(str(value).strip().lower(), str(value).strip().lower())
    if mode not in SANDBOX_MODES:
        raise ValueError(f"sandbox mode {value!r} (from {source}) is not one of {', '.join(SANDBOX_MODES)}")
    return mode


_ISOLATED_DETAIL = ("bubblewrap: own PID/network/IPC namespaces, read-only minimal filesystem (no data directory, "
                    "no bundled datasets), code runs as an unprivileged user")
_RLIMITS_DETAIL = ("resource limits and a seccomp filter only: the code sees the real filesystem (including the "
                   "data and its labels) and the network")


def resolve_isolation(requested: str | None = None, *, source: str = "config") -> Isolation:
    """Decide the isolation for a pool; raise :class:`SandboxError` when it cannot be had.

    ``requested`` (a config value) wins; None means the ``ETPO_SANDBOX`` environment variable, else ``"auto"``.
    ``"auto"`` is ``"isolated"`` when bubblewrap is installed (an error with the reason if it cannot start
    here) and ``"rlimits"`` only when it is not installed, announced once per process.
    """
    if requested is None:
        env = os.environ.get(SANDBOX_ENV_VAR, "").strip()
        requested, source = (env, SANDBOX_ENV_VAR) if env else ("auto", "default")
    mode = _normalize_mode(requested, source)
    if mode == "rlimits":
        return Isolation("rlimits", mode, source, _RLIMITS_DETAIL + " (requested)")
    exe = shutil.which("bwrap")
    if exe is None or not sys.platform.startswith("linux"):
        missing = "bubblewrap (bwrap) is not installed" if sys.platform.startswith("linux") else "bubblewrap needs Linux"
        if mode == "isolated":
            raise SandboxError(f"sandbox 'isolated' requested (by {source}) but {missing}; "
                               "install it (apt-get install bubblewrap)")
        _announce_once(f"envs.isolation: {missing}, so generated code runs with {_RLIMITS_DETAIL}. Install "
                       f"bubblewrap (apt-get install bubblewrap) for isolation, or set {SANDBOX_ENV_VAR}=rlimits "
                       "to choose this fallback explicitly.")
        return Isolation("rlimits", mode, source, f"{missing}; {_RLIMITS_DETAIL}")
    ok, reason = bwrap_available()
    if not ok:
        raise SandboxError(
            f"bubblewrap is installed but cannot start a sandbox here ({reason}). Fix that (e.g. allow "
            f"unprivileged user namespaces, or run as root), or choose the unisolated fallback explicitly with "
            f"{SANDBOX_ENV_VAR}=rlimits (or sandbox: rlimits in the environment's config)")
    return Isolation("isolated", mode, source, f"{_BWRAP_PROBE.get('version', 'bubblewrap')}: {_ISOLATED_DETAIL}")


_ANNOUNCED: set[str] = set()


def _announce_once(msg: str) -> None:
    if msg not in _ANNOUNCED:
        _ANNOUNCED.add(msg)
        log.warning(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


# ---------------------------------------------------------------------------------------------------
# what the worker's interpreter needs to see


@dataclass(frozen=True)
class TaskFiles:
    """Host paths (all resolved) a task's worker needs: see :func:`task_files`."""

    executable: str
    stdlib: str  # the standard library as the interpreter finds it (may differ from its resolved path)
    roots: tuple[str, ...]  # package directories / single-file modules / vendored-library (*.libs) directories
    sys_path: tuple[str, ...]  # the directories holding ``roots`` (the worker's sys.path after the stdlib)
    libraries: tuple[str, ...]  # shared libraries mapped by the interpreter outside the roots (e.g. libpython)
    failed: tuple[str, ...]  # modules whose import failed in the probe

    @property
    def pyvenv_cfg(self) -> str | None:
        """A copied (not symlinked) venv interpreter reads ``pyvenv.cfg`` next to its ``bin`` directory."""
        cfg = os.path.join(os.path.dirname(os.path.dirname(self.executable)), "pyvenv.cfg")
        return cfg if os.path.isfile(cfg) else None


_PROBE = r"""
import importlib, importlib.util, json, os, sys
cfg = json.loads(sys.argv[1])
sys.path.extend(p for p in cfg["path"] if p not in sys.path)
failed = []
if cfg["runner"]:
    spec = importlib.util.spec_from_file_location("_sandbox_runner", cfg["runner"])
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
for name in cfg["modules"]:
    try:
        importlib.import_module(name)
    except Exception as exc:
        failed.append(f"{name}: {exc}")
files = set()
for mod in list(sys.modules.values()):
    f = getattr(mod, "__file__", None)
    if f:
        files.add(f)
    for p in list(getattr(mod, "__path__", None) or []):
        files.add(os.path.join(p, "__init__.py"))
maps = set()
with open("/proc/self/maps") as fh:
    for line in fh:
        parts = line.split(None, 5)
        if len(parts) == 6 and parts[5].startswith("/"):
            maps.add(parts[5].strip())
print(json.dumps({"files": sorted(files), "maps": sorted(maps), "stdlib": os.path.dirname(os.__file__),
                  "executable": sys.executable, "failed": failed, "path": sys.path}))
"""

_TASK_FILES: dict[tuple, TaskFiles] = {}
_TASK_FILES_LOCK = threading.Lock()


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def task_files(modules: Sequence[str] = (), runner: str | None = None) -> TaskFiles:
    """Probe (once per process) what the interpreter needs to import ``modules``: run it, import them, list files.

    The probe is a subprocess of this process's interpreter (resolved through every symlink) started with
    ``-I -S`` and this process's ``sys.path`` directories; every package directory a loaded module or mapped
    shared library comes from becomes a root. This is what makes the sandbox independent of where the
    project, its virtual environment and the interpreter live.
    """
    key = (tuple(modules), runner)
    with _TASK_FILES_LOCK:
        if key in _TASK_FILES:
            return _TASK_FILES[key]
        exe = os.path.realpath(sys.executable)
        path = [os.path.realpath(p) for p in sys.path if p and os.path.isdir(p)]
        cfg = json.dumps({"path": path, "modules": list(modules), "runner": runner})
        try:
            proc = subprocess.run([exe, "-I", "-S", "-c", _PROBE, cfg], capture_output=True, timeout=300,
                                  cwd="/", env=_worker_env("/"))
        except (OSError, subprocess.SubprocessError) as exc:
            raise SandboxError(f"could not run the interpreter {exe} to probe the sandbox's files: {exc}") from None
        if proc.returncode != 0:
            raise SandboxError(f"probing the sandbox's files failed: {proc.stderr.decode(errors='replace')[-2000:]}")
        result = classify_probe(json.loads(proc.stdout), exe)
        _TASK_FILES[key] = result
        return result


def classify_probe(info: dict, exe: str) -> TaskFiles:
    """Turn the probe's report (loaded files, mapped files, ``sys.path``, standard library) into :class:`TaskFiles`.

    A file under a ``sys.path`` entry (the longest that holds it) makes ``entry/<first component>`` a root - a
    package directory, a single-file module, or a vendored-library directory such as ``numpy.libs``; the standard
    library itself is shown whole (but its ``site-packages`` is a ``sys.path`` entry like any other); any other
    mapped file (``libpython``, system libraries) is listed among the libraries.
    """
    stdlib_real = os.path.realpath(info["stdlib"])
    stdlib_entries = {stdlib_real, os.path.join(stdlib_real, "lib-dynload")}
    entries = sorted({os.path.realpath(p) for p in info["path"] if p and os.path.isdir(p)}, key=len, reverse=True)
    roots: set[str] = set()
    used_entries: set[str] = set()
    libraries: set[str] = set()
    for kind, names in (("module", info["files"]), ("mapped", info["maps"])):
        for name in names:
            real = os.path.realpath(name)
            if not os.path.exists(real):
                continue
            entry = next((e for e in entries if _under(real, e)), None)
            if entry is not None and entry not in stdlib_entries:
                rel = os.path.relpath(real, entry)
                if rel == ".":
                    continue
                roots.add(os.path.join(entry, rel.split("/", 1)[0]))
                used_entries.add(entry)
            elif not _under(real, stdlib_real) and kind == "mapped" and real != exe:
                libraries.add(real)
    return TaskFiles(
        executable=exe,
        stdlib=info["stdlib"],
        roots=tuple(sorted(roots)),
        sys_path=tuple(dict.fromkeys(e for e in (os.path.realpath(p) for p in info["path"] if p) if e in used_entries)),
        libraries=tuple(sorted(libraries)),
        failed=tuple(info["failed"]),
    )


# ---------------------------------------------------------------------------------------------------
# the bubblewrap command line


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


# The system directories a worker sees: shared libraries (and the dynamic loader, whose path the interpreter names)
# and time zones - not /usr/bin, /usr/share or /usr/local (the interpreter's own files are added one by one).
_SYSTEM_LINKS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")  # usr-merge symlinks, or real lib dirs
_SYSTEM_TREES = ("/usr/lib", "/usr/lib32", "/usr/lib64", "/usr/libx32", "/usr/share/zoneinfo")
_SYSTEM_FILES = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime")


def _system_package_dirs(stdlib: str) -> list[str]:
    """Python package directories that binding ``/usr`` and the standard library would show wholesale."""
    import glob

    found = []
    for pattern in ("/usr/lib/python3*/*-packages", "/usr/local/lib/python3*/*-packages", "/usr/lib/python3/dist-packages",
                    os.path.join(stdlib, "*-packages"), os.path.join(os.path.realpath(stdlib), "*-packages")):
        found += [p for p in glob.glob(pattern) if os.path.isdir(p)]
    return sorted(set(found))


@dataclass
class MountPlan:
    """The filesystem of an isolated worker, as bubblewrap arguments (see :func:`mount_plan`)."""

    args: list[str]
    scratch: str  # where the scratch directory appears inside the sandbox
    private: str  # where the worker script and the runner appear
    visible: list[str]  # host paths shown read-only (besides the system trees)
    hidden: list[str]  # paths covered by an empty directory or file


def _free_path(candidates: Sequence[str], taken: Sequence[str]) -> str:
    """The first candidate that neither contains nor lies inside any taken path."""
    for c in candidates:
        if not any(_under(t, c) or _under(c, t) for t in taken):
            return c
    n = 0
    while True:
        c = f"/.sandbox-{n}"
        if not any(_under(t, c) or _under(c, t) for t in taken):
            return c
        n += 1


def mount_plan(files: TaskFiles, scratch_host: str, empty_dir: str, runner: str | None,
               hide: Sequence[str] = ()) -> MountPlan:
    """bwrap arguments for the minimal read-only view described in the module docstring.

    ``files``: what the interpreter needs (:func:`task_files`); ``scratch_host``: the worker's writable
    directory; ``empty_dir``: an empty, read-only host directory shown in place of hidden directories;
    ``runner``: the task's runner file; ``hide``: further paths (files or directories) to hide. Mounts are made
    parents first; a hidden directory that holds something the worker needs becomes a read-only tmpfs with
    just that inside.
    """
    args: list[str] = []
    mounts: list[tuple[str, str]] = [("/", "tmpfs")]  # (sandbox path, kind) made so far
    remount_ro: list[str] = []

    def cover(p: str) -> tuple[str, str]:
        return max((m for m in mounts if _under(p, m[0])), key=lambda m: len(m[0]))

    def make_parents(p: str) -> None:
        # bubblewrap creates missing parents with mode 0700, which the unprivileged code could not traverse
        parts = p.strip("/").split("/")[:-1]
        cur = ""
        for part in parts:
            cur += "/" + part
            where, kind = cover(cur)
            if kind == "bind":
                continue  # a host directory that is shown: the path exists as it is
            if kind in ("tmpfs", "dir") and (cur, "dir") not in mounts and where != cur:
                args.extend(["--perms", "0755", "--dir", cur])
                mounts.append((cur, "dir"))

    for d in _SYSTEM_LINKS:
        if os.path.islink(d):
            args += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d) and os.path.basename(d).startswith("lib"):
            args += ["--ro-bind", d, d]
            mounts.append((d, "bind"))
    for d in _SYSTEM_TREES:
        if os.path.isdir(d) and not os.path.islink(d):
            make_parents(d)
            args += ["--ro-bind", d, d]
            mounts.append((d, "bind"))
    args += ["--perms", "0755", "--dir", "/etc"]
    mounts.append(("/etc", "dir"))
    for f in _SYSTEM_FILES:
        if os.path.exists(f):
            args += ["--ro-bind", f, f]

    # (source, destination) pairs; a path reached through a symlink is shown at both its names
    binds: dict[str, str] = {}

    def want(path: str, dest: str | None = None) -> None:
        real = os.path.realpath(path)
        binds.setdefault(real, real)
        if dest is not None and os.path.abspath(dest) != real:
            binds.setdefault(os.path.abspath(dest), real)

    want(files.executable)
    want(files.stdlib, files.stdlib)
    if files.pyvenv_cfg:
        want(files.pyvenv_cfg)
    for p in (*files.roots, *files.libraries):
        want(p)
    hidden = {os.path.realpath(h) for h in hide} | set(_system_package_dirs(files.stdlib))
    hidden -= set(binds)
    ops = [(dest, "bind") for dest in binds] + [(h, "hide") for h in hidden]
    ops.sort(key=lambda op: (op[0].count("/"), op[0], op[1]))
    shown: list[str] = []
    hidden_done: list[str] = []
    for path, kind in ops:
        where, how = cover(path)
        if kind == "bind":
            if how == "bind" and where != path:
                continue  # already shown through a parent directory
            make_parents(path)
            args += ["--ro-bind", binds[path], path]
            mounts.append((path, "bind"))
            shown.append(path)
        else:
            if how != "bind":
                continue  # not visible anyway
            if not os.path.lexists(path):
                continue
            if any(_under(dest, path) for dest in binds):
                args += ["--perms", "0755", "--tmpfs", path]
                mounts.append((path, "tmpfs"))
                remount_ro.append(path)
            elif os.path.isdir(path) and not os.path.islink(path):
                args += ["--ro-bind", empty_dir, path]
                mounts.append((path, "hidden"))
            else:
                args += ["--ro-bind", "/dev/null", path]
                mounts.append((path, "hidden"))
            hidden_done.append(path)

    taken = list(binds) + list(hidden) + [m[0] for m in mounts if m[0] != "/"]
    private = _free_path(["/opt/etpo-sandbox", "/.etpo-sandbox"], taken)
    taken.append(private)
    make_parents(private + "/worker.py")
    args += ["--perms", "0755", "--dir", private]
    args += ["--ro-bind", _WORKER_SCRIPT, private + "/worker.py"]
    if runner is not None:
        args += ["--ro-bind", os.path.realpath(runner), private + "/runner.py"]
    scratch = _free_path(["/tmp", "/scratch", "/var/tmp"], taken)
    make_parents(scratch)
    args += ["--bind", scratch_host, scratch, "--dev", "/dev", "--proc", "/proc", "--chdir", scratch]
    # every tmpfs read-only once populated (the root last): the scratch directory is the only writable place
    for p in [*remount_ro, "/dev", "/"]:
        args += ["--remount-ro", p]
    return MountPlan(args=args, scratch=scratch, private=private, visible=shown, hidden=hidden_done)


_BWRAP_PROBE: dict[str, Any] = {}
_BWRAP_LOCK = threading.Lock()


def bwrap_available() -> tuple[bool, str]:
    """Whether bubblewrap can start an isolated interpreter here (probed once per process): ``(ok, reason)``."""
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
            empty = os.path.join(probe_dir, "empty")
            scratch = os.path.join(probe_dir, "scratch")
            os.mkdir(empty, 0o555)
            os.mkdir(scratch, 0o755)
            try:
                version = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
                _BWRAP_PROBE["version"] = version or "bubblewrap"
                files = task_files()
                plan = mount_plan(files, scratch, empty, None)
                cmd = [exe, *_bwrap_base_args(os.geteuid() == 0), *plan.args, "--", files.executable, "-I", "-S", "-c",
                       "import os; os.listdir('/')"]
                proc = subprocess.run(cmd, capture_output=True, timeout=60, env=_worker_env("/"))
                ok = proc.returncode == 0
                reason = "ok" if ok else f"bwrap failed: {proc.stderr.decode(errors='replace').strip()[:500]}"
            except (OSError, subprocess.SubprocessError, SandboxError) as exc:
                ok, reason = False, f"bwrap failed: {exc}"
            finally:
                _rmtree_hard(probe_dir)
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
        # glibc reserves a 64 MB malloc arena per thread by default: address space that RLIMIT_AS counts, so a
        # handful of threads would exhaust the memory budget without using any memory
        "MALLOC_ARENA_MAX": "2",
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


DIR_PREFIX = "etpo-sandbox-"  # pool directories: <tempdir>/etpo-sandbox-<owner pid>-<random>
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
        if not name.startswith(DIR_PREFIX):
            continue
        pid = name[len(DIR_PREFIX) :].split("-", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            _rmtree_hard(os.path.join(root, name))
        except OSError:
            pass  # alive (owned by someone else): leave it


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
            cmd = [_BWRAP_PROBE["exe"], *_bwrap_base_args(launch.privileged), *self.plan.args, "--",
                   launch.files.executable, "-I", "-S", "-B", self.plan.private + "/worker.py", json.dumps(config)]
            return cmd, _worker_env(self.plan.scratch), "/"
        config["runner"] = os.path.realpath(launch.runner)
        cmd = [launch.files.executable, "-I", "-S", "-B", _WORKER_SCRIPT, json.dumps(config)]
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
_USED: dict[tuple[str, str], Isolation] = {}  # (task, mode) -> the isolation of every pool created here
_REGISTRY_LOCK = threading.RLock()  # re-entered: a pool created by get_default_pool registers itself
_DEFAULT_POOLS: dict[tuple[str, str], SandboxPool] = {}
_STOPPING = False


def _register(pool: SandboxPool) -> None:
    with _REGISTRY_LOCK:
        _LIVE.add(pool)
        _USED.setdefault((pool.task.name, pool.isolation), pool.isolation_info)


def isolation_report() -> dict | None:
    """What the sandbox pools created in this process use; None if none was created.

    ``{"isolation": "isolated" | "rlimits" | "mixed", "pools": [{"task", "mode", "requested", "source",
    "detail"}, ...]}`` - written to a run's log, ``summary.json`` and TensorBoard by :mod:`etpo.fit`.
    """
    with _REGISTRY_LOCK:
        used = [{"task": task, **iso.as_dict()} for (task, _), iso in _USED.items()]
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
        _USED[(task.name, iso.mode)] = iso  # the latest request: what the report names as the source
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
