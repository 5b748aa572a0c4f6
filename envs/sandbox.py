"""The sandbox for generated ``build_model`` code, under the names it had before the split (kept for existing code).

Process isolation itself (bubblewrap, rlimits, seccomp, the warm worker pool) is :mod:`envs.isolation` and knows no
task; the scoring of generated scikit-learn code is :mod:`envs.datascience.evaluation`. Here, as before:
``SandboxPool`` is :class:`envs.datascience.evaluation.ModelSandbox` (``pool.evaluate(code, x_train, y_train,
x_val, n_classes=...)``), ``get_default_pool()`` the process-wide one, ``validate_proba`` the output check. New code
should import from those two modules.
"""

from __future__ import annotations

from .datascience.evaluation import EvaluationResult, ModelSandbox, get_default_pool, validate_proba
from .isolation import (
    SANDBOX_ENV_VAR,
    SANDBOX_MODES,
    Isolation,
    SandboxError,
    SandboxResult,
    bwrap_available,
    close_all_pools,
    default_n_workers,
    isolation_report,
    resolve_isolation,
)

SandboxPool = ModelSandbox

__all__ = [
    "SandboxPool",
    "SandboxResult",
    "EvaluationResult",
    "SandboxError",
    "Isolation",
    "SANDBOX_MODES",
    "SANDBOX_ENV_VAR",
    "validate_proba",
    "bwrap_available",
    "resolve_isolation",
    "default_n_workers",
    "get_default_pool",
    "close_all_pools",
    "isolation_report",
]
