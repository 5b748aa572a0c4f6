"""The task-first reflection layout and episodes that go on after a success (issue: reflection in the CPU setting):
the prompt's parts in order, the env's multi-step episodes, and prefix sharing that still covers the whole task
prompt and stays exact (the update and the sampled tokens equal the plain computation's)."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_backbone
from datamodules.batch import GenerationConfig, RolloutBatch, RolloutMetrics, pad_rows
from envs.datascience import DataScienceEnv
from envs.datascience.prompts import error_hint, reflection_prompt, short_stub, task_first_prompt

RUNS = ("\n    from sklearn.linear_model import LogisticRegression\n    clf = LogisticRegression()\n"
        "    clf.fit(x_train, y_train)\n    return clf\n\ndef ")
FAILS = RUNS.replace("LogisticRegression()", "LogisticRegression(min_samples_leaf=3)")


@pytest.fixture(scope="module")
def task():
    return DataScienceEnv("breast_cancer", prompt_style="few_shot", n_splits=1).prompt


def test_task_first_prompt_is_task_then_attempt_then_feedback_then_the_open_stub(task):
    code = ("import numpy as np\n\n\ndef build_model(x_train: np.ndarray, y_train: np.ndarray):\n"
            "    from sklearn.ensemble import RandomForestClassifier\n    clf = RandomForestClassifier(max_iter=9)\n"
            "    clf.fit(x_train, y_train)\n    return clf\n")
    answer = ("\n    from sklearn.ensemble import RandomForestClassifier\n    clf = RandomForestClassifier(max_iter=9)\n"
              "    clf.fit(x_train, y_train)\n    return clf\n\n\ndef ")
    error = ('  File "<generated>", line 6, in build_model\n    clf = RandomForestClassifier(max_iter=9)\n'
             "TypeError: RandomForestClassifier.__init__() got an unexpected keyword argument 'max_iter'")
    obs = task_first_prompt(task, code, answer, error)
    assert obs.startswith(task)  # the whole task prompt first: every row of a batch shares it
    rest = obs[len(task):]
    body, feedback_and_stub = rest.split("\n\n\n", 1)
    # the answer as it was sampled (its tokens are the row's), cut where the next top-level block began
    assert body == answer.split("\n\n\ndef ")[0]
    stub = short_stub(task)
    assert stub == ('def build_model(x_train: np.ndarray, y_train: np.ndarray):\n'
                    '    """Fit a scikit-learn classifier on x_train, y_train and return it."""')
    assert feedback_and_stub.endswith(stub) and obs.endswith('"""')  # ends inside the open function again
    feedback = feedback_and_stub[: -len(stub)]
    assert feedback == ("# build_model above failed: TypeError: RandomForestClassifier.__init__() got an unexpected "
                        "keyword argument 'max_iter'\n"
                        f"# Hint: {error_hint(error)}\n# A fixed build_model:\n")
    # an answer that wrote a whole function of its own: the body of the code that ran is shown
    whole = "\ndef build_model(x_train, y_train):\n    return 1\n"
    assert task_first_prompt(task, code, whole, error)[len(task):].startswith(
        "\n    from sklearn.ensemble import RandomForestClassifier")


def test_task_first_prompt_after_code_that_ran_shows_its_auc_and_asks_for_better(task):
    obs = reflection_prompt(task, None, RUNS, None, auc=0.912345, layout="task_first")
    rest = obs[len(task):]
    assert obs.startswith(task) and obs.endswith(short_stub(task))
    assert "\n\n\n# build_model above ran: validation ROC AUC 0.9123. A better build_model:\ndef build_model(" in rest
    assert "failed" not in rest
    # the raw answer stops where the next top-level block began (the stop string kept in the action)
    assert "\ndef \n" not in rest and rest.count("def build_model(") == 1


