"""Scoring generated ``build_model`` code: the data-science task on top of the generic sandbox (:mod:`envs.isolation`).

* :data:`MODEL_TASK` - what a sandbox worker runs for this task: the runner :mod:`envs.datascience._model_runner`
  (``build_model(x_train, y_train).predict_proba(x_val)``), numpy and scikit-learn preloaded, pandas importable,
  and every dataset bundled with those packages hidden (:func:`bundled_data_paths`).
* :class:`ModelSandbox` - a :class:`envs.isolation.SandboxPool` for that task; :meth:`ModelSandbox.evaluate` returns
  the validated ``predict_proba`` array. Validation *labels* are never sent: scoring happens in the caller.
* :func:`make_splits`, :func:`roc_auc`, :func:`validate_proba` - the reward of Eq. 10 and its checks.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..isolation import Isolation, SandboxPool, SandboxResult, SandboxTask, resolve_isolation
from ..isolation import get_default_pool as _get_default_pool

__all__ = [
    "MODEL_TASK",
    "ModelSandbox",
    "EvaluationResult",
    "get_default_pool",
    "bundled_data_paths",
    "validate_proba",
    "make_splits",
    "roc_auc",
]

# What a warm worker imports before its first job: the modules generated models use (importing them per job would
# cost seconds).
PRELOAD = (
    "numpy",
    "scipy",
    "sklearn",
    "sklearn.base",
    "sklearn.linear_model",
    "sklearn.ensemble",
    "sklearn.preprocessing",
    "sklearn.pipeline",
    "sklearn.svm",
    "sklearn.neighbors",
    "sklearn.tree",
    "sklearn.model_selection",
    "sklearn.naive_bayes",
    "sklearn.impute",
    "sklearn.compose",
    "sklearn.metrics",
    "sklearn.decomposition",
    "sklearn.feature_selection",
    "sklearn.discriminant_analysis",
    "sklearn.calibration",
    "sklearn.neural_network",
)
# Importable on demand (not preloaded): generated code sometimes reaches for pandas.
OPTIONAL = tuple(name for name in ("pandas",) if importlib.util.find_spec(name) is not None)

# Files that can hold a copy of a tabular dataset (also gzip/bz2/xz/zip-compressed).
_TABLE_SUFFIXES = (".csv", ".tsv", ".arff", ".data", ".xls", ".xlsx", ".parquet", ".feather", ".svmlight", ".libsvm")
_COMPRESSION = (".gz", ".bz2", ".xz", ".zip")
# scikit-learn's bundled datasets (load_breast_cancer, load_iris, load_wine, load_digits, ...): data, descriptions,
# sample images.
_SKLEARN_BUNDLED = ("datasets/data", "datasets/descr", "datasets/images")


def _is_table(name: str) -> bool:
    name = name.lower()
    for c in _COMPRESSION:
        if name.endswith(c):
            name = name[: -len(c)]
            break
    return name.endswith(_TABLE_SUFFIXES)


def bundled_data_paths(roots: Sequence[str]) -> list[str]:
    """Paths inside the sandbox's package directories that could hold the data being scored, to hide.

    Every ``tests``/``test`` directory (test fixtures: scikit-learn ships OpenML responses, pandas ships iris, ...),
    scikit-learn's bundled datasets, and any other file with a tabular-data suffix (csv, arff, ... possibly
    compressed). Nothing a package imports at run time is among them, so the packages still import.
    """
    out: list[str] = []
    for root in roots:
        if not os.path.isdir(root):
            continue
        if os.path.basename(root) == "sklearn":
            out += [os.path.join(root, rel) for rel in _SKLEARN_BUNDLED if os.path.isdir(os.path.join(root, rel))]
        skip = set(out)
        for dirpath, dirnames, filenames in os.walk(root):
            keep = []
            for d in dirnames:
                full = os.path.join(dirpath, d)
                if d in ("tests", "test"):
                    out.append(full)
                elif full not in skip:
                    keep.append(d)
            dirnames[:] = keep
            out += [os.path.join(dirpath, f) for f in filenames if _is_table(f)]
    return sorted(set(out))


MODEL_TASK = SandboxTask(
    name="build_model",
    runner=os.path.join(os.path.dirname(os.path.abspath(__file__)), "_model_runner.py"),
    preload=PRELOAD,
    modules=OPTIONAL,
    hide=bundled_data_paths,
)


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


@dataclass
class EvaluationResult(SandboxResult):
    """A :class:`envs.isolation.SandboxResult` whose ``output`` is the (validated) ``predict_proba`` array."""

    @property
    def proba(self) -> np.ndarray | None:
        return self.output


class ModelSandbox(SandboxPool):
    """Warm sandbox workers for ``build_model`` code (:data:`MODEL_TASK`); arguments as :class:`SandboxPool`."""

    def __init__(self, n_workers: int | None = None, timeout: float = 30.0, memory_limit_mb: int = 2048, **kwargs):
        super().__init__(MODEL_TASK, n_workers, timeout, memory_limit_mb, **kwargs)
        self._checked = False

    def check(self) -> dict:
        info = super().check()
        self._checked = True
        return info

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
        seed: int | None = None,
    ) -> EvaluationResult:
        """``model = build_model(x_train, y_train)`` in a worker; return ``model.predict_proba(x_val)``.

        With ``n_classes`` the output is checked by :func:`validate_proba` (status ``"error"`` if unusable).
        ``seed`` seeds the global random generators the code can draw from (numpy's, Python's) before it runs:
        an estimator left without a ``random_state`` then gives the same result every call. Thread-safe; blocks until a worker is free. Never raises for anything the code does.
        """
        n_val = int(np.asarray(x_val).shape[0])
        res = self.run(
            code, {"x_train": x_train, "y_train": y_train, "x_val": x_val},
            params={"function": function, "seed": seed},
            timeout=timeout, memory_limit_mb=memory_limit_mb, max_result_values=n_val * (n_classes or 64) * 4,
        )
        result = EvaluationResult(**vars(res))
        if result.ok and n_classes is not None:
            err = validate_proba(result.output, n_val, int(n_classes))
            if err is not None:
                result.status, result.error, result.output = "error", err, None
        return result


def get_default_pool(sandbox: str | Isolation | None = None) -> ModelSandbox:
    """The process-wide :class:`ModelSandbox` for the isolation ``sandbox`` resolves to (see
    :func:`envs.isolation.resolve_isolation`); created lazily, closed at exit."""
    iso = sandbox if isinstance(sandbox, Isolation) else resolve_isolation(sandbox, source="config")
    return _get_default_pool(MODEL_TASK, iso, factory=ModelSandbox)


# ---------------------------------------------------------------------------------------------------
# the reward (Eq. 10)


def make_splits(y: np.ndarray, n_splits: int = 5, split_seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n_splits`` random 50/50 (train, validation) index splits with seeds ``split_seed + i``.

    Stratified by class when every class has at least two rows (then every class is on both sides);
    otherwise plain random.
    """
    from sklearn.model_selection import train_test_split

    y = np.asarray(y)
    idx = np.arange(len(y))
    stratify = y if np.bincount(y).min(initial=len(y)) >= 2 and len(np.unique(y)) > 1 else None
    out = []
    for seed in range(split_seed, split_seed + n_splits):
        tr, va = train_test_split(idx, test_size=0.5, random_state=seed, stratify=stratify)
        out.append((tr, va))
    return out


def roc_auc(y_true: np.ndarray, proba: np.ndarray, n_classes: int) -> float:
    """ROC AUC of Eq. 10: binary on ``proba[:, 1]``; macro one-vs-one for more than two classes.

    ``proba`` is clipped to [0, 1] and renormalised (it has passed :func:`validate_proba`, which allows 1e-3
    slack that scikit-learn's multi-class check would not). Classes absent from ``y_true`` (only possible for
    classes with a single row) are left out of the one-vs-one average.
    """
    from sklearn.metrics import roc_auc_score

    proba = np.clip(np.asarray(proba, dtype=np.float64), 0.0, 1.0)
    if n_classes == 2:
        return float(roc_auc_score(y_true, proba[:, 1]))
    present = np.unique(y_true)
    if len(present) < n_classes:
        proba = proba[:, present]
    sums = proba.sum(axis=1, keepdims=True)
    proba = np.divide(proba, sums, out=np.full_like(proba, 1.0 / proba.shape[1]), where=sums > 0)
    if len(present) == 2:
        return float(roc_auc_score(y_true == present[1], proba[:, 1]))
    return float(roc_auc_score(y_true, proba, multi_class="ovo", average="macro", labels=present))
