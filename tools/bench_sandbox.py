"""Time one evaluation of generated code three ways: in-process exec, a cold subprocess, the warm sandbox.

One evaluation = ``model = build_model(x_train, y_train)`` (a 100-tree RandomForest) + ``model.predict_proba(x_val)``
on one 50/50 split of breast_w (from the shared data folder; falls back to scikit-learn's breast_cancer when
it is absent). The three ways:

* ``in-process``: ``exec`` in this interpreter - the unsafe baseline (the reference implementation's way);
* ``cold subprocess``: a fresh ``python`` that imports numpy and scikit-learn, reads the arrays from a file,
  runs the code and writes the probabilities back - what a naive isolated design pays per call;
* ``sandbox (warm)``: :meth:`envs.datascience.evaluation.ModelSandbox.evaluate` on pre-started workers.

Prints a table of medians and the ratios. Goal: the warm sandbox at least 5x faster per call than the cold
subprocess. Usage: ``python tools/bench_sandbox.py [--reps 7] [--dataset breast_w] [--data-dir DIR]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from envs.datascience import DatasetNotFoundError, load_dataset, make_splits  # noqa: E402
from envs.datascience.evaluation import ModelSandbox  # noqa: E402

CODE = """
import numpy as np


def build_model(x_train: np.ndarray, y_train: np.ndarray):
    from sklearn.ensemble import RandomForestClassifier

    model = RandomForestClassifier(n_estimators=100, random_state=0)
    model.fit(x_train, y_train)
    return model
"""

COLD_SCRIPT = """
import sys
import numpy as np
import sklearn.ensemble, sklearn.linear_model, sklearn.preprocessing, sklearn.pipeline
data = np.load(sys.argv[1])
namespace = {}
exec(compile(open(sys.argv[2]).read(), "<generated>", "exec"), namespace)
model = namespace["build_model"](data["x_train"], data["y_train"])
np.save(sys.argv[3], model.predict_proba(data["x_val"]))
"""

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def in_process(xt, yt, xv):
    namespace: dict = {}
    exec(compile(CODE, "<generated>", "exec"), namespace)
    return namespace["build_model"](xt, yt).predict_proba(xv)


def cold_subprocess(xt, yt, xv, workdir: Path):
    np.savez(workdir / "input.npz", x_train=xt, y_train=yt, x_val=xv)
    (workdir / "code.py").write_text(CODE)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(workdir), **{v: "1" for v in THREAD_VARS}}
    subprocess.run(
        [sys.executable, "-I", "-c", COLD_SCRIPT, str(workdir / "input.npz"), str(workdir / "code.py"), str(workdir / "out.npy")],
        check=True, env=env, cwd=workdir,
    )
    return np.load(workdir / "out.npy")


def timed(fn, reps: int) -> tuple[list[float], np.ndarray]:
    times, out = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return times, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--dataset", default="breast_w")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--isolation", default="auto", choices=["auto", "isolated", "rlimits"])
    args = ap.parse_args(argv)

    for var in THREAD_VARS:  # same single-threaded BLAS everywhere, like the sandbox
        os.environ.setdefault(var, "1")
    try:
        ds = load_dataset(args.dataset, data_dir=args.data_dir, download=False)
    except DatasetNotFoundError as exc:
        print(f"note: {exc}\nfalling back to breast_cancer")
        ds = load_dataset("breast_cancer")
    tr, va = make_splits(ds.y, 1, 0)[0]
    xt, yt, xv = ds.X[tr], ds.y[tr], ds.X[va]
    print(f"dataset {ds.name}: x_train {xt.shape}, x_val {xv.shape}; code: RandomForest(100 trees); reps {args.reps}")

    results = {}
    in_process(xt, yt, xv)  # warm the imports of this interpreter
    results["in-process exec (unsafe)"], ref = timed(lambda: in_process(xt, yt, xv), args.reps)

    with tempfile.TemporaryDirectory(prefix="bench-cold-") as tmp:
        results["cold python subprocess"], cold = timed(lambda: cold_subprocess(xt, yt, xv, Path(tmp)), args.reps)

    with ModelSandbox(n_workers=1, timeout=60, isolation=args.isolation, prestart=True) as pool:
        t0 = time.perf_counter()
        first = pool.evaluate(CODE, xt, yt, xv, n_classes=ds.n_classes)
        startup = time.perf_counter() - t0
        assert first.ok, first.error

        def sandbox_call():
            res = pool.evaluate(CODE, xt, yt, xv, n_classes=ds.n_classes)
            assert res.ok, res.error
            return res.proba

        results[f"sandbox, warm worker ({pool.isolation})"], boxed = timed(sandbox_call, args.reps)

    np.testing.assert_allclose(cold, ref)
    np.testing.assert_allclose(boxed, ref)
    medians = {k: statistics.median(v) for k, v in results.items()}
    sandbox_key = [k for k in medians if k.startswith("sandbox")][0]
    print(f"\n(first sandbox call incl. worker start-up: {startup:.2f} s)\n")
    print(f"| way | median s/call | min | max | vs. sandbox |")
    print(f"|---|---|---|---|---|")
    for k, v in results.items():
        print(f"| {k} | {medians[k]:.3f} | {min(v):.3f} | {max(v):.3f} | {medians[k] / medians[sandbox_key]:.2f}x |")
    speedup = medians["cold python subprocess"] / medians[sandbox_key]
    overhead = medians[sandbox_key] - medians["in-process exec (unsafe)"]
    print(f"\nsandbox is {speedup:.1f}x faster than a cold subprocess (goal >= 5x: {'met' if speedup >= 5 else 'NOT met'}); "
          f"its overhead over in-process exec is {overhead * 1000:.0f} ms per call")
    return 0


if __name__ == "__main__":
    sys.exit(main())
