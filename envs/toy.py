"""A tiny deterministic text environment for the trainer's learning tests.

:class:`TargetCharsEnv`: the reward of an action is the fraction of its characters that belong to
``target_chars`` (0 for an empty action), so a policy that learns to emit only those characters earns 1.
With ``max_steps > 1`` the next observation is ``prompt + previous action``, which gives the trainer a
multi-step episode to test bootstrapping between environment steps (docs/method.md, "Eq. 6"). With
``success_reward`` the episode has the data-science env's shape: an action earning at least that much ends it
(terminated) and the step limit ends it otherwise (truncated).
"""

from __future__ import annotations

from .base import EpisodeOverError, TextEnv

__all__ = ["TargetCharsEnv", "target_chars_reward"]


def target_chars_reward(action: str, target_chars: str) -> float:
    """Fraction of the characters of ``action`` that are in ``target_chars``; 0.0 for ``""``."""
    if not action:
        return 0.0
    allowed = set(target_chars)
    return sum(ch in allowed for ch in action) / len(action)


class TargetCharsEnv(TextEnv):
    """Reward = fraction of target characters in the action.

    Without ``success_reward``, ``terminated`` becomes True at step ``max_steps`` (never ``truncated``: the episode
    length is part of the task). With it, ``terminated`` when the reward reaches ``success_reward`` and
    ``truncated`` when ``max_steps`` steps passed without that. ``info`` holds ``status="ok"``, ``steps`` and
    ``reward``.
    """

    def __init__(
        self,
        target_chars: str = "ab",
        prompt: str = "Write a string that uses only the letters a and b:",
        max_steps: int = 1,
        success_reward: float | None = None,
    ):
        if not target_chars:
            raise ValueError("target_chars must not be empty")
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        self.target_chars = target_chars
        self.prompt = prompt
        self.max_steps = int(max_steps)
        self.success_reward = success_reward
        self._steps = 0
        self._done = True

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[str, dict]:
        # Deterministic task: the seed is accepted for the Gymnasium signature only.
        self._steps = 0
        self._done = False
        return self.prompt, {"status": "reset", "steps": 0}

    def step(self, action: str) -> tuple[str, float, bool, bool, dict]:
        if self._done:
            raise EpisodeOverError("episode is over; call reset() first")
        self._steps += 1
        reward = target_chars_reward(action, self.target_chars)
        if self.success_reward is None:
            terminated, truncated = self._steps >= self.max_steps, False
        else:
            terminated = reward >= self.success_reward
            truncated = not terminated and self._steps >= self.max_steps
        self._done = terminated or truncated
        info = {"status": "ok", "steps": self._steps, "reward": reward}
        return self.prompt + action, reward, terminated, truncated, info
