"""The rollout batch: what the rollout DataModule hands to an algorithm module, typed.

A :class:`RolloutBatch` holds ``B`` transitions ``(s_t, a_t, r_t, s_{t+1})`` as token ids only -- nothing
vocabulary-sized is stored between rollout and update; every per-token value, log-probability and KL is computed
by the module inside its training step. Shapes and conventions:

=====================  ==========  =================================================================================
field                  shape       meaning
=====================  ==========  =================================================================================
``prompt_ids/_mask``   [B, P]      the state ``s_t`` exactly as the model read it, **left**-padded (mask 1 = real)
``action_ids/_mask``   [B, L]      the sampled action ``a_t``, **right**-padded; the mask includes the final EOS
``rewards``            [B]         ``r_t`` (float32)
``terminated``         [B] bool    the environment ended the episode (e.g. the code ran)
``truncated``          [B] bool    the step limit ended the episode
``next_index``         [B] long    row of the transition that acts in ``s_{t+1}`` when it is in this batch, else -1
``next_needed``        [K] long    rows whose ``s_{t+1}`` goes on but is not in the batch: their next prompts are
                                   ``next_prompt_ids/_mask`` [K, P'] (left-padded), in this order
``env_index``          [B] long    which environment took the step
``episode_step``       [B] long    steps taken in the episode after this one (1 for a first attempt)
``runnable``           [B] bool    the environment reported status ``ok`` (for the data-science env: the code ran)
``policy_version``     int         the module's ``policy_version`` when the batch was sampled (on-policy check)
``sampling``           -           the sampling settings the actions were drawn with (the behaviour policy)
``metrics``            -           rollout statistics of this batch (:class:`RolloutMetrics`)
``relabelled``         -           None, or (where the environment allows it and the module asks: its
                                   ``relabels_actions``) the batch's later-step transitions moved to their episode's
                                   first state, as a batch of their own (docs/method.md, section 4b); counted nowhere
=====================  ==========  =================================================================================

Episode ends follow the paper: "a done signal will also be received if t reaches a pre-set maximum step limit",
so :attr:`RolloutBatch.dones` is ``terminated or truncated`` and no value is bootstrapped through either.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

__all__ = ["GenerationConfig", "RolloutBatch", "RolloutMetrics", "pad_rows"]


@dataclass
class GenerationConfig:
    """Sampling settings shared by every contender (the paper's: temperature 0.5, top-k 50, <= 256 tokens)."""

    max_new_tokens: int = 256
    temperature: float = 0.5
    top_k: int = 50
    top_p: float = 1.0
    #: end an action early once its text contains one of these (e.g. a new top-level ``def``/docstring after
    #: the requested function body); empty = only EOS and max_new_tokens end an action
    stop_strings: list[str] = field(default_factory=list)

    @property
    def samples_from_the_policy(self) -> bool:
        """True when sampling draws from the policy's own distribution (no temperature, top-k or top-p)."""
        return self.temperature == 1.0 and not self.top_k and self.top_p >= 1.0


@dataclass
class RolloutMetrics:
    """Rollout statistics of one batch, logged under ``charts/`` by every contender."""

    avg_reward: float
    best_reward: float  # best reward of the run so far
    runnable_fraction: float
    env_steps: float
    sps: float
    episodes: float
    runnable_reward: Optional[float] = None  # mean reward of the batch's runnable answers (None: none ran)
    batch_best_reward: Optional[float] = None  # best reward within this batch
    generation_s: float = 0.0  # seconds spent sampling the batch's actions
    environment_s: float = 0.0  # seconds spent stepping the environments (running the generated code)
    generated_tokens: int = 0  # action tokens sampled for the batch
    # {class: {"n", "runnable", "mean_reward"}} where the environment names its answers' classes (None: it does not)
    answer_classes: Optional[dict] = None

    @property
    def generated_tokens_per_s(self) -> float:
        return self.generated_tokens / self.generation_s if self.generation_s > 0 else 0.0

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


@dataclass
class RolloutBatch:
    """``B`` transitions sampled by the current policy (see the module docstring for every field)."""

    prompt_ids: Tensor
    prompt_mask: Tensor
    action_ids: Tensor
    action_mask: Tensor
    rewards: Tensor
    terminated: Tensor
    truncated: Tensor
    next_index: Tensor
    next_needed: Tensor
    env_index: Tensor
    episode_step: Tensor
    runnable: Tensor
    policy_version: int
    sampling: GenerationConfig
    metrics: RolloutMetrics
    next_prompt_ids: Optional[Tensor] = None
    next_prompt_mask: Optional[Tensor] = None
    relabelled: Optional["RolloutBatch"] = None

    def __post_init__(self) -> None:
        b = self.rewards.shape[0]
        for name in ("prompt_ids", "prompt_mask", "action_ids", "action_mask", "terminated", "truncated",
                     "next_index", "env_index", "episode_step", "runnable"):
            value = getattr(self, name)
            if value.shape[0] != b:
                raise ValueError(f"RolloutBatch.{name} has {value.shape[0]} rows, rewards has {b}")
        k = self.next_needed.numel()
        if k and (self.next_prompt_ids is None or self.next_prompt_ids.shape[0] != k):
            raise ValueError(f"RolloutBatch: next_needed lists {k} rows but next_prompt_ids has "
                             f"{None if self.next_prompt_ids is None else self.next_prompt_ids.shape[0]}")

    def __len__(self) -> int:
        return int(self.rewards.shape[0])

    @property
    def dones(self) -> Tensor:
        """float32 [B]: 1 where the episode ended after this step (terminated or truncated) -- no bootstrap."""
        return (self.terminated | self.truncated).float()

    @property
    def device(self) -> torch.device:
        return self.rewards.device

    def to(self, device: torch.device | str) -> "RolloutBatch":
        """A copy with every tensor on ``device`` (the other fields shared)."""
        moved = {f.name: (v.to(device) if isinstance(v, (Tensor, RolloutBatch)) else v)
                 for f in dataclasses.fields(self) for v in [getattr(self, f.name)]}
        return RolloutBatch(**moved)

    def rows(self, index: Tensor | slice) -> "RolloutBatch":
        """The transitions ``index`` as a batch of their own (padding the subset no longer needs trimmed).

        Links between transitions are dropped (``next_index = -1``, no next prompts): a sub-batch is for methods
        that look at each transition on its own (minibatches of a surrogate loss, credit displays)."""
        if isinstance(index, slice):
            index = torch.arange(len(self), device=self.device)[index]
        index = index.to(self.device)
        prompt_ids, prompt_mask = self.prompt_ids[index], self.prompt_mask[index]
        keep = prompt_mask.sum(0) > 0  # left padding: leading columns no row of the subset uses
        action_ids, action_mask = self.action_ids[index], self.action_mask[index]
        width = max(1, int(action_mask.sum(1).max())) if len(index) else 1
        return RolloutBatch(
            prompt_ids=prompt_ids[:, keep], prompt_mask=prompt_mask[:, keep],
            action_ids=action_ids[:, :width], action_mask=action_mask[:, :width],
            rewards=self.rewards[index], terminated=self.terminated[index], truncated=self.truncated[index],
            next_index=torch.full_like(self.next_index[index], -1),
            next_needed=self.next_needed.new_zeros(0),
            env_index=self.env_index[index], episode_step=self.episode_step[index], runnable=self.runnable[index],
            policy_version=self.policy_version, sampling=self.sampling, metrics=self.metrics,
        )

    def concat(self, other: "RolloutBatch") -> "RolloutBatch":
        """This batch's transitions followed by ``other``'s, as one batch: the rows re-padded to a common width, the
        links and next prompts of ``other`` shifted to their new rows (neither batch links into the other). The
        sampling settings, policy version and metrics are this batch's."""
        n = len(self)

        def unpad(ids: Tensor, mask: Tensor) -> list[list[int]]:
            return [row[m.bool()].tolist() for row, m in zip(ids.cpu(), mask.cpu())]

        prompt_ids, prompt_mask = pad_rows(unpad(self.prompt_ids, self.prompt_mask)
                                           + unpad(other.prompt_ids, other.prompt_mask), "left")
        action_ids, action_mask = pad_rows(unpad(self.action_ids, self.action_mask)
                                           + unpad(other.action_ids, other.action_mask), "right")
        nexts = [unpad(b.next_prompt_ids, b.next_prompt_mask) if b.next_needed.numel() else [] for b in (self, other)]
        next_ids, next_mask = pad_rows(nexts[0] + nexts[1], "left") if nexts[0] + nexts[1] else (None, None)
        shifted = torch.where(other.next_index >= 0, other.next_index + n, other.next_index)
        cat = lambda name: torch.cat([getattr(self, name).cpu(), getattr(other, name).cpu()])  # noqa: E731
        joined = RolloutBatch(
            prompt_ids=prompt_ids, prompt_mask=prompt_mask, action_ids=action_ids, action_mask=action_mask,
            rewards=cat("rewards"), terminated=cat("terminated"), truncated=cat("truncated"),
            next_index=torch.cat([self.next_index.cpu(), shifted.cpu()]),
            next_needed=torch.cat([self.next_needed.cpu(), other.next_needed.cpu() + n]),
            env_index=cat("env_index"), episode_step=cat("episode_step"), runnable=cat("runnable"),
            policy_version=self.policy_version, sampling=self.sampling, metrics=self.metrics,
            next_prompt_ids=next_ids, next_prompt_mask=next_mask)
        return joined.to(self.device)

    def prompt_groups(self) -> Tensor:
        """long [B]: one id per distinct prompt (rows with token-identical states share an id, numbered in order of
        first appearance). The groups of group-relative methods such as GRPO."""
        keys: dict[tuple[int, ...], int] = {}
        ids = []
        for row, mask in zip(self.prompt_ids.cpu(), self.prompt_mask.cpu()):
            key = tuple(row[mask.bool()].tolist())
            ids.append(keys.setdefault(key, len(keys)))
        return torch.tensor(ids, dtype=torch.long, device=self.device)


def pad_rows(rows: list[list[int]], side: str, pad: int = 0) -> tuple[Tensor, Tensor]:
    """``(ids, mask)`` long tensors of token-id rows padded to one width on the ``"left"`` (prompts, for generation
    and scoring) or the ``"right"`` (actions); mask 1 = real token."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    width = max(1, max((len(r) for r in rows), default=0))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            cols = slice(width - len(r), width) if side == "left" else slice(0, len(r))
            ids[i, cols] = torch.as_tensor(list(r), dtype=torch.long)
            mask[i, cols] = 1
    return ids, mask

