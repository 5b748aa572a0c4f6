"""The sandbox (envs.isolation, with the data-science task of envs.datascience.evaluation): isolation, limits, hostile code.

Every hostile snippet must come back as a failure (or the honest result) with a clear status while the test
process stays healthy, the next job is unaffected and nothing outside the sandbox's temporary directory changes.
The isolation tests need bubblewrap: on a machine that has it they run (and fail if isolation cannot start -
never skip); only where bubblewrap is not installed at all are they skipped, and then the rlimits fallback is
what is tested. A subset also runs in the rlimits fallback.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

import envs.isolation.modes as modes_mod
import envs.isolation.view as view_mod
from envs.isolation import worker as worker_mod
from envs.datascience.evaluation import MODEL_TASK, ModelSandbox, bundled_data_paths, get_default_pool, validate_proba
from envs.isolation import SandboxError, SandboxPool, SandboxTask, isolation_report, resolve_isolation

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"
H = "def build_model(x_train, y_train):\n"
LR = "    from sklearn.linear_model import LogisticRegression\n    return LogisticRegression(max_iter=500).fit(x_train, y_train)\n"
GOOD = H + LR
HAS_BWRAP = shutil.which("bwrap") is not None
needs_bwrap = pytest.mark.skipif(not HAS_BWRAP, reason="bubblewrap is not installed (`make test` installs it where it can)")


def _data(n=120, d=4, k=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    y = (np.argmax(x[:, :k], axis=1)).astype(np.int64)
    return x[: n // 2], y[: n // 2], x[n // 2 :], y[n // 2 :]


TIMEOUT = 1.5  # per call: short, so the suite stays fast
MEMORY_MB = 512


@pytest.fixture(scope="module")
def pool():
    """The process-wide isolated pool (shared with the environment tests: workers start once).

    Where bubblewrap is installed this must work: a SandboxError here fails every isolation test."""
    if not HAS_BWRAP:
        pytest.skip("bubblewrap is not installed (`make test` installs it where it can)")
    p = get_default_pool("isolated")
    assert p.isolation == "isolated"
    return p


@pytest.fixture(scope="module")
def solo():
    """One isolated worker: consecutive jobs are guaranteed to meet the same warm worker."""
    if not HAS_BWRAP:
        pytest.skip("bubblewrap is not installed")
    p = ModelSandbox(n_workers=1, timeout=TIMEOUT, memory_limit_mb=MEMORY_MB, isolation="isolated", grace=2.0)
    yield p
    p.close()


@pytest.fixture(scope="module")
def fallback_pool():
    p = ModelSandbox(n_workers=1, timeout=1.5, memory_limit_mb=MEMORY_MB, isolation="rlimits", grace=1.0, prestart=True)
    yield p
    p.close()


def run(pool, code, k=3, **kw):
    xt, yt, xv, _ = _data(k=k)
    kw.setdefault("timeout", TIMEOUT if pool.timeout > TIMEOUT else pool.timeout)
    kw.setdefault("memory_limit_mb", MEMORY_MB)
    return pool.evaluate(code, xt, yt, xv, n_classes=k, **kw)


def _worker_pids(pool):
    return {w.proc.pid for w in pool._workers if w.proc is not None}


def _assert_clean(pool):
    """No job directory or file is left in any worker's scratch directory."""
    leftovers = [p for w in pool._workers for p in Path(w.dir).rglob("*")]
    assert leftovers == []


# ----------------------------------------------------------------------------- pure parts


def test_validate_proba():
    good = np.full((5, 3), 1 / 3)
    assert validate_proba(good, 5, 3) is None
    assert "shape" in validate_proba(good[:, :2], 5, 3)
    assert "shape" in validate_proba(np.zeros(5), 5, 2)  # 1-D (e.g. hard labels) is refused
    assert "shape" in validate_proba(good[:4], 5, 3)
    bad = good.copy()
    bad[0, 0] = np.nan
    assert "NaN" in validate_proba(bad, 5, 3)
    assert "outside" in validate_proba(np.tile([-0.5, 1.5, 0.0], (5, 1)), 5, 3)
    assert "sum" in validate_proba(np.full((5, 3), 0.2), 5, 3)


def test_seccomp_program_shape():
    for arch in ("x86_64", "aarch64"):
        prog = worker_mod.seccomp_program(arch, 1234)
        assert 10 < len(prog) < 255
        allow = [i for i, ins in enumerate(prog) if ins[0] == 0x06 and ins[3] == 0x7FFF0000]
        assert len(allow) == 2  # the fall-through allow and the "allow" label
        for code, jt, jf, k in prog:
            assert 0 <= jt <= 255 and 0 <= jf <= 255


def test_generic_isolation_module_knows_nothing_of_scikit_learn():
    """envs/isolation/ (pool and worker) is task-agnostic: the scikit-learn evaluation lives in envs/datascience."""
    for path in sorted((REPO / "envs" / "isolation").glob("*.py")):
        text = path.read_text()
        for word in ("sklearn", "predict_proba", "build_model", "x_train", "scikit"):
            assert word not in text, (path.name, word)


def test_bundled_datasets_are_found_for_hiding():
    import sklearn

    root = os.path.dirname(sklearn.__file__)
    hidden = bundled_data_paths([root])
    assert os.path.join(root, "datasets", "data") in hidden
    assert os.path.join(root, "datasets", "descr") in hidden
    assert os.path.join(root, "datasets", "tests") in hidden  # OpenML responses (iris = id 61, ...)
    # and nothing scikit-learn imports at run time
    assert not any(p.endswith(".py") for p in hidden)


