"""Reflection: the untrained baseline (the paper's "CodeLlama-7B Reflection" column).

The same rollout pipeline -- multi-step episodes in which a failed attempt is followed by a reflection prompt that
shows the code and its error -- sampling from the untouched base model. It never changes a weight of the model and
``learn`` trains nothing, so it runs through ``python -m etpo.fit`` like the trained contenders and its charts
overlay theirs.
"""

from __future__ import annotations

from typing import Mapping

import torch

from datamodules.batch import RolloutBatch
from modules.agent import AgentModule
from modules.shared_base import BackboneConfig

__all__ = ["ReflectionModule"]


class ReflectionModule(AgentModule):
    """Sample, reflect, retry -- no learning."""

    contender = "reflection"

    def __init__(self, backbone: BackboneConfig | None = None):
        super().__init__(backbone)
        # Lightning counts training steps in optimizer steps, and checkpoints (hence resuming) follow that count:
        # one no-op step per batch of an optimizer over a gradient-free placeholder keeps the count in batches.
        self.step_clock = torch.nn.Parameter(torch.zeros(1), requires_grad=False)

    def configure_optimizers(self):
        return torch.optim.SGD([self.step_clock], lr=0.0)

    def learn(self, batch: RolloutBatch) -> Mapping[str, float]:
        (clock,) = self.optimizers_by_name().values()
        clock.step()  # nothing has a gradient: nothing changes, the training-step count advances
        return {}
