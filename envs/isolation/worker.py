"""Warm sandbox worker: the process that runs untrusted code for :mod:`envs.isolation` (task-agnostic).

Started by :class:`envs.isolation.SandboxPool` as ``python -I -S worker.py CONFIG_JSON`` (inside bubblewrap, or as
a plain subprocess in the rlimits fallback). It imports only the standard library itself. ``CONFIG_JSON`` names
the *runner*: a Python file (loaded by path, so the sandbox needs no package of ours) that defines
``run(code, inputs, params) -> numpy.ndarray``, the directories to put on ``sys.path`` and the modules to
import before the first job (e.g. numpy and the model libraries of the data-science task, see
:mod:`envs.datascience.evaluation`).

Lifecycle: import the preload modules once (this is what makes the pool *warm*), report ``ready``, then serve
jobs one at a time. For every job the worker forks a *fresh* child, so nothing a job changes in the
interpreter (patched modules, environment variables, threads, open files) reaches the next one. The child

1. starts a new session (its own process group), closes every inherited descriptor except its result pipe,
2. drops privileges (``setuid`` to the sandbox user when the pool runs as root; otherwise, as root in the
   fallback, it drops every capability),
3. moves into the fresh job directory (``HOME`` and ``TMPDIR`` point there; stdout/stderr go to a file there),
4. loads the job's input arrays from ``input.npz`` (``allow_pickle=False``) and deletes the file,
5. applies resource limits: ``RLIMIT_AS`` (current address space + the job's memory budget), ``RLIMIT_CPU``
   (CPU seconds summed over all threads: oversubscribing threads only reach it sooner), ``RLIMIT_FSIZE``
   (caps captured output and files), ``RLIMIT_NOFILE``, ``RLIMIT_CORE`` = 0 and, in the namespace modes,
   ``RLIMIT_NPROC``,
6. installs a seccomp filter (see :func:`seccomp_program`),
7. calls the runner's ``run`` and writes a result frame (JSON header + ``.npy`` bytes, no pickle) to its pipe.

The worker enforces the job's wall-clock timeout, kills the child's process group and - inside a PID
namespace, where the worker is PID 2 - every other process of the namespace (``kill(-1, SIGKILL)``), so that
nothing the code started survives the job. It is a child subreaper, so orphans are reaped too.

Protocol over the inherited pipes (stdin: jobs from the parent, stdout: replies); every message is a frame
``8-byte big-endian length + payload``:

* worker -> parent, once: JSON ``{"op": "ready", ...}``
* parent -> worker: JSON job spec (see :meth:`Worker.run_job`)
* worker -> parent: ``4-byte big-endian header length + JSON header + .npy bytes (may be empty)``
"""

from __future__ import annotations

import ctypes
import errno
import gc
import importlib
import importlib.util
import io
import json
import os
import resource
import select
import signal
import struct
import sys
import time
import traceback

FRAME = struct.Struct(">Q")
HEADER = struct.Struct(">I")
MAX_JOB_BYTES = 64 << 20  # a job spec carries code and small parameters only (arrays go through input.npz)
_THIS_FILE = os.path.abspath(__file__)

# ---------------------------------------------------------------------------------------------------
# framing helpers


def read_exact(fd: int, n: int) -> bytes | None:
    """Read exactly ``n`` bytes from ``fd``; None on EOF before the first byte."""
    chunks, got = [], 0
    while got < n:
        chunk = os.read(fd, min(n - got, 1 << 20))
        if not chunk:
            if got == 0:
                return None
            raise EOFError(f"stream ended after {got} of {n} bytes")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def write_frame(fd: int, payload: bytes) -> None:
    write_all(fd, FRAME.pack(len(payload)) + payload)


def read_frame(fd: int, max_len: int) -> bytes | None:
    head = read_exact(fd, FRAME.size)
    if head is None:
        return None
    (length,) = FRAME.unpack(head)
    if length > max_len:
        raise ValueError(f"frame of {length} bytes exceeds {max_len}")
    return read_exact(fd, length) or b""


