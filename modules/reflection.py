"""Reflection: the untrained baseline (the paper's "CodeLlama-7B Reflection" column).

The same rollout pipeline -- multi-step episodes in which a failed attempt is followed by a reflection prompt that
shows the code and its error -- sampling from the untouched base model. It never changes a weight: there is no
optimizer and ``learn`` does nothing, so it runs through ``python -m etpo.fit`` like the trained contenders and its
charts overlay theirs.
"""

from __future__ import annotations

from typing import Mapping

from datamodules.batch import RolloutBatch
from modules.agent import AgentModule

__all__ = ["ReflectionModule"]


class ReflectionModule(AgentModule):
    """Sample, reflect, retry -- no learning."""

    contender = "reflection"

    def configure_optimizers(self):
        return None  # nothing is trained

    def learn(self, batch: RolloutBatch) -> Mapping[str, float]:
        return {}
