"""Text-environment contract and a thread-parallel vector wrapper.

Implements the ``envs`` contract of ``docs/architecture.md`` (a walk-through: ``docs/extending.md``):

* :class:`TextEnv` follows the Gymnasium API (``reset(*, seed, options) -> (obs, info)``,
  ``step(action) -> (obs, reward, terminated, truncated, info)``, ``close()``), with strings as
  observations and actions. ``terminated`` means the task is over; ``truncated`` means the step limit
  was hit. Both end the episode: the trainer bootstraps through neither (the paper's episode ends,
  ``RolloutBatch.dones``), but it keeps them apart. Every ``info`` carries ``"status"`` (str) and
  ``"steps"`` (int, steps taken in the current episode).
* :class:`TextVectorEnv` steps N such environments in parallel threads and does **not** auto-reset: the
  rollout code resets finished environments itself because it needs the final observation of a step.

Threads (not processes) are enough because the expensive part of a data-science step, running the
generated code, happens in sandbox worker processes and the waiting thread releases the GIL.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import numpy as np

__all__ = ["TextEnv", "TextVectorEnv", "EpisodeOverError"]


class EpisodeOverError(RuntimeError):
    """Raised by ``step`` when the episode has ended (or never started) and ``reset`` was not called."""


class TextEnv:
    """Base class of the text environments (Gymnasium conventions, string observations/actions).

    Subclasses implement :meth:`reset` and :meth:`step`; :meth:`close` releases resources and may be
    called more than once.
    """

    metadata: dict[str, Any] = {"render_modes": []}

    #: True where an action's reward, next observation and termination do not depend on the state it is taken in
    #: -- only the step limit's truncation does -- and every episode starts from the same observation. An action
    #: taken at any state of an episode is then an exact transition from the episode's first observation too, which
    #: off-policy learners may use (``RolloutBatch.relabelled``; docs/method.md, section 4b).
    actions_relabel_to_first_state: bool = False

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[str, dict]:
        """Start a new episode; return the first observation and an info dict."""
        raise NotImplementedError

    def step(self, action: str) -> tuple[str, float, bool, bool, dict]:
        """Apply ``action``; return ``(observation, reward, terminated, truncated, info)``."""
        raise NotImplementedError

    def close(self) -> None:
        """Release resources (no-op by default)."""

    #: attributes that hold the state of the current episode (the observation itself is kept by the caller)
    episode_state: tuple[str, ...] = ("_steps", "_done")

    def state_dict(self) -> dict:
        """The current episode's state, so that a resumed training run continues live episodes exactly."""
        return {name: getattr(self, name) for name in self.episode_state if hasattr(self, name)}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""
        unknown = set(state) - set(self.episode_state)
        if unknown:
            raise KeyError(f"unknown episode state {sorted(unknown)} for {type(self).__name__}")
        for name, value in state.items():
            setattr(self, name, value)

    def __enter__(self) -> "TextEnv":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TextVectorEnv:
    """Steps ``len(envs)`` text environments in parallel with a thread pool (no auto-reset).

    ``reset(seed=s)`` gives environment ``i`` the seed ``s + i`` (``i`` is the index in ``envs``, also
    when only some ``indices`` are reset), matching Gymnasium's vector environments. ``step`` returns
    ``(observations, rewards, terminated, truncated, infos)`` with the arrays as numpy ``float64`` /
    ``bool`` arrays, in the order of ``indices`` (all environments when ``indices`` is None).
    An exception raised by any environment is re-raised after all submitted steps have finished, so no
    environment is left mid-step.
    """

    def __init__(self, envs: Sequence[TextEnv], max_workers: int | None = None):
        self.envs: list[TextEnv] = list(envs)
        if not self.envs:
            raise ValueError("TextVectorEnv needs at least one environment")
        self.num_envs = len(self.envs)
        workers = max_workers if max_workers is not None else self.num_envs
        if workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="TextVectorEnv")
        self._closed = False

    def _indices(self, indices: Sequence[int] | None) -> list[int]:
        if indices is None:
            return list(range(self.num_envs))
        out = [int(i) for i in indices]
        for i in out:
            if not 0 <= i < self.num_envs:
                raise IndexError(f"environment index {i} out of range [0, {self.num_envs})")
        if len(set(out)) != len(out):
            raise ValueError(f"duplicate environment indices: {out}")
        return out

    def _run(self, calls: list) -> list:
        if self._closed:
            raise RuntimeError("TextVectorEnv is closed")
        futures = [self._executor.submit(fn, *args, **kwargs) for fn, args, kwargs in calls]
        results, first_error = [], None
        for fut in futures:  # wait for every call before raising: no env is left half-stepped
            try:
                results.append(fut.result())
            except KeyboardInterrupt:
                # Ctrl-C or a stopping run (raised here, in the waiting thread): do not wait for the others
                for other in futures:
                    other.cancel()
                raise
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                results.append(None)
                first_error = first_error or exc
        if first_error is not None:
            raise first_error
        return results

    def reset(
        self, seed: int | None = None, indices: Sequence[int] | None = None
    ) -> tuple[list[str], list[dict]]:
        """Reset all environments, or those in ``indices``; env ``i`` gets ``seed + i`` when seeded."""
        idx = self._indices(indices)
        calls = [
            (self.envs[i].reset, (), {"seed": None if seed is None else int(seed) + i}) for i in idx
        ]
        results = self._run(calls)
        return [r[0] for r in results], [r[1] for r in results]

    def step(self, actions: Sequence[str], indices: Sequence[int] | None = None):
        """Step the environments in ``indices`` (all when None) with ``actions`` (same length/order)."""
        idx = self._indices(indices)
        actions = list(actions)
        if len(actions) != len(idx):
            raise ValueError(f"got {len(actions)} actions for {len(idx)} environments")
        results = self._run([(self.envs[i].step, (a,), {}) for i, a in zip(idx, actions)])
        obs = [r[0] for r in results]
        rewards = np.asarray([float(r[1]) for r in results], dtype=np.float64)
        terminated = np.asarray([bool(r[2]) for r in results], dtype=bool)
        truncated = np.asarray([bool(r[3]) for r in results], dtype=bool)
        infos = [r[4] for r in results]
        return obs, rewards, terminated, truncated, infos

    def close(self) -> None:
        """Close every environment and stop the thread pool (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._executor.shutdown(wait=True)
        for env in self.envs:
            env.close()

    def __len__(self) -> int:
        return self.num_envs

    def __enter__(self) -> "TextVectorEnv":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
