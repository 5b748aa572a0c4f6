"""Reflection: the untrained baseline (the paper's "CodeLlama-7B Reflection" column).

The same rollout pipeline -- multi-step episodes in which a failed attempt is followed by a reflection prompt that
shows the code and its error -- sampling from the untouched base model. It never changes a weight: there is no
optimizer and the training step only logs the rollout, so it runs through ``python -m etpo.fit`` like the trained
contenders and its charts overlay theirs.
"""

from __future__ import annotations

from typing import Iterator

from modules.agent import AgentModule
from modules.shared_base import BackboneConfig

__all__ = ["ReflectionModule"]


class ReflectionModule(AgentModule):
    """Sample, reflect, retry -- no learning."""

    contender = "reflection"

    def __init__(self, backbone: BackboneConfig | None = None):
        super().__init__(backbone)

    def configure_optimizers(self):
        return None  # nothing is trained

    def training_step(self, dataloader_iter: Iterator) -> None:
        batch = self.next_batch(dataloader_iter)
        self.log_rollout(batch)
        return None  # no loss: Lightning skips backward and the optimizer step
