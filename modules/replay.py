"""A small replay of past transitions for the ETPO critic -- an option beyond the paper (docs/method.md, "Critic
replay").

Why: once every answer of a batch runs, the critic sees only successes and its Q of the tokens that led to failures
drifts upward (the "forgetting" of the CPU runs); a few past transitions in every soft Bellman step keep them in
its regression. Only the critic sees them: the policy step stays on the fresh, on-policy batch.

Why the targets stay correct: soft Q-learning is off-policy. A replayed transition's targets are recomputed at replay
time, never stored -- the soft values ``V(ctx) = sum_w pi (Qbar - beta log pi / pi_bar)`` under the *current* policy
and target network, the next state's value likewise -- so the one-step target of Eq. 6 is the soft Bellman backup
of the current policy whatever policy sampled the tokens. The multi-step (TD(lambda)) part follows the sampled
tokens, which an older policy chose: its traces are cut to Retrace's ``c = min(1, pi_now / mu)`` with ``mu`` the
sampling distribution that drew each token (its log-probability is stored with the transition), which keeps the
soft Q of the current policy the fixed point for any behaviour (Munos et al. 2016; ``modules.losses.etpo.trace_targets``).

Stored per transition, token ids and one float per action token only: the prompt, the action, ``log mu`` of each
taken token, the reward, the episode's end flags and, where the episode went on, the next prompt.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from datamodules.batch import RolloutBatch, RolloutMetrics, pad_rows

__all__ = ["StoredTransition", "TransitionReplay"]


@dataclass
class StoredTransition:
    """One past transition, token ids only."""

    prompt: list[int]
    action: list[int]
    behaviour_log_probs: list[float]  # log mu(w_j | ctx_j) of each taken token when it was sampled
    reward: float
    terminated: bool
    truncated: bool
    next_prompt: Optional[list[int]]  # s_{t+1} where the episode went on, else None
    policy_version: int  # the policy that sampled it


class TransitionReplay:
    """A first-in first-out store of the last ``capacity`` transitions and a seeded uniform sampler."""

    def __init__(self, capacity: int):
        if capacity < 0:
            raise ValueError(f"replay capacity must be >= 0, got {capacity}")
        self.capacity = int(capacity)
        self.items: deque[StoredTransition] = deque(maxlen=max(1, self.capacity))

    def __len__(self) -> int:
        return len(self.items) if self.capacity else 0

    def add_batch(self, batch: RolloutBatch, behaviour_log_probs: torch.Tensor, policy_version: int) -> None:
        """Store every transition of a fresh batch; ``behaviour_log_probs [B, L]`` are ``log mu`` of its taken tokens
        (the sampling distribution, temperature and top-k included)."""
        if not self.capacity:
            return
        pm, am = batch.prompt_mask.cpu().bool(), batch.action_mask.cpu().bool()
        prompts = [row[m].tolist() for row, m in zip(batch.prompt_ids.cpu(), pm)]
        next_rows = {}
        if batch.next_needed.numel():
            nm = batch.next_prompt_mask.cpu().bool()
            for k, b in enumerate(batch.next_needed.cpu().tolist()):
                next_rows[b] = batch.next_prompt_ids[k].cpu()[nm[k]].tolist()
        log_mu = behaviour_log_probs.detach().float().cpu()
        dones = batch.dones.cpu()
        for b in range(len(batch)):
            n = int(am[b].sum())
            nxt = None
            if not bool(dones[b]):
                j = int(batch.next_index[b])
                nxt = prompts[j] if j >= 0 else next_rows.get(b)
            self.items.append(StoredTransition(
                prompt=prompts[b], action=batch.action_ids[b, :n].cpu().tolist(),
                behaviour_log_probs=log_mu[b, :n].tolist(), reward=float(batch.rewards[b]),
                terminated=bool(batch.terminated[b]), truncated=bool(batch.truncated[b]), next_prompt=nxt,
                policy_version=int(policy_version)))

    def sample(self, n: int, seed: int, like: RolloutBatch) -> Optional[tuple[RolloutBatch, torch.Tensor]]:
        """``n`` stored transitions drawn uniformly without replacement (``random.Random(seed)``: a resumed run draws
        the same ones) as a batch of their own -- no links between rows, every next state that goes on as a next
        prompt -- with their ``log mu [n, L]``; None when the store is empty. ``like``: a fresh batch whose sampling
        settings and device the replayed batch takes."""
        if not len(self) or n < 1:
            return None
        picked = random.Random(seed).sample(list(self.items), min(n, len(self.items)))
        prompt_ids, prompt_mask = pad_rows([t.prompt for t in picked], "left")
        action_ids, action_mask = pad_rows([t.action for t in picked], "right")
        log_mu = torch.zeros(action_ids.shape, dtype=torch.float32)
        for i, t in enumerate(picked):
            log_mu[i, : len(t.behaviour_log_probs)] = torch.tensor(t.behaviour_log_probs)
        going_on = [i for i, t in enumerate(picked) if t.next_prompt is not None]
        next_ids, next_mask = pad_rows([picked[i].next_prompt for i in going_on], "left") if going_on else (None, None)
        rewards = torch.tensor([t.reward for t in picked], dtype=torch.float32)
        batch = RolloutBatch(
            prompt_ids=prompt_ids, prompt_mask=prompt_mask, action_ids=action_ids, action_mask=action_mask,
            rewards=rewards, terminated=torch.tensor([t.terminated for t in picked]),
            truncated=torch.tensor([t.truncated for t in picked]),
            next_index=torch.full((len(picked),), -1, dtype=torch.long),
            next_needed=torch.tensor(going_on, dtype=torch.long),
            env_index=torch.full((len(picked),), -1, dtype=torch.long),
            episode_step=torch.zeros(len(picked), dtype=torch.long),
            runnable=rewards > -1.0, policy_version=like.policy_version, sampling=like.sampling,
            metrics=RolloutMetrics(float(rewards.mean()), float(rewards.max()), 0.0, 0.0, 0.0, 0.0),
            next_prompt_ids=next_ids, next_prompt_mask=next_mask)
        return batch.to(like.device), log_mu.to(like.device)

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "items": [asdict(t) for t in self.items]}

    def load_state_dict(self, state: dict) -> None:
        self.items.clear()
        for item in state.get("items", []):
            self.items.append(StoredTransition(**item))