def pack_result(header: dict, body: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return HEADER.pack(len(raw)) + raw + body


# ---------------------------------------------------------------------------------------------------
# seccomp: hand-assembled classic BPF (no libseccomp dependency)

_BPF_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
_BPF_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_BPF_JGE_K = 0x35  # BPF_JMP | BPF_JGE | BPF_K
_BPF_JSET_K = 0x45  # BPF_JMP | BPF_JSET | BPF_K
_BPF_RET_K = 0x06  # BPF_RET | BPF_K
_RET_ALLOW = 0x7FFF0000  # SECCOMP_RET_ALLOW
_RET_ERRNO = 0x00050000  # SECCOMP_RET_ERRNO | errno
_CLONE_THREAD = 0x00010000
_X32_SYSCALL_BIT = 0x40000000

# Syscall numbers from the kernel UAPI headers (asm/unistd_64.h, asm-generic/unistd.h for arm64).
_ARCHES = {
    "x86_64": {
        "audit": 0xC000003E,  # AUDIT_ARCH_X86_64
        "capset": 126,
        "fork": [57, 58],  # fork, vfork
        "clone": 56,
        "clone3": 435,
        "kill": [62, 129],  # kill, rt_sigqueueinfo: first argument is the target pid
        "tgkill": [234, 297],  # tgkill, rt_tgsigqueueinfo: first argument is the target tgid
        # prlimit64, sched_setaffinity, sched_setscheduler, sched_setparam, sched_setattr: first argument is a
        # pid; allowed for the calling process only (0 or its pid)
        "self_pid_arg0": [302, 203, 144, 142, 314],
        # tkill, ptrace, process_vm_readv/writev, unshare, setns, bpf, perf_event_open, userfaultfd,
        # keyctl, add_key, request_key, io_uring_setup/enter/register, pidfd_open/send_signal/getfd,
        # SysV IPC and POSIX message queues (shmget, semget, msgget, mq_open: objects that would outlive the job
        # in the worker's IPC namespace), setpriority, ioprio_set (could slow the warm worker for later jobs)
        "deny": [200, 101, 310, 311, 272, 308, 321, 298, 323, 250, 248, 249, 425, 426, 427, 434, 424, 438,
                 29, 64, 68, 240, 141, 251],
    },
    "aarch64": {
        "audit": 0xC00000B7,  # AUDIT_ARCH_AARCH64
        "capset": 91,
        "fork": [],
        "clone": 220,
        "clone3": 435,
        "kill": [129, 138],
        "tgkill": [131, 240],
        "self_pid_arg0": [261, 122, 119, 118, 274],
        "deny": [130, 117, 270, 271, 97, 268, 280, 241, 282, 219, 217, 218, 425, 426, 427, 434, 424, 438,
                 194, 190, 186, 180, 140, 30],
    },
}


def seccomp_program(arch: str, self_pid: int) -> list[tuple[int, int, int, int]]:
    """Classic-BPF seccomp filter for the job child, as ``(code, jt, jf, k)`` tuples.

    Policy: process creation is refused with EPERM (``fork``/``vfork``, ``clone`` without ``CLONE_THREAD``;
    ``clone3`` gets ENOSYS so glibc falls back to ``clone`` for threads); signals may only target the
    child itself (``kill(self)``, ``kill(0)``/``kill(-self)`` = its own process group, ``tgkill(self, ..)``);
    resource limits, CPU affinity and scheduling may only be changed for the child itself; ptrace,
    cross-process memory access, pidfds, namespaces, io_uring, bpf, perf, keyrings, SysV IPC, POSIX message
    queues, ``setpriority`` and ``ioprio_set`` are refused; any other ABI (i386 ``int 0x80``, x32) is refused
    outright. Everything else is allowed.
    Offsets in ``struct seccomp_data``: ``nr`` 0, ``arch`` 4, low word of ``args[0]`` 16 (little endian).
    """
    spec = _ARCHES[arch]
    prog: list = []  # entries: (code, jt, jf, k) with jt/jf as label names or 0

    def jeq(k, label_true, label_false=0):
        prog.append((_BPF_JEQ_K, label_true, label_false, k))

    prog.append((_BPF_LD_W_ABS, 0, 0, 4))
    jeq(spec["audit"], 0, "enosys")
    prog.append((_BPF_LD_W_ABS, 0, 0, 0))
    if arch == "x86_64":
        prog.append((_BPF_JGE_K, "enosys", 0, _X32_SYSCALL_BIT))
    for nr in spec["fork"] + spec["deny"]:
        jeq(nr, "eperm")
    jeq(spec["clone3"], "enosys")
    jeq(spec["clone"], "clone")
    for nr in spec["kill"]:
        jeq(nr, "kill")
    for nr in spec["tgkill"]:
        jeq(nr, "tgkill")
    for nr in spec["self_pid_arg0"]:
        jeq(nr, "self")
    prog.append((_BPF_RET_K, 0, 0, _RET_ALLOW))
    labels = {}
    labels["clone"] = len(prog)
    prog.append((_BPF_LD_W_ABS, 0, 0, 16))
    prog.append((_BPF_JSET_K, "allow", "eperm", _CLONE_THREAD))
    labels["kill"] = len(prog)
    prog.append((_BPF_LD_W_ABS, 0, 0, 16))
    jeq(self_pid, "allow")
    jeq(0, "allow")
    jeq((-self_pid) & 0xFFFFFFFF, "allow", "eperm")
    labels["tgkill"] = len(prog)
    prog.append((_BPF_LD_W_ABS, 0, 0, 16))
    jeq(self_pid, "allow", "eperm")
    labels["self"] = len(prog)
    prog.append((_BPF_LD_W_ABS, 0, 0, 16))
    jeq(0, "allow")
    jeq(self_pid, "allow", "eperm")
    labels["allow"] = len(prog)
    prog.append((_BPF_RET_K, 0, 0, _RET_ALLOW))
    labels["eperm"] = len(prog)
    prog.append((_BPF_RET_K, 0, 0, _RET_ERRNO | errno.EPERM))
    labels["enosys"] = len(prog)
    prog.append((_BPF_RET_K, 0, 0, _RET_ERRNO | errno.ENOSYS))

    out = []
    for i, (code, jt, jf, k) in enumerate(prog):
        rel = []
        for target in (jt, jf):
            off = 0 if target == 0 else labels[target] - (i + 1)
            if not 0 <= off <= 255:
                raise AssertionError("BPF jump out of range")
            rel.append(off)
        out.append((code, rel[0], rel[1], k))
    return out


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
_PR_SET_CHILD_SUBREAPER = 36
_PR_SET_DUMPABLE = 4
_PR_SET_PDEATHSIG = 1
_PR_CAPBSET_DROP = 24
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4

try:
    _libc = ctypes.CDLL(None, use_errno=True)
except OSError:  # not a POSIX libc: the Linux-only hardening below becomes a no-op
    _libc = None


def _prctl(option: int, arg2: int = 0) -> int:
    """``prctl(option, arg2)``; -1 where there is no prctl (not Linux)."""
    fn = getattr(_libc, "prctl", None)
    if fn is None:
        return -1
    return fn(ctypes.c_int(option), ctypes.c_ulong(arg2), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))


