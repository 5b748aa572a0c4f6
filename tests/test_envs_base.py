"""TextEnv / TextVectorEnv contract (docs/architecture.md, section envs) and the toy TargetCharsEnv."""

from __future__ import annotations

import ast
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from envs import EpisodeOverError, TargetCharsEnv, TextEnv, TextVectorEnv
from envs.toy import target_chars_reward


class RecordingEnv(TextEnv):
    """Remembers its reset seeds; steps sleep a little so parallelism is observable."""

    def __init__(self, sleep: float = 0.0, fail_on: str | None = None):
        self.seeds: list = []
        self.sleep = sleep
        self.fail_on = fail_on
        self.steps = 0
        self.threads: set[str] = set()
        self.closed = False

    def reset(self, *, seed=None, options=None):
        self.seeds.append(seed)
        self.steps = 0
        return f"obs-{seed}", {"status": "reset", "steps": 0}

    def step(self, action):
        if action == self.fail_on:
            raise RuntimeError("boom")
        self.threads.add(threading.current_thread().name)
        time.sleep(self.sleep)
        self.steps += 1
        return action.upper(), float(len(action)), action == "end", self.steps >= 3, {"status": "ok", "steps": self.steps}

    def close(self):
        self.closed = True


def test_target_chars_reward():
    assert target_chars_reward("", "ab") == 0.0
    assert target_chars_reward("abab", "ab") == 1.0
    assert target_chars_reward("abcd", "ab") == 0.5
    assert target_chars_reward("xyz", "ab") == 0.0


def test_toy_env_single_step_contract():
    env = TargetCharsEnv(target_chars="ab", prompt="q:", max_steps=1)
    obs, info = env.reset(seed=3)
    assert obs == "q:" and info["steps"] == 0 and isinstance(info["status"], str)
    obs, reward, terminated, truncated, info = env.step("aabx")
    assert reward == pytest.approx(0.75)
    assert terminated is True and truncated is False
    assert info["status"] == "ok" and info["steps"] == 1
    with pytest.raises(EpisodeOverError):
        env.step("a")  # no auto-reset
    env.reset()
    assert env.step("")[1] == 0.0


def test_toy_env_multi_step_observation_is_prompt_plus_previous_action():
    env = TargetCharsEnv(target_chars="ab", prompt="q:", max_steps=3)
    env.reset()
    obs, r, term, trunc, info = env.step("ab")
    assert (obs, r, term, trunc, info["steps"]) == ("q:ab", 1.0, False, False, 1)
    obs, r, term, trunc, info = env.step("cc")
    assert (obs, r, term, trunc) == ("q:cc", 0.0, False, False)
    obs, r, term, trunc, info = env.step("a")
    assert term is True and trunc is False and info["steps"] == 3


def test_vector_env_reset_seeds_and_indices():
    envs = [RecordingEnv() for _ in range(4)]
    venv = TextVectorEnv(envs)
    obs, infos = venv.reset(seed=10)
    assert obs == ["obs-10", "obs-11", "obs-12", "obs-13"]
    assert all(i["status"] == "reset" for i in infos)
    obs, _ = venv.reset(seed=100, indices=[3, 1])
    assert obs == ["obs-103", "obs-101"]  # env i gets seed + i, whatever the order of indices
    venv.reset(indices=[0])
    assert envs[0].seeds == [10, None]
    assert envs[2].seeds == [12]
    with pytest.raises(IndexError):
        venv.reset(indices=[4])
    venv.close()
    assert all(e.closed for e in envs)


def test_vector_env_step_types_subsets_and_no_auto_reset():
    envs = [RecordingEnv() for _ in range(3)]
    with TextVectorEnv(envs) as venv:
        venv.reset(seed=0)
        obs, rewards, terminated, truncated, infos = venv.step(["a", "end", "ccc"])
        assert obs == ["A", "END", "CCC"]
        assert isinstance(rewards, np.ndarray) and rewards.dtype == np.float64
        assert rewards.tolist() == [1.0, 3.0, 3.0]
        assert terminated.dtype == bool and terminated.tolist() == [False, True, False]
        assert truncated.dtype == bool and truncated.tolist() == [False, False, False]
        assert [i["steps"] for i in infos] == [1, 1, 1]
        # a subset, in the given order; env 1 is not reset automatically
        obs, rewards, *_ = venv.step(["x", "yy"], indices=[2, 0])
        assert obs == ["X", "YY"] and rewards.tolist() == [1.0, 2.0]
        assert envs[1].steps == 1 and envs[2].steps == 2 and envs[0].steps == 2
        with pytest.raises(ValueError):
            venv.step(["only-one"])


def test_vector_env_runs_steps_in_parallel_threads():
    envs = [RecordingEnv(sleep=0.3) for _ in range(8)]
    with TextVectorEnv(envs) as venv:
        venv.reset()
        t0 = time.monotonic()
        venv.step(["a"] * 8)
        elapsed = time.monotonic() - t0
    assert elapsed < 1.2, f"8 steps of 0.3 s took {elapsed:.2f} s: not parallel"
    assert len({name for e in envs for name in e.threads}) > 1


def test_vector_env_propagates_errors_after_all_steps_finish():
    envs = [RecordingEnv(sleep=0.1), RecordingEnv(fail_on="bad"), RecordingEnv(sleep=0.1)]
    with TextVectorEnv(envs, max_workers=3) as venv:
        venv.reset()
        with pytest.raises(RuntimeError, match="boom"):
            venv.step(["a", "bad", "c"])
        assert envs[0].steps == 1 and envs[2].steps == 1


def test_vector_env_with_toy_envs():
    with TextVectorEnv([TargetCharsEnv(max_steps=2, prompt="p") for _ in range(8)]) as venv:
        obs, _ = venv.reset(seed=0)
        assert obs == ["p"] * 8
        obs, rewards, term, trunc, infos = venv.step(["ab", "xx", "a", "", "ba", "bbbb", "axbx", "z"] )
        assert rewards.tolist() == [1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.5, 0.0]
        assert not term.any() and not trunc.any()
        _, _, term, trunc, _ = venv.step(["a"] * 8)
        assert term.all() and not trunc.any()


def test_envs_package_never_imports_torch():
    """Static check: no module under envs/ imports torch (the package must work without it)."""
    root = Path(__file__).resolve().parents[1] / "envs"
    for path in root.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not any(n == "torch" or n.startswith("torch.") for n in names), f"{path} imports torch"


def test_import_envs_does_not_load_torch():
    import subprocess

    code = "import sys, envs, envs.datascience, envs.datascience.evaluation, envs.isolation; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "False"


def test_episode_state_round_trips_into_a_fresh_env():
    from envs.toy import TargetCharsEnv

    env = TargetCharsEnv(max_steps=3)
    env.reset(seed=0)
    env.step("ab")
    fresh = TargetCharsEnv(max_steps=3)
    fresh.load_state_dict(env.state_dict())
    # the fresh env continues the same episode: two more steps, then it is over
    assert fresh.step("a")[2] is False and fresh.step("a")[2] is True
    with pytest.raises(KeyError, match="unknown episode state"):
        fresh.load_state_dict({"nonsense": 1})
