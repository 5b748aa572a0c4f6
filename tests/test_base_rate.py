"""tools/base_rate.py: its counts are the environment's own results, its interval is Wilson's, runs are seeded."""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import dataclass

import pytest
import torch

from conftest import REPO
from envs.datascience import DataScienceEnv
from envs.datascience.evaluation import ModelSandbox

_spec = importlib.util.spec_from_file_location("_tool_base_rate", REPO / "tools" / "base_rate.py")
base_rate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(base_rate)

RUNS = "\n    from sklearn.linear_model import LogisticRegression\n    return LogisticRegression().fit(x_train, y_train)"
WRONG_ARGUMENT = ("\n    from sklearn.ensemble import RandomForestClassifier\n    clf = RandomForestClassifier(max_iter=1000)\n"
                  "    clf.fit(x_train, y_train)\n    return clf")
NOT_CODE = "I would use a random forest here."


def wilson_closed_form(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


@pytest.mark.parametrize("k,n", [(0, 64), (3, 64), (10, 64), (64, 64), (1, 1), (7, 20)])
def test_wilson_interval_matches_the_closed_form(k, n):
    low, high = base_rate.wilson_interval(k, n)
    ref_low, ref_high = wilson_closed_form(k, n)
    assert low == pytest.approx(max(ref_low, 0.0), abs=1e-9) and high == pytest.approx(min(ref_high, 1.0), abs=1e-9)
    assert low <= k / n <= high
    with pytest.raises(ValueError, match="at least one attempt"):
        base_rate.wilson_interval(0, 0)


def test_failure_kind_names_the_status_and_the_exception():
    tb = ('  File "<generated>", line 6, in build_model\n    clf = RandomForestClassifier(max_iter=1000)\n'
          "TypeError: RandomForestClassifier.__init__() got an unexpected keyword argument 'max_iter'")
    assert base_rate.failure_kind("error", tb) == "error: TypeError"
    assert base_rate.first_error_line(tb).startswith("TypeError: RandomForestClassifier.__init__()")
    assert base_rate.failure_kind("error", "sklearn.exceptions.NotFittedError: not fitted") == \
        "error: sklearn.exceptions.NotFittedError"
    assert base_rate.failure_kind("error", "RecursionError: maximum recursion depth exceeded") == "error: RecursionError"
    msg = "build_model never returns a model (no return statement; was the answer cut off?)"
    assert base_rate.failure_kind("invalid-output", msg) == f"invalid-output: {msg}"
    assert base_rate.failure_kind("timeout", "timed out after 20 s (wall clock)") == "timeout"
    assert base_rate.failure_kind("ok", None) == "ok"


@dataclass
class ScriptedGeneration:
    """What ``AgentModule.act`` returns, for a policy that answers from a script."""

    texts: list[str]
    prompt_mask: torch.Tensor
    action_mask: torch.Tensor
    finished: torch.Tensor


class ScriptedPolicy:
    def __init__(self, first: list[str], second: str):
        self.first, self.second, self.calls, self.prompts, self.rng_states = list(first), second, 0, [], []

    def __call__(self, prompts, generation):
        self.prompts.append(list(prompts))
        self.rng_states.append(torch.random.get_rng_state())
        texts = []
        for prompt in prompts:
            reflection = "# A fixed build_model" in prompt
            texts.append(self.second if reflection else self.first[self.calls % len(self.first)])
            self.calls += not reflection
        b = len(prompts)
        return ScriptedGeneration(texts, torch.ones(b, 5, dtype=torch.long), torch.ones(b, 3, dtype=torch.long),
                                  torch.ones(b, dtype=torch.bool))


@pytest.fixture(scope="module")
def pool():
    # Started here, in the main thread: a worker started lazily inside a TextVectorEnv thread is killed when that
    # thread exits (bwrap --die-with-parent follows the thread), so the default pool's first evaluation after a
    # closed vector env can report a spurious "worker died".
    with ModelSandbox(n_workers=2, prestart=True) as p:
        yield p


def make_env(pool, **kw):
    return DataScienceEnv("iris", prompt_style="few_shot", n_splits=1, timeout=20.0, pool=pool, **kw)


def test_counts_are_the_environment_results_with_a_scripted_policy(pool):
    policy = ScriptedPolicy([RUNS, WRONG_ARGUMENT, NOT_CODE], second=RUNS)
    from datamodules.rollout import GenerationConfig

    records = base_rate.measure(policy, lambda: make_env(pool, max_steps=2), GenerationConfig(), n=7, batch_size=3,
                                second_attempt=True)
    firsts = [r for r in records if r["attempt"] == 1]
    seconds = [r for r in records if r["attempt"] == 2]
    assert [r["sample"] for r in firsts] == list(range(7))
    assert [r["status"] for r in firsts] == ["ok", "error", "invalid-output"] * 2 + ["ok"]
    # exactly the failed first attempts get a second attempt, from the env's reflection prompt
    assert sorted(r["sample"] for r in seconds) == [1, 2, 4, 5] and all(r["status"] == "ok" for r in seconds)
    reflection_prompts = [p for batch in policy.prompts for p in batch if "# A fixed build_model" in p]
    assert len(reflection_prompts) == 4 and any("max_iter" in p for p in reflection_prompts)
    # every record agrees with a fresh evaluation by the environment itself
    env = make_env(pool)
    for rec in records:
        info = env.evaluate(rec["text"])
        assert rec["status"] == info["status"] and rec["error"] == info["error"]
        assert rec["reward"] == (info["auc"] if info["status"] == "ok" else -1.0)
    s1, s2 = base_rate.summarize(records, 1), base_rate.summarize(records, 2)
    assert (s1["n"], s1["runnable"], s2["n"], s2["runnable"]) == (7, 3, 4, 4)
    assert s1["wilson95"] == list(base_rate.wilson_interval(3, 7))
    assert s1["kinds"] == {"ok": 3, "error: TypeError": 2,
                           "invalid-output: no valid Python code was found in the answer": 2}
    assert s1["reward_hist"]["-1 (failed)"] == 4 and sum(s1["reward_hist"].values()) == 7
    assert s1["top_errors"][0][1] == 2
    text = base_rate.format_summary(s1, "t")
    assert "3/7" in text and "error: TypeError" in text


def test_replay_steps_the_same_first_attempts_again(pool):
    from datamodules.rollout import GenerationConfig

    original = ScriptedPolicy([WRONG_ARGUMENT, RUNS], second=NOT_CODE)
    first = base_rate.measure(original, lambda: make_env(pool, max_steps=2), GenerationConfig(), n=4, batch_size=4,
                              second_attempt=True)
    assert [r["status"] for r in first if r["attempt"] == 2] == ["invalid-output"] * 2
    never = ScriptedPolicy(["unused"], second=RUNS)  # must only be asked for second attempts
    again = base_rate.measure(never, lambda: make_env(pool, max_steps=2), GenerationConfig(), n=10, batch_size=4,
                              second_attempt=True, replay=first)
    strip = lambda rows: [{k: r[k] for k in ("sample", "status", "reward", "text")} for r in rows if r["attempt"] == 1]  # noqa: E731
    assert strip(again) == strip(first) and len(strip(again)) == 4
    assert [r["status"] for r in again if r["attempt"] == 2] == ["ok", "ok"] and never.calls == 0
    # the replay's second attempts are not drawn with the random numbers that drew the replayed first attempts
    assert not torch.equal(never.rng_states[0], original.rng_states[0])
    with pytest.raises(ValueError, match="another task prompt"):
        base_rate.measure(never, lambda: DataScienceEnv("wine", prompt_style="few_shot", n_splits=1, pool=pool),
                          GenerationConfig(), n=4, replay=first)


def test_main_with_the_tiny_model_is_seeded_and_matches_the_env(tmp_path, pool):
    from modules.shared_base import BackboneConfig

    backbone = BackboneConfig(source="tiny", device="cpu", seed=0)
    common = ["--dataset", "iris", "--n", "3", "--batch-size", "2", "--max-new-tokens", "12", "--n-splits", "1",
              "--second-attempt", "--quiet", "--data-dir", str(tmp_path / "data")]
    out_a, out_b, out_c = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    summaries = tmp_path / "summaries.jsonl"
    summary = base_rate.main(common + ["--out", str(out_a), "--summary-jsonl", str(summaries)], backbone=backbone)
    base_rate.main(common + ["--out", str(out_b), "--summary-jsonl", str(summaries)], backbone=backbone)
    base_rate.main(common + ["--out", str(out_c), "--seed", "1"], backbone=backbone)
    rows = [json.loads(line) for line in out_a.read_text().splitlines()]
    firsts = [r for r in rows if r["attempt"] == 1]
    assert len(firsts) == 3 and summary["first"]["n"] == 3
    # a second attempt for every first attempt that failed
    assert len(rows) - 3 == sum(r["status"] != "ok" for r in firsts) == summary["second"]["n"]
    env = make_env(pool)
    for rec in rows:
        info = env.evaluate(rec["text"])
        assert rec["status"] == info["status"] and rec["kind"] == base_rate.failure_kind(info["status"], info["error"])
        assert 1 <= rec["action_tokens"] <= 12 and rec["prompt_tokens"] > 100
    assert summary["first"]["runnable"] == sum(r["status"] == "ok" for r in firsts)
    assert summary["within_two"]["runnable"] == sum(r["status"] == "ok" for r in rows)
    # seeded: the same options give the same samples; another seed gives others
    texts = lambda path: [json.loads(line)["text"] for line in path.read_text().splitlines()]  # noqa: E731
    assert texts(out_a) == texts(out_b) and texts(out_a) != texts(out_c)
    logged = [json.loads(line) for line in summaries.read_text().splitlines()]
    assert len(logged) == 2 and logged[0]["first"] == logged[1]["first"] == summary["first"]
    assert logged[0]["generation"]["stop_strings"] == base_rate.QUICKSTART_STOP_STRINGS
    assert logged[0]["task_prompt_tokens"] == firsts[0]["prompt_tokens"]
    # the summary names no path of the machine: the model cache in the project, the data directory
    assert logged[0]["options"]["gguf_cache_dir"] == "runs/.model_cache"
    assert logged[0]["options"]["data_dir"] == "<data dir>" and str(tmp_path) not in json.dumps(logged[0]["options"])


def test_bad_options_fail_before_the_model_loads():
    with pytest.raises(ValueError, match="prompt_style"):
        base_rate.main(["--prompt-style", "chatty", "--quiet"])
