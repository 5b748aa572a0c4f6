"""tools/string_prices.py: the answer-level pi* per class and the importance-weighted class mass, against plain
enumeration; the attempts at the task prompt read from a run's samples."""

from __future__ import annotations

import gzip
import importlib.util
import itertools
import json
import math

import pytest

from conftest import REPO

_spec = importlib.util.spec_from_file_location("_tool_string_prices", REPO / "tools" / "string_prices.py")
string_prices = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(string_prices)


def test_class_shares_are_pi_star_of_the_strings_summed_per_class():
    strings = [("lr", -15.6, 0.952), ("lr", -14.2, 0.952), ("rf", -8.7, 0.815), ("rf", -12.0, 0.815),
               ("other", -20.0, 0.7)]
    for beta in (0.05, 0.02, 0.01):
        weights = [math.exp(lr + r / beta - 60) for _, lr, r in strings]  # shifted: e^(0.952 / 0.01) overflows
        total = sum(weights)
        expected = {c: sum(w for (k, _, _), w in zip(strings, weights) if k == c) / total for c in ("lr", "rf", "other")}
        got = string_prices.class_shares(strings, beta)
        assert got == pytest.approx(expected, rel=1e-9)
    # the paper's point in numbers: at 0.05 the cheaper forest string wins, at 0.01 the better-rewarded one
    assert string_prices.class_shares(strings[:1] + strings[2:3], 0.05)["rf"] > 0.9
    assert string_prices.class_shares(strings[:1] + strings[2:3], 0.01)["lr"] > 0.99


def test_importance_class_mass_matches_enumeration_and_drops_undrawable_strings():
    # an exact check: two strings per class, sampled once each; the estimate is sum of w over the class / sum of w
    samples = [("a", -2.0, -1.0), ("a", -4.0, -3.5), ("b", -1.0, -2.0), ("b", -6.0, float("-inf"))]
    mass, ess = string_prices.importance_class_mass(samples)
    w = {"a": [math.exp(-1.0), math.exp(-0.5)], "b": [math.exp(1.0)]}
    total = sum(itertools.chain(*w.values()))
    assert mass == pytest.approx({c: sum(v) / total for c, v in w.items()})
    assert ess["a"] == pytest.approx(sum(w["a"]) ** 2 / sum(x * x for x in w["a"]))
    assert ess["b"] == pytest.approx(1.0)
    flat = [x / total for x in itertools.chain(*w.values())]
    assert ess["all"] == pytest.approx(1.0 / sum(x * x for x in flat))


def test_attempts_at_the_task_prompt_are_first_attempts_and_those_after_a_failure(tmp_path):
    rows = [  # two environments, episodes of 3: env 0 fails then runs, env 1 runs throughout
        {"batch": 1, "env_index": 0, "episode_step": 1, "reward": -1.0, "status": "error", "text": "a"},
        {"batch": 1, "env_index": 1, "episode_step": 1, "reward": 0.8, "status": "ok", "text": "b"},
        {"batch": 2, "env_index": 0, "episode_step": 2, "reward": 0.9, "status": "ok", "text": "c"},
        {"batch": 2, "env_index": 1, "episode_step": 2, "reward": 0.8, "status": "ok", "text": "d"},
        {"batch": 3, "env_index": 0, "episode_step": 3, "reward": 0.9, "status": "ok", "text": "e"},
        {"batch": 3, "env_index": 1, "episode_step": 3, "reward": -1.0, "status": "error", "text": "f"},
        {"batch": 4, "env_index": 1, "episode_step": 1, "reward": 0.8, "status": "ok", "text": "g"},
    ]
    with gzip.open(tmp_path / "samples.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in reversed(rows))  # order in the file does not matter
    fresh = string_prices.read_first_attempts(tmp_path)
    assert [r["text"] for r in fresh] == ["a", "b", "c", "g"]
    assert [r["text"] for r in string_prices.read_first_attempts(tmp_path, after_failure=False)] == ["a", "b", "g"]
    with pytest.raises(FileNotFoundError, match="no samples.jsonl"):
        string_prices.read_first_attempts(tmp_path / "missing")