def test_a_runaway_or_unclosed_answer_is_cut_and_cannot_swallow_the_feedback(task):
    runaway = "\n" + "\n".join(f"    import module_{i}" for i in range(40)) + '\n    x = """never closed'
    obs = task_first_prompt(task, None, runaway, "build_model never returns a model")
    rest = obs[len(task): -len(short_stub(task))]
    assert rest.count("import module_") == 12 and "# [...]" in rest
    assert '"""' not in rest  # only the stub's own docstring quotes follow the task
    assert "# Hint: end build_model with a return of the fitted classifier." in rest
    # a very long line (a runaway string, megabytes of text) ends what is shown: the next state stays short
    for long_answer in ("\n    x = 1\n    s = '" + "a" * 5_000_000 + "'\n" + RUNS, "a" * 5_000_000):
        obs = task_first_prompt(task, None, long_answer, "SyntaxError: unterminated string literal")
        assert len(obs) < len(task) + 600, len(obs)
    shown = task_first_prompt(task, None, "\n    x = 1\n    s = '" + "a" * 300 + "'\n" + RUNS, "err")[len(task):]
    assert shown.startswith("\n    x = 1\n    # [...]\n\n\n# build_model above failed: err")
    with pytest.raises(ValueError, match="feedback_first layout shows errors only"):
        reflection_prompt(task, None, RUNS, None, auc=0.9, layout="feedback_first")
    with pytest.raises(ValueError, match="reflection layout must be one of"):
        reflection_prompt(task, None, RUNS, "err", layout="sideways")


def test_episodes_go_on_after_success_with_the_auc_as_feedback_and_end_at_t(pool):
    env = DataScienceEnv("iris", prompt_style="few_shot", n_splits=2, max_steps=3, stop_on_success=False, pool=pool)
    first, _ = env.reset()
    obs, reward, terminated, truncated, info = env.step(RUNS)
    assert info["status"] == "ok" and reward == pytest.approx(info["auc"]) and not terminated and not truncated
    assert obs.startswith(first) and f"ROC AUC {reward:.4f}" in obs
    obs, reward, terminated, truncated, info = env.step(FAILS)
    assert reward == -1.0 and not terminated and not truncated and "failed: TypeError" in obs and obs.startswith(first)
    obs, reward, terminated, truncated, info = env.step(RUNS)
    assert info["status"] == "ok" and not terminated and truncated  # the step limit ends it, a success does not
    # the paper's episode: the first success ends it
    paper = DataScienceEnv("iris", prompt_style="few_shot", n_splits=2, max_steps=3, pool=pool)
    paper.reset()
    assert paper.step(RUNS)[2] is True
    with pytest.raises(ValueError, match="reflection_layout must be one of"):
        DataScienceEnv("iris", reflection_layout="sideways", pool=pool)
    with pytest.raises(ValueError, match="needs reflection_layout='task_first'"):
        DataScienceEnv("iris", reflection_layout="feedback_first", stop_on_success=False, pool=pool)
    # reflection off: a failure brings the task prompt again, a success still its AUC
    quiet = DataScienceEnv("iris", prompt_style="few_shot", n_splits=2, max_steps=3, stop_on_success=False,
                           reflection=False, pool=pool)
    first, _ = quiet.reset()
    assert quiet.step(FAILS)[0] == first
    assert "ROC AUC" in quiet.step(RUNS)[0]


@pytest.fixture(scope="module")
def pool():
    from envs.datascience.evaluation import get_default_pool

    return get_default_pool()


# ---- prefix sharing over the new layout: exact, and it still covers the task prompt --------------------------------

def _layout_batch(module, task: str) -> tuple[RolloutBatch, int]:
    """8 rows as a batch of task-first episodes holds them: first attempts (the task prompt), second attempts after an
    error and after a success (reflection prompts), with next states of both kinds; random actions."""
    code = "import numpy as np\n\n\ndef build_model(x_train, y_train):" + RUNS.rsplit("\n\ndef ", 1)[0]
    after_error = task_first_prompt(task, code, RUNS, "TypeError: bad argument")
    after_success = task_first_prompt(task, code, RUNS, None, auc=0.87)
    prompts = [task, task, task, after_error, after_success, after_success, task, after_error]
    m = module.model
    ids, mask = m.encode_prompts(prompts)
    gen = torch.Generator().manual_seed(0)
    vocab = m.base_model.config.vocab_size
    actions = [torch.randint(4, vocab, (int(n),), generator=gen).tolist() for n in (5, 9, 3, 7, 6, 2, 8, 4)]
    action_ids, action_mask = pad_rows(actions, "right")
    # rows 0-2 go on (3-7: their episodes ended), into states no row of the batch is in
    next_prompts = [task_first_prompt(task, code, RUNS, "TypeError: another"),
                    task_first_prompt(task, code, RUNS, None, auc=0.61), task_first_prompt(task, None, FAILS, None, auc=0.62)]
    next_ids, next_mask = m.encode_prompts(next_prompts)
    batch = RolloutBatch(
        prompt_ids=ids, prompt_mask=mask, action_ids=action_ids, action_mask=action_mask,
        rewards=torch.tensor([-1.0, 0.8, 0.9, -1.0, 0.95, 0.7, 0.6, -1.0]),
        terminated=torch.zeros(8, dtype=torch.bool), truncated=torch.tensor([False] * 3 + [True] * 5),
        next_index=torch.full((8,), -1), next_needed=torch.tensor([0, 1, 2]),
        env_index=torch.arange(8), episode_step=torch.tensor([1, 1, 1, 2, 2, 2, 1, 2]),
        runnable=torch.ones(8, dtype=torch.bool), policy_version=0, sampling=GenerationConfig(temperature=1.0, top_k=0),
        metrics=RolloutMetrics(0.0, 0.0, 0.0, 0.0, 0.0, 0.0), next_prompt_ids=next_ids, next_prompt_mask=next_mask)
    return batch, len(m.encode_prompts([task])[1][0])