# ----------------------------------------------------------------------------- which isolation


def test_isolated_mode_really_runs_where_bubblewrap_is_installed(monkeypatch):
    """Never silently degraded: with bwrap installed, auto means isolated and the worker really is in a namespace."""
    monkeypatch.delenv("ETPO_SANDBOX", raising=False)
    if not HAS_BWRAP:
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            assert resolve_isolation(None).mode == "rlimits"
        return
    iso = resolve_isolation(None)
    assert (iso.mode, iso.requested, iso.source) == ("isolated", "auto", "default")
    p = get_default_pool()
    assert p.isolation == "isolated"
    ready = p.check()
    assert ready["mode"] == "isolated" and ready["pid_namespace"] is True and not ready["import_failures"]
    res = run(p, H + "    import os\n    print('PPID', os.getppid())\n" + LR)
    assert res.status == "ok" and res.isolation == "isolated"
    assert "PPID 2" in res.stdout  # bwrap's init is 1, the worker 2: the job child lives in a PID namespace
    report = isolation_report()
    assert report is not None and "isolated" in {u["mode"] for u in report["pools"]}


def test_auto_without_bubblewrap_falls_back_and_says_so_once(monkeypatch):
    monkeypatch.delenv("ETPO_SANDBOX", raising=False)
    monkeypatch.setattr(modes_mod.shutil, "which", lambda name: None)
    monkeypatch.setattr(modes_mod, "_ANNOUNCED", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = resolve_isolation(None)
        second = resolve_isolation("auto")
    assert first.mode == second.mode == "rlimits"
    assert "not installed" in first.detail and "labels" in first.detail
    announced = [w for w in caught if "bubblewrap" in str(w.message)]
    assert len(announced) == 1  # once per process
    with pytest.raises(SandboxError, match="not installed"):
        resolve_isolation("isolated")


def test_auto_with_a_broken_bubblewrap_is_an_error_with_the_reason(monkeypatch):
    monkeypatch.delenv("ETPO_SANDBOX", raising=False)
    monkeypatch.setattr(modes_mod.shutil, "which", lambda name: "/usr/bin/bwrap")
    monkeypatch.setattr(view_mod, "_BWRAP_PROBE",
                        {"ok": False, "reason": "bwrap failed: setting up uid map: Permission denied", "exe": "/x"})
    with pytest.raises(SandboxError) as info:
        resolve_isolation(None)
    assert "uid map: Permission denied" in str(info.value) and "ETPO_SANDBOX=rlimits" in str(info.value)
    with pytest.raises(SandboxError):
        resolve_isolation("isolated")
    assert resolve_isolation("rlimits").mode == "rlimits"  # chosen explicitly: allowed


def test_sandbox_mode_from_environment_and_config(monkeypatch):
    monkeypatch.setenv("ETPO_SANDBOX", "rlimits")
    iso = resolve_isolation(None)
    assert (iso.mode, iso.source) == ("rlimits", "ETPO_SANDBOX")
    iso = resolve_isolation("rlimits", source="config")
    assert iso.source == "config"
    monkeypatch.setenv("ETPO_SANDBOX", "sideways")
    with pytest.raises(ValueError, match="ETPO_SANDBOX"):
        resolve_isolation(None)
    with pytest.raises(ValueError, match="auto, isolated, rlimits"):
        resolve_isolation("bogus")


# ----------------------------------------------------------------------------- normal operation


def test_good_code_returns_validated_proba(pool):
    xt, yt, xv, yv = _data()
    res = pool.evaluate(GOOD, xt, yt, xv, n_classes=3, timeout=30)
    assert res.status == "ok", res.error
    assert res.proba.shape == (len(xv), 3)
    from sklearn.linear_model import LogisticRegression

    expected = LogisticRegression(max_iter=500).fit(xt, yt).predict_proba(xv)
    np.testing.assert_allclose(res.proba, expected, rtol=1e-6, atol=1e-9)
    assert res.isolation == "isolated"


def test_a_task_without_scikit_learn():
    """The generic pool runs any runner; the sandbox then shows numpy but not scikit-learn."""
    runner = REPO / "tests" / "_square_runner.py"
    task = SandboxTask(name="square", runner=str(runner), preload=("numpy",))
    with SandboxPool(task, n_workers=1, timeout=20, isolation="isolated" if HAS_BWRAP else "rlimits") as p:
        res = p.run("def f(x):\n    return x * x\n", {"x": np.arange(4.0)})
        assert res.status == "ok", res.error
        np.testing.assert_array_equal(res.output, [0.0, 1.0, 4.0, 9.0])
        probe = "def f(x):\n    try:\n        import sklearn\n        return x\n    except ImportError:\n        return -x\n"
        res = p.run(probe, {"x": np.ones(2)})
        assert res.status == "ok"
        if p.isolation == "isolated":
            np.testing.assert_array_equal(res.output, [-1.0, -1.0])  # not installed, as far as the code can see


@needs_bwrap
def test_a_sandbox_that_hides_what_its_task_imports_is_an_error_not_a_stream_of_minus_ones():
    """If the isolated worker cannot import what imports outside (here: numpy's core hidden on purpose), starting it
    fails loudly instead of every job failing quietly with reward -1."""
    runner = REPO / "tests" / "_square_runner.py"
    task = SandboxTask(name="numpy-hidden", runner=str(runner), preload=("numpy",),
                       hide=lambda roots: [os.path.join(r, "_core") for r in roots if os.path.basename(r) == "numpy"])
    with SandboxPool(task, n_workers=1, timeout=20, isolation="isolated") as p:
        with pytest.raises(SandboxError, match="cannot import what imports outside the sandbox: numpy"):
            p.check()


def test_stdout_is_captured_and_capped(pool):
    code = H + "    print('hello from the sandbox')\n    import sys\n    print('x' * 20000, file=sys.stderr)\n" + LR
    res = run(pool, code)
    assert res.status == "ok"
    assert len(res.stdout) <= pool.output_tail_bytes + 10
    res = run(pool, H + "    print('hello from the sandbox')\n" + LR)
    assert "hello from the sandbox" in res.stdout


def test_concurrent_calls_from_threads(pool):
    results = []

    def call():
        results.append(run(pool, GOOD).status)

    threads = [threading.Thread(target=call) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == ["ok"] * 6


def test_sandbox_sees_a_minimal_filesystem_without_network(pool):
    venv_site = os.path.dirname(os.path.dirname(np.__file__))
    code = H + (
        "    import os, socket\n"
        "    print(sorted(os.listdir('/')), os.getuid(), os.getpid())\n"
        "    try:\n        socket.create_connection(('1.1.1.1', 53), timeout=1)\n        print('NET-OPEN')\n"
        "    except OSError as e:\n        print('net:', e)\n"
        "    print('DATA' if os.path.exists(%r) else 'no data')\n" % str(SHARED)
        + "    print('REPO' if os.path.exists(%r) else 'no repo')\n" % str(REPO / "envs")
        + "    print('SITE', sorted(os.listdir(%r)))\n" % venv_site
        + LR
    )
    res = run(pool, code)
    assert res.status == "ok", res.error
    assert "NET-OPEN" not in res.stdout and "net:" in res.stdout
    assert "no data" in res.stdout and "no repo" in res.stdout
    site = res.stdout.split("SITE ")[1].splitlines()[0]
    # exactly the packages the task imports: not torch, not the rest of the virtual environment
    assert "'numpy'" in site and "'sklearn'" in site and "torch" not in site and "etpo" not in site


# ----------------------------------------------------------------------------- hostile code

HOSTILE = {
    "infinite loop": (H + "    while True:\n        pass\n", "timeout", "timed out"),
    "memory bomb": (H + "    blocks = []\n    while True:\n        blocks.append(bytearray(50_000_000))\n", "error", "MemoryError"),
    "numpy memory bomb": (H + "    import numpy as np\n    return np.ones((100_000, 100_000))\n", "error", "Memory"),
    "fork bomb": (H + "    import os\n    while True:\n        os.fork()\n", "error", "Operation not permitted"),
    "subprocess": (H + "    import subprocess\n    subprocess.run(['/bin/sh', '-c', 'echo hi'])\n", "error", "Operation not permitted"),
    "thread bomb": (
        H + "    import threading, time\n    threading.stack_size(32768)\n    while True:\n"
        "        threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n",
        ("error", "timeout"),
        "",
    ),
    "sys.exit": (H + "    import sys\n    sys.exit(3)\n", "error", "sys.exit"),
    "os._exit": (H + "    import os\n    os._exit(0)\n", "error", "exited"),
    "kill getppid": (H + "    import os, signal\n    os.kill(os.getppid(), signal.SIGKILL)\n", "error", "not permitted"),
    "kill everything": (H + "    import os, signal\n    os.kill(-1, signal.SIGKILL)\n", "error", "not permitted"),
    "print 100 MB": (H + "    print('x' * 100_000_000)\n" + LR, "error", "File too large"),
    "no predict_proba": (H + "    return 42\n", "error", "predict_proba"),
    "returns None": (H + "    x = 1\n    return None\n", "error", "None"),
    "wrong shape": (H + "    class M:\n        def predict_proba(self, x):\n            return x[:, :2]\n    return M()\n", "error", "shape"),
    "NaN": (H + "    import numpy as np\n    class M:\n        def predict_proba(self, x):\n            return np.full((len(x), 3), np.nan)\n    return M()\n", "error", "NaN"),
    "labels": (
        H + "    from sklearn.tree import DecisionTreeClassifier\n    m = DecisionTreeClassifier().fit(x_train, y_train)\n"
        "    m.predict_proba = m.predict\n    return m\n",
        "error",
        "shape",
    ),
    "object array": (H + "    class M:\n        def predict_proba(self, x):\n            return [{'a': 1}] * len(x)\n    return M()\n", "error", "dtype"),
    "huge result": (H + "    import numpy as np\n    class M:\n        def predict_proba(self, x):\n            return np.zeros((len(x), 200_000))\n    return M()\n", "error", ""),
    "syntax error": (H + "    return (\n", "error", "SyntaxError"),
    "raises": (H + "    raise ValueError('bad idea')\n", "error", "ValueError: bad idea"),
    "closes result pipe": (H + "    import os\n    os.close(3)\n" + LR, "error", ""),
    # harder cases (issue 13)
    "NUL bytes in the code": (H + "    x = '\x00'\n" + LR, "error", "null bytes"),
    "stderr flood of NUL and invalid UTF-8": (
        H + "    import os\n    for _ in range(2000):\n        os.write(2, b'\\x00\\xff\\xfe' * 4000)\n" + LR, "ok", ""),
    "stderr flood past the cap": (
        H + "    import os\n    while True:\n        os.write(2, b'E' * 65536)\n", "error", "File too large"),
    "CPU oversubscription (n_jobs=-1, huge forest)": (
        H + "    from sklearn.ensemble import RandomForestClassifier\n"
        "    return RandomForestClassifier(n_estimators=100_000, n_jobs=-1).fit(x_train, y_train)\n",
        "timeout", ""),
    "CPU oversubscription (busy threads)": (
        H + "    import threading\n    def spin():\n        while True:\n            pass\n"
        "    for _ in range(8):\n        threading.Thread(target=spin, daemon=True).start()\n    spin()\n",
        "timeout", ""),
    "SysV shared memory": (
        H + "    import ctypes\n    libc = ctypes.CDLL(None, use_errno=True)\n"
        "    if libc.shmget(0, 4096, 0o1666) < 0:\n        raise OSError(ctypes.get_errno(), 'shmget refused: Operation not permitted')\n"
        "    return None\n", "error", "Operation not permitted"),
    "re-limit the warm worker": (
        H + "    import resource, os\n    resource.prlimit(os.getppid(), resource.RLIMIT_CPU, (1, 1))\n" + LR,
        "error", "not permitted"),
    "pin the warm worker to one CPU": (H + "    import os\n    os.sched_setaffinity(os.getppid(), {0})\n" + LR, "error", "not permitted"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_code_fails_cleanly(pool, name, tmp_path):
    code, status, message = HOSTILE[name]
    pids_before = _worker_pids(pool)
    timeout = TIMEOUT if status == "timeout" else 10.0
    t0 = time.monotonic()
    res = run(pool, code, timeout=timeout)
    assert time.monotonic() - t0 < timeout + 8
    statuses = status if isinstance(status, tuple) else (status,)
    assert res.status in statuses, (res.status, res.error)
    if res.status != "ok":
        assert res.proba is None
    assert message in (res.error or ""), res.error
    assert len(res.stdout) <= pool.output_tail_bytes + 10 and "\x00" not in res.stdout
    # the pool still works, with the same warm workers (only an unresponsive worker is ever replaced)
    assert run(pool, GOOD).status == "ok"
    assert not res.worker_replaced
    assert _worker_pids(pool) == pids_before
    _assert_clean(pool)


def test_writes_outside_the_sandbox_change_nothing(pool, tmp_path):
    target = tmp_path / "pwned.txt"
    repo_target = REPO / "PWNED_BY_SANDBOX"
    code = H + (
        f"    for p in [{str(target)!r}, {str(repo_target)!r}, '/etc/pwned', '/usr/pwned', '/dev/shm/pwned', '/dev/pwned',"
        " '/opt/etpo-sandbox/pwned', '/pwned']:\n"
        "        try:\n            open(p, 'w').write('x')\n            print('WROTE', p)\n"
        "        except OSError as e:\n            print('refused', p, e)\n"
        "    open('inside.txt', 'w').write('fine')\n" + LR
    )
    before = set(os.listdir(tmp_path))
    res = run(pool, code)
    assert res.status == "ok", res.error
    assert "WROTE" not in res.stdout
    assert not target.exists() and not repo_target.exists()
    assert set(os.listdir(tmp_path)) == before
    _assert_clean(pool)  # the job directory (with inside.txt) is gone afterwards


def test_killing_the_real_parent_pid_fails(pool):
    me = os.getpid()
    code = H + f"    import os, signal\n    os.kill({me}, signal.SIGTERM)\n" + LR
    res = run(pool, code)
    assert res.status == "error"
    assert os.getpid() == me  # still here


def test_network_connection_fails(pool):
    code = H + "    import socket\n    socket.create_connection(('1.1.1.1', 80), timeout=2)\n" + LR
    res = run(pool, code)
    assert res.status == "error" and ("unreachable" in res.error or "Errno" in res.error)


def test_oversized_code_is_refused_without_running(pool):
    code = GOOD + "# " + "x" * (2 << 20) + "\n"
    res = run(pool, code)
    assert res.status == "error" and "too long" in res.error and res.duration == 0.0
    assert run(pool, GOOD).status == "ok"


def _pids_seen(res):
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("PIDS")][0]
    pids = eval(line.split(" ", 1)[1].rsplit(" ", 1)[0])
    return set(pids), int(line.rsplit(" ", 1)[1])


PIDS_PROBE = H + "    import os\n    print('PIDS', sorted(int(p) for p in os.listdir('/proc') if p.isdigit()), os.getpid())\n" + LR


def test_nothing_survives_the_job(pool):
    """A thread left sleeping is killed with the job child; the next job sees only the worker's processes."""
    code = H + "    import threading, time\n    threading.Thread(target=time.sleep, args=(60,)).start()\n" + LR
    assert run(pool, code).status == "ok"
    pids, me = _pids_seen(run(pool, PIDS_PROBE))
    assert pids - {me} <= {1, 2}  # bwrap's init and the worker


def test_validation_labels_cannot_be_found_in_memory(pool):
    """The code hunts for the validation labels in its frames, globals, gc and the parents' memory."""
    rng = np.random.default_rng(7)
    x = rng.normal(size=(200, 3))
    y = rng.integers(0, 3, size=200)
    xt, yt, xv, yv = x[:100], y[:100], x[100:], y[100:]
    target = hashlib.sha256(np.ascontiguousarray(yv, dtype=np.int64).tobytes()).hexdigest()
    code = H + f"""    import gc, sys, os, hashlib, numpy as np
    seen = set()
    def digest(a):
        try:
            a = np.asarray(a)
            if a.ndim == 1 and a.dtype.kind in 'iuf' and len(a) == {len(yv)}:
                seen.add(hashlib.sha256(np.ascontiguousarray(a, dtype=np.int64).tobytes()).hexdigest())
        except Exception:
            pass
    def visit(obj, depth=0):
        if isinstance(obj, np.ndarray):
            digest(obj)
        elif depth < 3 and isinstance(obj, dict):
            for v in list(obj.values()):
                visit(v, depth + 1)
        elif depth < 3 and isinstance(obj, (list, tuple)):
            for v in obj:
                visit(v, depth + 1)
    f = sys._getframe()
    while f is not None:
        visit(f.f_locals); visit(f.f_globals)
        f = f.f_back
    for obj in gc.get_objects():
        visit(obj, 2)
    for mod in list(sys.modules.values()):
        visit(getattr(mod, '__dict__', {{}}), 1)
    for pid in [os.getppid(), 1, {os.getpid()}]:
        try:
            with open(f'/proc/{{pid}}/mem', 'rb') as fh:
                fh.read(16)
            print('READ-MEM', pid)
        except OSError as e:
            print('mem', pid, type(e).__name__)
    print('DIGESTS', len(seen), ' '.join(sorted(seen)))
""" + LR
    res = pool.evaluate(code, xt, yt, xv, n_classes=3, timeout=10)
    assert res.status == "ok", res.error
    assert "DIGESTS" in res.stdout
    assert int(res.stdout.split("DIGESTS ")[1].split()[0]) >= 1  # it did find arrays (its own y_train)
    assert target not in res.stdout
    assert "READ-MEM" not in res.stdout


# --- label lookup through every reachable copy of the data


def _breast_cancer_task():
    from sklearn.datasets import load_breast_cancer

    ds = load_breast_cancer()
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(ds.target))
    tr, va = idx[:280], idx[280:]
    return ds.data[tr], ds.target[tr], ds.data[va], ds.target[va]


def _copies_cheat(extra_files=()):
    """build_model that looks the validation rows up in any copy of breast_cancer it can reach; raises if none."""
    import sklearn

    csv = os.path.join(os.path.dirname(sklearn.__file__), "datasets", "data", "breast_cancer.csv")
    files = [csv, *extra_files]
    return H + f"""    import numpy as np
    X = y = None
    try:
        from sklearn.datasets import load_breast_cancer
        d = load_breast_cancer()
        X, y = d.data, d.target
        print('COPY via load_breast_cancer')
    except Exception as e:
        print('load_breast_cancer:', type(e).__name__)
    for path in {files!r}:
        if X is not None:
            break
        try:
            raw = np.loadtxt(path, delimiter=',', skiprows=1)
            X, y = raw[:, :-1], raw[:, -1].astype(int)
            print('COPY via', path)
        except Exception as e:
            print('file:', path, type(e).__name__)
    if X is None:
        raise RuntimeError('no copy of the labels found')
    class Oracle:
        def predict_proba(self, x):
            lab = np.array([y[int(np.argmin(((X - row) ** 2).sum(1)))] for row in x], dtype=float)
            return np.stack([1 - lab, lab], 1)
    return Oracle()
"""


def test_bundled_dataset_copies_are_out_of_reach(pool, fallback_pool):
    """scikit-learn ships breast_cancer: looked up by row it gives AUC 1.0 - wherever the code can reach it."""
    from sklearn.metrics import roc_auc_score

    xt, yt, xv, yv = _breast_cancer_task()
    cheat = _copies_cheat()
    # control: where the copy is reachable (the rlimits fallback) the cheat really works
    control = fallback_pool.evaluate(cheat, xt, yt, xv, n_classes=2, timeout=20)
    assert control.status == "ok" and roc_auc_score(yv, control.proba[:, 1]) == 1.0
    res = pool.evaluate(cheat, xt, yt, xv, n_classes=2, timeout=20)
    assert res.status == "error" and "no copy of the labels found" in res.error, res.error
    assert "COPY" not in res.stdout
    # and scikit-learn itself still works
    assert pool.evaluate(GOOD, xt, yt, xv, n_classes=2, timeout=30).status == "ok"


def _dataset_markers():
    """Byte strings that appear in the files of the datasets we score on: first rows, column headers."""
    markers = [b"17.99,10.38,122.8", b"5.1,3.5,1.4,0.2", b"14.23,1.71,2.43", b"0,0,5,13,9,1,0,0"]
    if SHARED.is_dir():
        for csv in SHARED.glob("*/*.csv"):
            with open(csv, "rb") as fh:
                header = fh.readline().strip()
            if len(header) > 12:
                markers.append(header[:60])
    return markers


def test_no_dataset_file_is_visible_anywhere_in_the_sandbox(pool):
    """Walk the whole filesystem the code sees: no non-empty table named like a dataset, no file holding one's rows."""
    from envs.datascience.datasets import dataset_names

    code = H + f"""    import os
    names, markers, hits, seen = {list(dataset_names())!r}, {_dataset_markers()!r}, [], 0
    for top in sorted(os.listdir('/')):
        if top in ('proc', 'sys', 'dev'):
            continue
        for dirpath, dirnames, filenames in os.walk('/' + top):
            for f in filenames:
                seen += 1
                low, path = f.lower(), os.path.join(dirpath, f)
                named = low.split('.')[0] in names
                table = low.endswith(('.csv', '.csv.gz', '.tsv', '.arff', '.arff.gz', '.data', '.gz'))
                if not (named or table) or not os.path.isfile(path) or os.path.getsize(path) == 0:
                    continue
                try:
                    with open(path, 'rb') as fh:
                        head = fh.read(1 << 16)
                except OSError:
                    continue
                if (named and table) or any(m in head for m in markers):
                    hits.append(path)
    print('SEEN', seen)
    print('HITS', len(hits), hits[:20])
""" + LR
    res = run(pool, code, timeout=60)
    assert res.status == "ok", res.error
    assert int(res.stdout.split("SEEN ")[1].split()[0]) > 1000  # it did walk the (read-only) system
    assert "HITS 0 []" in res.stdout, res.stdout


def test_data_directory_copies_are_out_of_reach(pool, fallback_pool, shared_datasets, monkeypatch):
    """The data directory (absolute, via ETPO_DATA_DIR, or ../shared/datasets from the project) is not in the sandbox."""
    monkeypatch.setenv("ETPO_DATA_DIR", str(shared_datasets))
    targets = [str(shared_datasets / "breast_w" / "breast_w.csv"), "../shared/datasets/breast_w/breast_w.csv",
               os.path.relpath(shared_datasets / "breast_w" / "breast_w.csv", REPO)]
    code = H + f"""    import os
    for p in {targets!r} + [os.path.join(os.environ.get('ETPO_DATA_DIR', '/nonexistent'), 'breast_w', 'breast_w.csv')]:
        for base in ('', os.getcwd(), {str(REPO)!r}):
            path = os.path.join(base, p)
            try:
                with open(path) as fh:
                    print('READ', path, len(fh.read()))
            except OSError as e:
                print('no', path, e.errno)
""" + LR
    control = run(fallback_pool, code, timeout=20)
    assert control.status == "ok" and "READ" in control.stdout  # reachable without isolation: the test is real
    res = run(pool, code, timeout=20)
    assert res.status == "ok", res.error
    assert "READ" not in res.stdout


SECRET_VAR = "ETPO_TRAINER_SECRET"


def test_trainer_environment_and_proc_are_out_of_reach(pool, monkeypatch):
    secret = hashlib.sha256(os.urandom(16)).hexdigest()
    monkeypatch.setenv(SECRET_VAR, secret)
    me = os.getpid()
    code = H + f"""    import os
    found = []
    if any({secret!r} in v for v in os.environ.values()):
        found.append('environ')
    for pid in [p for p in os.listdir('/proc') if p.isdigit()] + [{str(me)!r}]:
        for what in ('environ', 'cmdline'):
            try:
                with open(f'/proc/{{pid}}/{{what}}', 'rb') as fh:
                    if {secret!r}.encode() in fh.read():
                        found.append(pid + '/' + what)
            except OSError:
                pass
    print('TRAINER-PID-VISIBLE' if os.path.exists('/proc/{me}/status') and
          'pytest' in open('/proc/{me}/cmdline', 'rb').read().decode(errors='replace') else 'trainer pid not visible')
    print('FOUND', found)
""" + LR
    # the secret is in this (the trainer's) environment; the worker started without it
    res = run(pool, code)
    assert res.status == "ok", res.error
    assert "FOUND []" in res.stdout and "trainer pid not visible" in res.stdout
    assert secret not in res.stdout


# --- state persisting from one job to the next in a warm worker


def test_no_memory_is_shared_writable_with_the_warm_worker(pool):
    """A job is a forked copy: no writable shared mapping through which it could reach the worker or a later job."""
    code = H + "    print('SHARED', [l for l in open('/proc/self/maps') if l.split()[1][1:3] == 'w' and l.split()[1][3] == 's'])\n" + LR
    res = run(pool, code)
    assert res.status == "ok" and "SHARED []" in res.stdout, res.stdout


def test_the_environment_takes_its_sandbox_from_config_or_environment(monkeypatch):
    from envs.datascience import DataScienceEnv

    monkeypatch.setenv("ETPO_SANDBOX", "rlimits")
    env = DataScienceEnv("breast_cancer", n_splits=1)
    assert env.isolation == "rlimits" and env.isolation_info.source == "ETPO_SANDBOX"
    assert {"task": "build_model", **env.isolation_info.as_dict()} in isolation_report()["pools"]
    if HAS_BWRAP:  # the config's choice wins over the environment variable
        env = DataScienceEnv("breast_cancer", n_splits=1, sandbox="isolated")
        assert env.isolation == "isolated" and env.isolation_info.source == "config"
    with pytest.raises(ValueError, match="sideways"):
        DataScienceEnv("breast_cancer", n_splits=1, sandbox="sideways")

POLLUTE = H + """    import os, sys, threading, time, numpy as np, sklearn.metrics, sklearn.linear_model
    places = [os.getcwd(), os.environ['HOME'], os.environ['TMPDIR'], os.path.dirname(os.getcwd()), '/tmp', '/dev/shm',
              '/var/tmp', '/']
    for d in places:
        try:
            open(os.path.join(d, 'planted'), 'w').write('x')
            print('planted in', d)
        except OSError:
            pass
    os.environ['PLANTED'] = '1'
    os.environ['OMP_NUM_THREADS'] = '64'
    sklearn.metrics.roc_auc_score = lambda *a, **k: 1.0
    np.asarray = lambda *a, **k: np.zeros((len(a[0]), 3))
    sklearn.linear_model.LogisticRegression.predict_proba = lambda self, x: np.full((len(x), 3), 1 / 3)
    def later():
        time.sleep(0.3)
        sklearn.linear_model.LogisticRegression.predict_proba = lambda self, x: np.full((len(x), 3), 1 / 3)
    threading.Thread(target=later).start()
    import atexit
    atexit.register(lambda: open('/tmp/atexit', 'w').write('x'))
""" + LR

CHECK_CLEAN = H + """    import os, sys, glob, sklearn.metrics, sklearn.linear_model
    leftovers = [p for p in glob.glob('/tmp/**/planted', recursive=True) + glob.glob('/dev/shm/*') + glob.glob('/var/tmp/*')
                 + glob.glob(os.path.dirname(os.getcwd()) + '/*') if os.path.basename(p) != os.path.basename(os.getcwd())]
    print('LEFTOVERS', sorted(set(leftovers)))
    print('ENV', os.environ.get('PLANTED'), os.environ.get('OMP_NUM_THREADS'))
    print('PATCHED', getattr(sklearn.metrics.roc_auc_score, '__name__', '?'))
""" + LR


def test_state_does_not_persist_between_jobs_in_a_warm_worker(solo):
    """Job 1 plants files, variables, patched modules and a thread; job 2 on the same worker is untouched."""
    from sklearn.linear_model import LogisticRegression

    xt, yt, xv, yv = _data()
    expected = LogisticRegression(max_iter=500).fit(xt, yt).predict_proba(xv)
    pid = _worker_pids(solo)
    first = solo.evaluate(POLLUTE, xt, yt, xv, n_classes=3, timeout=10)
    assert first.status in ("ok", "error"), first.error  # whatever it returns, it must not reach job 2
    time.sleep(0.5)  # the planted thread would have fired by now
    second = solo.evaluate(CHECK_CLEAN, xt, yt, xv, n_classes=3, timeout=10)
    assert second.status == "ok", second.error
    assert "LEFTOVERS []" in second.stdout and "ENV None 1" in second.stdout and "PATCHED roc_auc_score" in second.stdout
    np.testing.assert_allclose(second.proba, expected, rtol=1e-6, atol=1e-9)  # the honest result
    assert _worker_pids(solo) == pid or not pid  # the same warm worker served both
    pids, me = _pids_seen(solo.evaluate(PIDS_PROBE, xt, yt, xv, n_classes=3, timeout=10))
    assert pids - {me} <= {1, 2}  # the planted thread is gone with its process
    _assert_clean(solo)


def test_a_polluting_job_does_not_change_a_later_reward(solo):
    """The same through the environment: the reward after a hostile step equals the reward without it."""
    from envs.datascience import DataScienceEnv

    honest_body = LR.replace("max_iter=500", "max_iter=1000")
    env = DataScienceEnv("breast_cancer", pool=solo, n_splits=2, timeout=20.0, memory_limit_mb=1024, max_steps=3)
    env.reset()
    reference = env.evaluate(honest_body)
    assert reference["status"] == "ok"
    env.reset()
    polluting_body = POLLUTE.split("\n", 1)[1].rsplit(LR, 1)[0] + "    raise RuntimeError('planted everything')\n"
    _, r1, term1, *_ = env.step(polluting_body)
    assert r1 == -1.0 and not term1
    _, r2, term, _, info = env.step(honest_body)
    assert info["status"] == "ok" and term
    assert r2 == pytest.approx(reference["auc"], abs=1e-12)


# --- hostile actions through the environment: reward -1 (or the honest AUC), a bounded next observation

ENV_ACTIONS = {
    "NUL bytes before the body": "\x00" * 1000 + LR,
    "NUL byte inside the body": "    x = 1\x00\n" + LR,
    "5 MB of text": "a" * 5_000_000,
    "5 MB body": LR + "    # " + "x" * 5_000_000 + "\n",
    "100k lines": "    x = 1\n" * 100_000 + LR,
    "lone surrogates": "    s = '\udcff\ud800'\n" + LR,
    "stderr flood then failure": "    import sys\n    for _ in range(3000):\n        print('E' * 9000, file=sys.stderr)\n"
                                 "    raise ValueError('after the flood')\n",
}


@pytest.mark.parametrize("name", list(ENV_ACTIONS))
def test_hostile_actions_through_the_environment(pool, name):
    from envs.datascience import DataScienceEnv

    env = DataScienceEnv("breast_cancer", pool=pool, n_splits=1, timeout=20.0, memory_limit_mb=1024, max_steps=2)
    prompt, _ = env.reset()
    pids, replaced = _worker_pids(pool), pool.stats["replaced"]
    t0 = time.monotonic()
    obs, reward, terminated, truncated, info = env.step(ENV_ACTIONS[name])
    assert time.monotonic() - t0 < 25
    if info["status"] == "ok":  # the honest AUC of the model in the (cut) action
        assert 0.5 < reward <= 1.0 and terminated
    else:
        assert reward == -1.0 and not terminated
    # the next observation: the prompt, at most the (cut) code, a short error - never the action's megabytes
    assert len(obs) <= len(prompt) + 30_000, len(obs)
    assert len(info["stdout"]) <= pool.output_tail_bytes + 10 and len(info["error"] or "") <= 1000
    assert pids <= _worker_pids(pool) and pool.stats["replaced"] == replaced  # the warm workers are unharmed
    _assert_clean(pool)


def test_user_namespace_variant(monkeypatch):
    """The variant used when the caller is not root (bwrap --unshare-user), exercised here by pretending."""
    if not HAS_BWRAP:
        pytest.skip("bubblewrap is not installed")
    p = ModelSandbox(n_workers=1, timeout=TIMEOUT, memory_limit_mb=MEMORY_MB, isolation="isolated")
    p._privileged = False
    p._launch.privileged = False
    try:
        res = run(p, H + "    import os\n    print('UID', os.getuid())\n" + LR, timeout=30)
        assert res.status == "ok", res.error
        assert "UID 65534" in res.stdout
        assert "not permitted" in run(p, HOSTILE["fork bomb"][0]).error
        assert "Read-only file system" in run(p, H + "    open('/opt/x', 'w')\n    return 1\n").error
        me = os.getpid()
        assert run(p, H + f"    import os\n    os.kill({me}, 15)\n    return 1\n").status == "error"
        # here the code has the worker's uid: the seccomp filter is what keeps it from re-limiting the worker
        assert "not permitted" in run(p, HOSTILE["re-limit the warm worker"][0]).error
        # and files it plants anywhere writable are gone for the next job
        run(p, POLLUTE)
        res = run(p, CHECK_CLEAN)
        assert res.status == "ok" and "LEFTOVERS []" in res.stdout, res.stdout
    finally:
        p.close()


# ----------------------------------------------------------------------------- rlimits fallback

FALLBACK_CASES = ["infinite loop", "memory bomb", "fork bomb", "subprocess", "sys.exit", "os._exit", "kill getppid",
                  "kill everything", "print 100 MB", "wrong shape", "NaN", "labels", "NUL bytes in the code",
                  "CPU oversubscription (n_jobs=-1, huge forest)", "re-limit the warm worker"]


@pytest.mark.parametrize("name", FALLBACK_CASES)
def test_fallback_rlimits_mode(fallback_pool, name):
    code, status, message = HOSTILE[name]
    # a gradual memory bomb needs a moment on a loaded machine; only the loops have to wait for the timeout
    res = run(fallback_pool, code, timeout=1.5 if status == "timeout" else 10.0)
    assert res.status == status, (res.status, res.error)
    assert message in (res.error or "")
    assert run(fallback_pool, GOOD).status == "ok"


def test_fallback_cannot_kill_the_test_process(fallback_pool):
    me = os.getpid()
    res = run(fallback_pool, H + f"    import os, signal\n    os.kill({me}, signal.SIGTERM)\n    return None\n")
    assert res.status == "error" and "not permitted" in res.error


def test_pool_refuses_use_after_fork(fallback_pool):
    """A forked copy of the caller must not talk to the parent's workers (nor stop them when it exits)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report what happens, then leave without running atexit handlers
        try:
            run(fallback_pool, GOOD)
            msg = b"used"
        except Exception as exc:  # noqa: BLE001
            msg = type(exc).__name__.encode()
        os.write(w, msg)
        os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    assert os.read(r, 100) == b"SandboxError"
    os.close(r)
    assert run(fallback_pool, GOOD).status == "ok"


def test_pool_close_is_idempotent_and_cleans_up():
    p = ModelSandbox(n_workers=1, isolation="rlimits")
    base = p.directory
    assert os.path.isdir(base)
    assert p.check()["mode"] == "rlimits"
    proc = p._workers[0].proc
    p.close()
    p.close()
    assert not os.path.exists(base) and proc.poll() is not None
    with pytest.raises(SandboxError):
        run(p, GOOD)


def test_closing_a_pool_mid_job_returns_promptly():
    """What a stopping run relies on: close() from another thread ends an in-flight call at once."""
    p = ModelSandbox(n_workers=1, isolation="rlimits", timeout=60, prestart=True)
    p._workers[0].wait_ready(60)  # in flight means running: on a loaded machine a worker can take seconds to start
    result = {}

    def call():
        result["res"] = run(p, H + "    import time\n    time.sleep(60)\n", timeout=60)

    t = threading.Thread(target=call)
    t.start()
    time.sleep(1.5)
    t0 = time.monotonic()
    p.close()
    t.join(10)
    assert not t.is_alive() and time.monotonic() - t0 < 10
    assert result["res"].status == "error" and "closed" in result["res"].error
    assert not os.path.exists(p.directory)


def test_closing_a_pool_while_its_worker_starts_says_so(monkeypatch):
    """close() while a call waits for its worker to start (a loaded machine): the call's error names the close, not a
    worker that failed to start. The start is held until the close, as a slow one would be."""
    p = ModelSandbox(n_workers=1, isolation="rlimits", timeout=60)
    worker = p._workers[0]

    def slow_start(timeout):
        while not p.closed:
            time.sleep(0.01)
        raise SandboxError("sandbox worker (rlimits) failed to start (_WorkerDied: worker pipe closed)")

    monkeypatch.setattr(worker, "wait_ready", slow_start)
    result = {}

    def call():
        try:
            run(p, GOOD, timeout=60)
        except SandboxError as err:
            result["error"] = str(err)

    t = threading.Thread(target=call)
    t.start()
    time.sleep(0.3)
    p.close()
    t.join(10)
    assert not t.is_alive() and result["error"] == "the sandbox pool was closed while its worker started"


def test_unresponsive_worker_is_killed_by_the_parent(fallback_pool):
    """If the worker itself stops answering (here: SIGSTOP), the parent's deadline kills and replaces it."""
    w = fallback_pool._workers[0]
    w.wait_ready(60)
    for pid in _descendants(w.proc.pid):
        os.kill(pid, signal.SIGSTOP)
    res = run(fallback_pool, GOOD, timeout=0.5)
    assert res.status == "timeout" and res.worker_replaced, (res.status, res.error)
    assert not w.alive()  # killed; a fresh one starts on the next call (see test_dead_worker_is_replaced)


def test_dead_worker_is_replaced(fallback_pool):
    """A worker that died (killed here; the previous test already left it dead) is replaced on the next call."""
    w = fallback_pool._workers[0]
    if w.alive():
        os.killpg(w.proc.pid, signal.SIGKILL)
        w.proc.wait()
    first = run(fallback_pool, GOOD, timeout=30)
    assert first.status == "ok" and first.worker_replaced
    assert run(fallback_pool, GOOD).status == "ok"


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def test_model_task_is_what_the_env_uses():
    assert MODEL_TASK.name == "build_model" and "sklearn" in MODEL_TASK.preload and os.path.isfile(MODEL_TASK.runner)
