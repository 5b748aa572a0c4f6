"""Process isolation for untrusted code: warm, sandboxed worker processes (task-agnostic).

:class:`SandboxPool` keeps ``n_workers`` worker processes (:mod:`envs.isolation.worker`) that have a task's
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
once (a :class:`SandboxFallbackWarning`). The choice comes from the caller (a config's ``sandbox:``), else the
``ETPO_SANDBOX`` environment variable, else ``"auto"``; :func:`isolation_report` says what the pools of this process
actually use.

Per-job limits, applied in the job child (see :mod:`envs.isolation.worker`): wall-clock ``timeout`` (the
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

Modules: :mod:`~envs.isolation.modes` (which isolation), :mod:`~envs.isolation.view` (what a worker sees: the probe
of the interpreter's files, the bubblewrap command line), :mod:`~envs.isolation.pool` (the warm workers, framing,
default pools), :mod:`~envs.isolation.worker` (the worker process itself: fork per job, limits, seccomp).
"""

from __future__ import annotations

from .errors import SandboxError
from .modes import SANDBOX_ENV_VAR, SANDBOX_MODES, Isolation, SandboxFallbackWarning, resolve_isolation
from .pool import (
    SandboxPool,
    SandboxResult,
    SandboxTask,
    close_all_pools,
    default_n_workers,
    get_default_pool,
    isolation_mark,
    isolation_report,
)
from .view import MountPlan, TaskFiles, bwrap_available, classify_probe, mount_plan, task_files

__all__ = [
    "SANDBOX_MODES",
    "SANDBOX_ENV_VAR",
    "SandboxTask",
    "SandboxPool",
    "SandboxResult",
    "SandboxError",
    "SandboxFallbackWarning",
    "Isolation",
    "resolve_isolation",
    "bwrap_available",
    "task_files",
    "classify_probe",
    "TaskFiles",
    "MountPlan",
    "mount_plan",
    "default_n_workers",
    "get_default_pool",
    "close_all_pools",
    "isolation_report",
    "isolation_mark",
]