def test_prefix_sharing_covers_the_task_prompt_and_the_update_is_exact(task):
    from test_etpo_module import _perturbed_module, _plain_reference

    # the tiny model's default alphabet spells the prompts (the tests' usual "abcdefgh" would make them all <unk>)
    module = _perturbed_module("zero", prefix_sharing=True, alphabet=None, td_lambda=1.0, trace_correction=False)
    batch, task_tokens = _layout_batch(module, task)
    plan = module.plan(batch)
    assert plan.packed is not None
    rows = len(batch) + int(batch.next_needed.numel())
    # every row and next prompt starts with the task prompt: it is computed once, not 11 times (at most the few
    # tokens where the task's end merges with what follows it differ)
    assert plan.tokens_computed <= plan.sequence_tokens - (rows - 1) * (task_tokens - 4)
    t = module.compute_targets(batch, plan)
    y, ref_critic, ref_policy = _plain_reference(module, batch, td_lambda=1.0)
    torch.testing.assert_close(t.targets, y, rtol=1e-5, atol=1e-5)
    m = module.model
    for params, got, want in ((m.critic_parameters(), module.critic_loss(batch, plan, t)[0], ref_critic),
                              (m.policy_parameters(), module.policy_loss(batch, plan, t)[0], ref_policy)):
        assert got.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-6)
        # float32 sums over ~800-token rows (test_etpo_module's rows are ~20 tokens): 1e-5 absolute on gradients
        # whose entries reach ~1e-2
        for g1, g2 in zip(torch.autograd.grad(got, params), torch.autograd.grad(want, params)):
            torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-5)


def test_generation_from_task_first_prompts_samples_the_same_tokens_with_the_shared_prefill(task):
    from modules.etpo import ETPOModule

    module = ETPOModule(backbone=tiny_backbone(tiny_alphabet=None))
    module.configure_model()
    m = module.model
    code = "import numpy as np\n\n\ndef build_model(x_train, y_train):" + RUNS.rsplit("\n\ndef ", 1)[0]
    prompts = [task, task_first_prompt(task, code, RUNS, "ValueError: x"),
               task_first_prompt(task, code, RUNS, None, auc=0.5), task]
    ids, mask = m.encode_prompts(prompts)
    out = {}
    for share in (True, False):
        torch.manual_seed(3)
        g = m.generate_from_ids(ids, mask, max_new_tokens=12, temperature=1.0, top_k=0, share_prefix=share)
        out[share] = (g.action_ids, g.action_mask)
    assert torch.equal(out[True][0], out[False][0]) and torch.equal(out[True][1], out[False][1])


def test_the_gradient_steps_leave_the_next_prompts_out_and_compute_the_same():
    """The critic and policy steps plan the batch without its next prompts (only the targets read their values):
    fewer positions, the same losses and gradients as with them."""
    from test_etpo_module import _perturbed_module

    task = DataScienceEnv("breast_cancer", prompt_style="few_shot", n_splits=1).prompt
    module = _perturbed_module("zero", prefix_sharing=True, alphabet=None, td_lambda=1.0, trace_correction=False)
    batch, _ = _layout_batch(module, task)
    with_next, without = module.plan(batch), module.plan(batch, next_prompts=False)
    assert without.tokens_computed < with_next.tokens_computed
    t = module.compute_targets(batch, with_next)
    m = module.model
    for loss, params in ((module.critic_loss, m.critic_parameters()), (module.policy_loss, m.policy_parameters())):
        a, b = loss(batch, with_next, t)[0], loss(batch, without, t)[0]
        assert a.item() == pytest.approx(b.item(), rel=1e-5, abs=1e-7)
        for g1, g2 in zip(torch.autograd.grad(a, params), torch.autograd.grad(b, params)):
            torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-5)