def install_seccomp(self_pid: int) -> bool:
    """Install :func:`seccomp_program` on the calling process; False when the architecture is unknown."""
    arch = os.uname().machine
    if arch not in _ARCHES or not sys.platform.startswith("linux") or _libc is None:
        return False
    prog = seccomp_program(arch, self_pid)
    filters = (_SockFilter * len(prog))(*[_SockFilter(*ins) for ins in prog])
    fprog = _SockFprog(len(prog), filters)
    if _prctl(_PR_SET_NO_NEW_PRIVS, 1) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
    rc = _libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0)
    if rc != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP) failed")
    return True


def drop_capabilities() -> None:
    """Drop every capability of a root process (bounding set, ambient, then capset to zero).

    Used in the rlimits fallback when running as root: the code then cannot raise its hard limits
    (CAP_SYS_RESOURCE), override file permissions, or signal other users' processes.
    """
    for cap in range(64):
        _prctl(_PR_CAPBSET_DROP, cap)  # fails harmlessly past the last capability
    _prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL)
    arch = os.uname().machine
    if arch not in _ARCHES or not sys.platform.startswith("linux") or _libc is None:
        return
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()  # two zeroed {effective, permitted, inheritable} words
    if _libc.syscall(ctypes.c_long(_ARCHES[arch]["capset"]), header, data) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")


