"""Test-only pieces for stopping runs (tests/test_fit.py): imported by `python -m etpo.fit` subprocesses through
``--config`` overlays with PYTHONPATH=tests. Nothing here is part of the library."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from envs.datascience import DataScienceEnv
from modules.etpo import ETPOModule

HONEST = (
    "def build_model(x_train, y_train):\n"
    "    from sklearn.linear_model import LogisticRegression\n"
    "    return LogisticRegression(max_iter=200).fit(x_train, y_train)\n"
)
# it must return a model: code without a return statement is refused before it runs (and would not keep the
# sandbox busy)
SLEEPY = ("def build_model(x_train, y_train):\n    import time\n    time.sleep(120)\n"
          "    from sklearn.linear_model import LogisticRegression\n"
          "    return LogisticRegression().fit(x_train, y_train)\n")


class SlowUpdateETPO(ETPOModule):
    """ETPO whose updates after the first ``fast_updates`` take ``slow_seconds`` of torch work (a stand-in for a
    long update on a CPU: many small ops, no sleeping). ``marker`` is written when the slow update starts."""

    def __init__(self, *args, marker: str = "", fast_updates: int = 1, slow_seconds: float = 120.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.marker, self.fast_updates, self.slow_seconds = marker, int(fast_updates), float(slow_seconds)

    def on_after_backward(self) -> None:
        super().on_after_backward()
        if self.policy_version < self.fast_updates:
            return
        if self.marker:
            Path(self.marker).write_text(f"slow update {self.policy_version} started\n")
        end = time.monotonic() + self.slow_seconds
        x = torch.full((32, 32), 0.01)
        while time.monotonic() < end:
            x = torch.tanh(x @ x + 0.01)


class FixedCodeEnv(DataScienceEnv):
    """The data-science env with a short prompt that runs a fixed program whatever the (tiny, random) policy writes:
    honest code for the first ``honest_steps`` steps of each env, then code that sleeps in the sandbox
    (``marker`` is written when that starts), so that a run has sandbox workers busy or warm."""

    def __init__(self, *args, honest_steps: int = 1000, marker: str = "", **kwargs):
        super().__init__(*args, **kwargs)
        self.honest_steps, self.marker, self._total = int(honest_steps), marker, 0

    def reset(self, *, seed=None, options=None):
        _, info = super().reset(seed=seed, options=options)
        return "q:", info

    def step(self, action):
        self._total += 1
        if self._total > self.honest_steps:
            if self.marker:
                Path(self.marker).write_text("sandbox jobs in flight\n")
            code = SLEEPY
        else:
            code = HONEST
        obs, reward, terminated, truncated, info = super().step(code)
        return "q:", reward, terminated, truncated, info
