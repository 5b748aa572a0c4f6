"""Text environments for ETPO (no torch import anywhere in this package).

``envs.base``: :class:`TextEnv`, :class:`TextVectorEnv`; ``envs.toy``: :class:`TargetCharsEnv`;
``envs.isolation``: generic process isolation for untrusted code (:class:`envs.isolation.SandboxPool`);
``envs.datascience``: :class:`DataScienceEnv`, its datasets and the scoring of generated scikit-learn code in the
sandbox (:mod:`envs.datascience.evaluation`).
The data-science names are imported lazily so that ``import envs`` stays light (no pandas/scikit-learn).
"""

from .base import EpisodeOverError, TextEnv, TextVectorEnv
from .toy import TargetCharsEnv

__all__ = ["TextEnv", "TextVectorEnv", "EpisodeOverError", "TargetCharsEnv", "DataScienceEnv"]


def __getattr__(name: str):
    if name == "DataScienceEnv":
        from .datascience import DataScienceEnv

        return DataScienceEnv
    raise AttributeError(f"module 'envs' has no attribute {name!r}")