# ---------------------------------------------------------------------------------------------------
# the job child


def _vm_size_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


_HIDDEN_FRAMES = {_THIS_FILE}  # + the runner's file (set in main): frames the code's author did not write


def _format_exception(exc: BaseException) -> str:
    """Traceback without the worker's and the runner's own frames (they only confuse whoever reads it)."""
    tb = exc.__traceback__
    while tb is not None and os.path.abspath(tb.tb_frame.f_code.co_filename) in _HIDDEN_FRAMES:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


def _child_main(job: dict, result_fd: int, runner) -> None:
    """Body of the forked job child; never returns (``os._exit``)."""
    try:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # die with the worker (matters outside a PID namespace)
        os.setsid()
        if result_fd != 3:
            os.dup2(result_fd, 3)
        os.closerange(4, 1 << 16)  # the parent pipes and anything a library opened: out of reach
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.close(devnull)
        if job.get("uid") is not None:
            os.setgroups([])
            os.setgid(int(job["gid"]))
            os.setuid(int(job["uid"]))
        elif os.geteuid() == 0:
            drop_capabilities()
        os.umask(0o022)
        job_dir = job["job_dir"]
        os.chdir(job_dir)
        os.environ["HOME"] = os.environ["TMPDIR"] = job_dir
        out = os.open("output.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.close(out)

        import numpy as np

        with np.load("input.npz", allow_pickle=False) as arrays:
            inputs = {name: arrays[name] for name in arrays.files}
        os.unlink("input.npz")

        vm = _vm_size_bytes()
        limits = [
            (resource.RLIMIT_AS, vm + int(job["memory_bytes"])),
            (resource.RLIMIT_FSIZE, int(job["fsize_bytes"])),
            (resource.RLIMIT_NOFILE, int(job["nofile"])),
            (resource.RLIMIT_CORE, 0),
        ]
        if job.get("nproc"):
            limits.append((resource.RLIMIT_NPROC, int(job["nproc"])))
        for which, value in limits:
            resource.setrlimit(which, (value, value))
        cpu = int(job["cpu_seconds"])
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        if job.get("seccomp", True):
            install_seccomp(os.getpid())
    except BaseException as exc:  # noqa: BLE001 - set-up failure is reported, never raised
        try:
            write_all(3, pack_result({"status": "error", "error": "sandbox set-up failed: " + _format_exception(exc)}))
        finally:
            os._exit(70)

    header: dict
    body = b""
    try:
        output = np.asarray(runner.run(job["code"], inputs, job.get("params") or {}))
        if output.dtype.kind not in "biuf":
            raise TypeError(f"the result is an array of dtype {output.dtype}, not numbers")
        if output.size * 8 > int(job["max_result_bytes"]):
            raise ValueError(f"the result has {output.size} values; far more than expected")
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(output, dtype=np.float64), allow_pickle=False)
        header, body = {"status": "ok", "error": None}, buf.getvalue()
    except SystemExit as exc:
        header = {"status": "error", "error": f"SystemExit: the code called sys.exit({exc.code!r})"}
    except MemoryError as exc:
        header = {
            "status": "error",
            "error": f"MemoryError: the code exceeded the sandbox memory limit of "
            f"{int(job['memory_bytes']) >> 20} MB {exc}".rstrip(),
        }
    except BaseException as exc:  # noqa: BLE001 - every failure of the code is a result
        try:
            text = _format_exception(exc)
        except BaseException:  # noqa: BLE001 - e.g. MemoryError while formatting
            text = f"{type(exc).__name__}: (traceback unavailable)"
        if isinstance(exc, OSError) and exc.errno == errno.EFBIG:
            text += f"(the sandbox caps output and files at {int(job['fsize_bytes']) >> 20} MB)\n"
        header = {"status": "error", "error": text}
    try:
        write_all(3, pack_result(header, body))
    except BaseException:  # noqa: BLE001 - nothing left to report to
        os._exit(71)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # noqa: BLE001 - e.g. the output file hit RLIMIT_FSIZE
        pass
    os._exit(0)


