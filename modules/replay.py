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

__all__ = ["AnswerMemory", "StoredTransition", "TransitionReplay", "stored_batch", "stored_transitions"]


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
        if self.capacity:
            self.items.extend(stored_transitions(batch, behaviour_log_probs, policy_version))

    def sample(self, n: int, seed: int, like: RolloutBatch) -> Optional[tuple[RolloutBatch, torch.Tensor]]:
        """``n`` stored transitions drawn uniformly without replacement (``random.Random(seed)``: a resumed run draws
        the same ones) as a batch of their own -- no links between rows, every next state that goes on as a next
        prompt -- with their ``log mu [n, L]``; None when the store is empty. ``like``: a fresh batch whose sampling
        settings and device the replayed batch takes."""
        if not len(self) or n < 1:
            return None
        picked = random.Random(seed).sample(list(self.items), min(n, len(self.items)))
        batch = stored_batch(picked, like)
        log_mu = torch.zeros(batch.action_ids.shape, dtype=torch.float32)
        for i, t in enumerate(picked):
            log_mu[i, : len(t.behaviour_log_probs)] = torch.tensor(t.behaviour_log_probs)
        return batch, log_mu.to(like.device)

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "items": [asdict(t) for t in self.items]}

    def load_state_dict(self, state: dict) -> None:
        self.items.clear()
        for item in state.get("items", []):
            self.items.append(StoredTransition(**item))


def stored_batch(picked: list[StoredTransition], like: RolloutBatch) -> RolloutBatch:
    """Stored transitions as a batch of their own -- no links between rows, every next state that goes on as a next
    prompt -- with the sampling settings, policy version and device of the fresh batch ``like``."""
    prompt_ids, prompt_mask = pad_rows([t.prompt for t in picked], "left")
    action_ids, action_mask = pad_rows([t.action for t in picked], "right")
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
    return batch.to(like.device)


def stored_transitions(batch: RolloutBatch, behaviour_log_probs: Optional[torch.Tensor],
                       policy_version: int) -> list[StoredTransition]:
    """The transitions of a fresh batch as token ids (``behaviour_log_probs [B, L]``: log mu of the taken tokens,
    or None to store none)."""
    pm, am = batch.prompt_mask.cpu().bool(), batch.action_mask.cpu().bool()
    prompts = [row[m].tolist() for row, m in zip(batch.prompt_ids.cpu(), pm)]
    next_rows = {}
    if batch.next_needed.numel():
        nm = batch.next_prompt_mask.cpu().bool()
        for k, b in enumerate(batch.next_needed.cpu().tolist()):
            next_rows[b] = batch.next_prompt_ids[k].cpu()[nm[k]].tolist()
    log_mu = behaviour_log_probs.detach().float().cpu() if behaviour_log_probs is not None else None
    dones = batch.dones.cpu()
    out = []
    for b in range(len(batch)):
        n = int(am[b].sum())
        nxt = None
        if not bool(dones[b]):
            j = int(batch.next_index[b])
            nxt = prompts[j] if j >= 0 else next_rows.get(b)
        out.append(StoredTransition(
            prompt=prompts[b], action=batch.action_ids[b, :n].cpu().tolist(),
            behaviour_log_probs=log_mu[b, :n].tolist() if log_mu is not None else [],
            reward=float(batch.rewards[b]), terminated=bool(batch.terminated[b]), truncated=bool(batch.truncated[b]),
            next_prompt=nxt, policy_version=int(policy_version)))
    return out


class AnswerMemory:
    """The best distinct answers written for each prompt, for the soft-optimal tree backup (docs/method.md, section
    4a): per prompt at most ``per_prompt`` answers (the highest rewards; an answer written again is kept once), for
    the ``max_prompts`` prompts seen last. Rewards are a function of the answer (the data-science env's reward is
    deterministic), so a stored answer's reward stays true; its targets are recomputed whenever it is used.
    """

    def __init__(self, per_prompt: int, max_prompts: int = 64):
        if per_prompt < 0 or max_prompts < 1:
            raise ValueError(f"answer memory: per_prompt must be >= 0 and max_prompts >= 1, got {per_prompt}, "
                             f"{max_prompts}")
        self.per_prompt, self.max_prompts = int(per_prompt), int(max_prompts)
        self.prompts: dict[tuple, list[StoredTransition]] = {}  # insertion order = last seen

    def __len__(self) -> int:
        return sum(len(v) for v in self.prompts.values())

    def add(self, transitions: list[StoredTransition]) -> None:
        if not self.per_prompt:
            return
        for t in transitions:
            key = tuple(t.prompt)
            kept = self.prompts.pop(key, [])
            if all(k.action != t.action for k in kept):
                kept.append(t)
                kept.sort(key=lambda k: -k.reward)  # stable: the earliest of equal rewards stays first
                del kept[self.per_prompt:]
            self.prompts[key] = kept  # re-inserted: most recently seen last
            while len(self.prompts) > self.max_prompts:
                self.prompts.pop(next(iter(self.prompts)))

    def recall(self, batch: RolloutBatch) -> list[StoredTransition]:
        """The stored answers for the prompts of ``batch`` that the batch did not write again itself."""
        pm, am = batch.prompt_mask.cpu().bool(), batch.action_mask.cpu().bool()
        fresh: dict[tuple, set] = {}
        for prompt, action, m, n in zip(batch.prompt_ids.cpu(), batch.action_ids.cpu(), pm, am.long().sum(1)):
            fresh.setdefault(tuple(prompt[m].tolist()), set()).add(tuple(action[: int(n)].tolist()))
        return [t for key, written in fresh.items() for t in self.prompts.get(key, [])
                if tuple(t.action) not in written]

    def state_dict(self) -> dict:
        return {"per_prompt": self.per_prompt, "items": [asdict(t) for v in self.prompts.values() for t in v]}

    def load_state_dict(self, state: dict) -> None:
        self.prompts.clear()
        for item in state.get("items", []):
            t = StoredTransition(**item)
            self.prompts.setdefault(tuple(t.prompt), []).append(t)
