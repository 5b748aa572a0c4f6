"""What an isolated worker sees: the files its interpreter needs (probed) and the bubblewrap command line for them."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .errors import SandboxError

__all__ = ["TaskFiles", "task_files", "classify_probe", "MountPlan", "mount_plan", "bwrap_available", "WORKER_SCRIPT"]

WORKER_SCRIPT = os.path.join(os.path.dirname(os.path.realpath(__file__)), "worker.py")

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
    args += ["--ro-bind", WORKER_SCRIPT, private + "/worker.py"]
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


def bwrap_version() -> str:
    """``bubblewrap X.Y.Z`` as the installed bwrap reports it (after :func:`bwrap_available`)."""
    return _BWRAP_PROBE.get("version") or "bubblewrap"


def bwrap_executable() -> str:
    """The bwrap binary :func:`bwrap_available` found."""
    return _BWRAP_PROBE.get("exe") or shutil.which("bwrap") or "bwrap"