# ---------------------------------------------------------------------------------------------------
# the worker


def _describe_exit(status: int, job: dict) -> tuple[str, str]:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig == signal.SIGXCPU:
            return "timeout", f"CPU time limit of {job['cpu_seconds']} s exceeded (all threads together)"
        if sig == signal.SIGXFSZ:
            return "error", f"file size limit of {int(job['fsize_bytes']) >> 20} MB exceeded (too much output?)"
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return "error", f"the code's process was killed by signal {name} before returning a result"
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -1
    return "error", (
        f"the code's process exited with status {code} before returning a result "
        "(os._exit, or its output channel was closed)"
    )


def _read_tail(path: str, n: int) -> str:
    """The last ``n`` bytes of the job's output, NUL bytes and invalid UTF-8 replaced."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - n))
            data = fh.read(n)
    except OSError:
        return ""
    text = data.decode("utf-8", errors="replace").replace("\x00", "\ufffd")
    return ("[...]\n" + text) if size > n else text


class Worker:
    def __init__(self, mode: str, runner):
        self.mode = mode
        self.runner = runner
        # Only inside bubblewrap's PID namespace (worker = PID 2 under bwrap's init) may we kill(-1).
        self.in_pid_namespace = mode == "isolated" and os.getpid() == 2 and os.getppid() == 1

    def _cleanup(self, pid: int) -> None:
        """Kill whatever the job left behind and reap it."""
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass
        if self.in_pid_namespace:
            try:
                os.kill(-1, signal.SIGKILL)  # every process of the namespace but init and us
            except OSError:
                pass
        deadline = time.monotonic() + 2.0
        while True:  # reap the child and orphans (we are a subreaper)
            try:
                wpid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if wpid == 0:
                if time.monotonic() > deadline:
                    return
                time.sleep(0.005)

    def run_job(self, job: dict) -> bytes:
        """Run one job in a freshly forked child; return the reply (header + .npy bytes).

        Job spec: ``job_dir`` (as the worker sees it), ``code``, ``params`` (passed to the runner), ``timeout``
        (wall-clock s), ``memory_bytes``, ``cpu_seconds``, ``fsize_bytes``, ``nofile``, ``nproc`` (or None),
        ``max_result_bytes``, ``output_tail_bytes``, ``uid``/``gid`` (or None: keep the worker's).
        """
        r, w = os.pipe()
        t0 = time.monotonic()
        pid = os.fork()
        if pid == 0:  # child
            os.close(r)
            _child_main(job, w, self.runner)
            os._exit(72)  # not reached
        os.close(w)
        timeout = float(job["timeout"])
        cap = int(job["max_result_bytes"]) + (1 << 20)
        try:
            pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            pidfd = None
        buf = bytearray()
        eof = exited = timed_out = oversize = False
        status = 0
        grace_end = None
        while not (eof and exited):
            now = time.monotonic()
            if now - t0 > timeout:
                timed_out = True
                break
            if grace_end is not None and now > grace_end:
                break  # exited but the pipe stays open (something inherited it): stop reading
            fds = [] if eof else [r]
            if pidfd is not None and not exited:
                fds.append(pidfd)
            wait = max(0.0, t0 + timeout - now)
            if pidfd is None or not fds:
                wait = min(wait, 0.02)
            if exited:
                wait = min(wait, 0.05)
            ready, _, _ = select.select(fds, [], [], wait) if fds else ([], [], [])
            if r in ready:
                chunk = os.read(r, 1 << 20)
                if chunk:
                    buf += chunk
                    if len(buf) > cap:
                        oversize = True
                        break
                else:
                    eof = True
            if not exited and (pidfd is None or pidfd in ready or not fds):
                wpid, st = os.waitpid(pid, os.WNOHANG)
                if wpid:
                    exited, status = True, st
                    grace_end = time.monotonic() + 1.0
        duration = time.monotonic() - t0
        if not exited:
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
            _, status = os.waitpid(pid, 0)
        os.close(r)
        if pidfd is not None:
            os.close(pidfd)
        self._cleanup(pid)

        body = b""
        if timed_out:
            result = {"status": "timeout", "error": f"timed out after {timeout:g} s (wall clock)"}
        elif oversize:
            result = {"status": "error", "error": f"the code sent more than {cap} bytes of result"}
        else:
            result = None
            if len(buf) >= HEADER.size:
                (hlen,) = HEADER.unpack_from(buf)
                try:
                    parsed = json.loads(bytes(buf[HEADER.size : HEADER.size + hlen]))
                    if parsed.get("status") in ("ok", "error"):
                        result = {"status": parsed["status"], "error": parsed.get("error")}
                        if parsed["status"] == "ok":
                            body = bytes(buf[HEADER.size + hlen :])
                except (ValueError, AttributeError):
                    result = None
            if result is None and exited and buf:
                result = {"status": "error", "error": "the code's process sent a garbled result"}
            if result is None:
                st, msg = _describe_exit(status, job)
                result = {"status": st, "error": msg}
        result["duration"] = duration
        result["stdout"] = _read_tail(os.path.join(job["job_dir"], "output.txt"), int(job["output_tail_bytes"]))
        return pack_result(result, body)


def _load_runner(path: str):
    spec = importlib.util.spec_from_file_location("_sandbox_runner", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "run", None)):
        raise TypeError(f"the sandbox runner {path} defines no run(code, inputs, params)")
    return module


def main(argv: list[str]) -> int:
    config = json.loads(argv[0])
    mode = config["mode"]
    # Keep private copies of the parent pipes and point 0/1 at /dev/null, so a stray print from a library
    # can never corrupt the protocol.
    ctrl_in, reply_out = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.close(devnull)
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    _prctl(_PR_SET_DUMPABLE, 0)  # same-uid processes cannot ptrace or read our memory
    for entry in config.get("sys_path", []):
        if entry not in sys.path:
            sys.path.append(entry)
    runner = _load_runner(config["runner"])
    _HIDDEN_FRAMES.add(os.path.abspath(config["runner"]))
    failed = []
    for name in config.get("preload", []):
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - a missing optional module must not kill the worker
            failed.append(f"{name}: {exc}")
    gc.collect()
    gc.freeze()  # fewer copy-on-write page faults in every forked child
    worker = Worker(mode, runner)
    ready = {
        "op": "ready",
        "pid": os.getpid(),
        "mode": mode,
        "pid_namespace": worker.in_pid_namespace,
        "uid": os.getuid(),
        "vm_size": _vm_size_bytes(),
        "import_failures": failed,
        "python": sys.version.split()[0],
    }
    write_frame(reply_out, json.dumps(ready).encode())
    while True:
        raw = read_frame(ctrl_in, MAX_JOB_BYTES)
        if raw is None:
            return 0
        job = json.loads(raw)
        if job.get("op") == "exit":
            return 0
        write_frame(reply_out, worker.run_job(job))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
