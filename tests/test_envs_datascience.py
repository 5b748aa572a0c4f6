"""DataScienceEnv: contract, reward (Eq. 10) against an independent computation, reflection and truncation."""

from __future__ import annotations

import time

import numpy as np
import pytest
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from envs import TextVectorEnv
from envs.datascience import DataScienceEnv, load_dataset
from envs.datascience.env import make_splits, roc_auc, summarize_error
from envs.datascience.evaluation import get_default_pool

LR_BODY = (
    "\n    from sklearn.linear_model import LogisticRegression\n"
    "    from sklearn.pipeline import make_pipeline\n"
    "    from sklearn.preprocessing import StandardScaler\n"
    "    model = make_pipeline(StandardScaler(), LogisticRegression())\n"
    "    model.fit(x_train, y_train)\n"
    "    return model"
)


def reference_model():
    """The same model as LR_BODY, fitted in this process for the independent AUC computation."""
    return make_pipeline(StandardScaler(), LogisticRegression())
FAST = dict(timeout=20.0, memory_limit_mb=1024)


@pytest.fixture(scope="module")
def pool():
    return get_default_pool()


def make_env(dataset="breast_cancer", **kw):
    return DataScienceEnv(dataset, pool=get_default_pool(), **{**FAST, **kw})


def test_prompt_shape_and_ending():
    env = make_env("breast_cancer")
    obs, info = env.reset(seed=0)
    assert info["status"] == "reset" and info["steps"] == 0
    assert obs.startswith('"""Dataset: breast_cancer')
    assert "import numpy as np" in obs
    assert "def build_model(x_train: np.ndarray, y_train: np.ndarray):" in obs
    n_train = len(env.splits[0][0])
    assert f"shape ({n_train}, 30)" in obs and "(2 classes)" in obs
    # ends right after the docstring's closing quotes: no trailing newline (see envs.datascience.prompts)
    assert obs.endswith('    """') and not obs.endswith("\n")
    few = make_env("breast_cancer", prompt_style="few_shot")
    fobs, _ = few.reset()
    # the same shape line as the bare stub (the docstring's wording is the style's own)
    shape_line = next(line for line in obs.splitlines() if "x_train: float array" in line)
    assert fobs.endswith(shape_line + "\n    The classifier must have predict_proba(x). Do not use GridSearchCV.\n    \"\"\"")
    assert fobs.count("def build_model") == 3 and fobs.count("    return clf") == 2
    assert "Dataset: penguins" in fobs and "Dataset: breast_cancer" in fobs
    with pytest.raises(ValueError):
        make_env("breast_cancer", prompt_style="chatty")


def test_reward_equals_independent_roc_auc_binary(pool):
    env = make_env("breast_cancer", n_splits=3, split_seed=4)
    env.reset()
    obs, reward, terminated, truncated, info = env.step(LR_BODY)
    assert info["status"] == "ok", info["error"]
    assert terminated is True and truncated is False and info["steps"] == 1
    # independent recomputation: same splits (train_test_split, stratified, seeds 4..6), fit here
    ds = load_dataset("breast_cancer")
    aucs = []
    for seed in (4, 5, 6):
        xt, xv, yt, yv = train_test_split(ds.X, ds.y, test_size=0.5, random_state=seed, stratify=ds.y)
        proba = reference_model().fit(xt, yt).predict_proba(xv)
        aucs.append(roc_auc_score(yv, proba[:, 1]))
    assert reward == pytest.approx(np.mean(aucs), abs=1e-9)
    assert info["aucs"] == pytest.approx(aucs, abs=1e-9)
    assert info["auc"] == pytest.approx(reward)
    assert "def build_model" in info["code"]


FOREST_BODY = (
    "\n    from sklearn.ensemble import RandomForestClassifier\n"
    "    model = RandomForestClassifier(n_estimators=10)\n"
    "    model.fit(x_train, y_train)\n"
    "    return model"
)


def test_unseeded_estimator_scores_the_same_every_call(pool):
    """A forest without random_state draws from numpy's global generator; the env seeds it with the split's own seed
    before the code runs on that split, so the reward is a function of (code, splits) -- equal to a forest fitted here
    after np.random.seed(split seed) -- on every call, whichever worker runs it."""
    env = make_env("breast_cancer", n_splits=2, split_seed=3, stop_on_success=False, max_steps=3)
    env.reset()
    rewards = [env.step(FOREST_BODY)[1] for _ in range(3)]
    assert rewards[0] == rewards[1] == rewards[2]
    ds = load_dataset("breast_cancer")
    expected = []
    for seed in (3, 4):
        xt, xv, yt, yv = train_test_split(ds.X, ds.y, test_size=0.5, random_state=seed, stratify=ds.y)
        np.random.seed(seed)
        proba = RandomForestClassifier(n_estimators=10).fit(xt, yt).predict_proba(xv)
        expected.append(roc_auc_score(yv, proba[:, 1]))
    assert rewards[0] == pytest.approx(np.mean(expected), abs=1e-12)
    # with the seeding off, a forest fitted from another state of the generator scores differently (10 trees on
    # breast_cancer: the AUC moves in the third decimal); the seeded reward is not what every state gives
    np.random.seed(12345)
    other = []
    for seed in (3, 4):
        xt, xv, yt, yv = train_test_split(ds.X, ds.y, test_size=0.5, random_state=seed, stratify=ds.y)
        other.append(roc_auc_score(yv, RandomForestClassifier(n_estimators=10).fit(xt, yt).predict_proba(xv)[:, 1]))
    assert np.mean(other) != pytest.approx(rewards[0], abs=1e-12)
    unseeded = make_env("breast_cancer", n_splits=2, split_seed=3, seed_estimators=False)
    unseeded.reset()
    assert unseeded.step(FOREST_BODY)[4]["status"] == "ok"


@pytest.mark.parametrize("name", ["iris", "wine"])
def test_reward_multiclass_is_macro_ovo(pool, name):
    env = make_env(name, n_splits=2)
    env.reset()
    _, reward, terminated, _, info = env.step(LR_BODY)
    assert info["status"] == "ok", info["error"]
    ds = load_dataset(name)
    expected = []
    for seed in (0, 1):
        xt, xv, yt, yv = train_test_split(ds.X, ds.y, test_size=0.5, random_state=seed, stratify=ds.y)
        proba = reference_model().fit(xt, yt).predict_proba(xv)
        expected.append(roc_auc_score(yv, proba, multi_class="ovo", average="macro"))
    assert reward == pytest.approx(np.mean(expected), abs=1e-9)
    assert 0.5 < reward <= 1.0


def test_roc_auc_helper():
    y = np.array([0, 0, 1, 1, 2, 2])
    p = np.eye(3)[y] * 0.9 + 0.1 / 3
    assert roc_auc(y, p, 3) == pytest.approx(1.0)
    assert roc_auc(np.array([0, 1, 0, 1]), np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]]), 2) == 1.0
    splits = make_splits(np.array([0, 1] * 20), n_splits=3, split_seed=2)
    assert len(splits) == 3 and all(len(tr) == len(va) == 20 for tr, va in splits)
    assert all(np.bincount(np.array([0, 1] * 20)[va]).tolist() == [10, 10] for _, va in splits)


def test_failure_gives_reflection_then_truncation(pool):
    env = make_env("iris", max_steps=2, n_splits=2)
    obs0, _ = env.reset()
    bad = "\n    import numpy as np\n    raise RuntimeError('deliberate failure 123')"
    obs, reward, terminated, truncated, info = env.step(bad)
    assert reward == -1.0 and not terminated and not truncated
    assert info["status"] == "error" and "deliberate failure 123" in info["error"]
    assert info["auc"] is None and info["steps"] == 1
    # the reflection prompt (task-first, the default layout): the task prompt, the previous code as the body of its
    # open function, the error as comments, and a fresh open function
    assert obs.startswith(obs0)
    rest = obs[len(obs0):]
    assert rest.startswith("\n    import numpy as np\n    raise RuntimeError('deliberate failure 123')")
    assert "# build_model above failed: RuntimeError: deliberate failure 123" in rest
    assert obs.endswith('return a fitted scikit-learn classifier."""') and not obs.endswith("\n")
    assert rest.count("\ndef build_model") == 1
    obs, reward, terminated, truncated, info = env.step("this is not code at all")
    assert info["status"] == "invalid-output" and reward == -1.0
    assert truncated is True and terminated is False and info["steps"] == 2
    assert obs[len(obs0):].startswith("\nthis is not code at all\n") and "# A fixed build_model" in obs
    # the earlier layout, feedback first, stays available
    old = make_env("iris", max_steps=2, n_splits=2, reflection_layout="feedback_first")
    old.reset()
    obs = old.step(bad)[0]
    assert "#     raise RuntimeError('deliberate failure 123')" in obs and obs.endswith(obs0)
    with pytest.raises(RuntimeError):
        env.step(LR_BODY)
    # after reset the episode starts from the task prompt; success terminates
    obs, _ = env.reset()
    assert obs == obs0
    _, reward, terminated, truncated, info = env.step(LR_BODY)
    assert terminated and not truncated and reward > 0.9


def test_error_summary_keeps_generated_frames_and_exception(pool):
    env = make_env("iris", n_splits=1)
    env.reset()
    obs, _, _, _, info = env.step("\n    from sklearn.ensemble import RandomForestClassifier\n    return RandomForestClassifier().fit(x_train)")
    assert info["status"] == "error"
    assert 'File "<generated>"' in info["error"] and "fit(x_train)" in info["error"]
    assert "missing 1 required positional argument" in info["error"].splitlines()[-1]
    assert "site-packages" not in info["error"] and "Traceback" not in info["error"]
    assert info["error"].splitlines()[-1] in obs
    tb = (
        "Traceback (most recent call last):\n  File \"/x/lib.py\", line 3, in f\n    g()\n    ^^^\n"
        "ValueError: inner\n\nDuring handling of the above exception, another exception occurred:\n\n"
        "Traceback (most recent call last):\n  File \"<generated>\", line 5, in build_model\n    f()\n"
        "  File \"/x/lib.py\", line 9, in f\n    raise KeyError(1)\nKeyError: 1"
    )
    assert summarize_error(tb) == '  File "<generated>", line 5, in build_model\n    f()\nKeyError: 1'
    assert summarize_error("x" * 2000, max_chars=100).startswith("[...]")


def test_error_text_does_not_depend_on_where_python_and_the_project_live(pool):
    # The same ImportError raised from two installations reads the same (the prompt must not depend on the clone).
    def import_error(prefix):
        return (
            "Traceback (most recent call last):\n  File \"<generated>\", line 5, in build_model\n"
            "    from sklearn.ensemble import XgbClassifier\nImportError: cannot import name 'XgbClassifier' from "
            f"'sklearn.ensemble' ({prefix}/lib/python3.11/site-packages/sklearn/ensemble/__init__.py)"
        )
    one = summarize_error(import_error("/work/main/.venv"))
    other = summarize_error(import_error("/tmp/other-clone/.venv"))
    assert one == other and one.endswith("'sklearn.ensemble' (site-packages/sklearn/ensemble/__init__.py)")
    assert summarize_error('  File "/usr/lib/python3.12/json/decoder.py", line 3\nValueError: v') == (
        '  File "python3.12/json/decoder.py", line 3\nValueError: v'
    )
    # a relative path or a word that merely contains the names is left as it is
    assert summarize_error("ValueError: data/python3.11/x and my-site-packages/y") == (
        "ValueError: data/python3.11/x and my-site-packages/y"
    )
    # and in a real step: the error names no installation directory of this machine
    import sys
    env = make_env("iris", n_splits=1)
    env.reset()
    _, _, _, _, info = env.step("\n    from sklearn.ensemble import XgbClassifier\n    return XgbClassifier()")
    assert info["status"] == "error" and "cannot import name 'XgbClassifier'" in info["error"]
    assert "site-packages/sklearn/ensemble/__init__.py" in info["error"]
    assert sys.prefix not in info["error"] and sys.base_prefix not in info["error"]


def test_no_reflection_mode_repeats_the_task_prompt(pool):
    env = make_env("iris", max_steps=1, reflection=False, n_splits=1)
    obs0, _ = env.reset()
    obs, reward, terminated, truncated, info = env.step("\n    return None")
    assert reward == -1.0 and truncated and not terminated
    assert obs == obs0


def test_timeout_status(pool):
    env = make_env("iris", n_splits=1, timeout=1.0)
    env.reset()
    # a sleeping (not CPU-bound) hang: only the wall-clock limit catches it
    _, reward, _, _, info = env.step("\n    import time\n    time.sleep(1000)\n    return None")
    assert info["status"] == "timeout" and reward == -1.0


def test_grid_search_is_refused_before_running(pool):
    env = make_env("iris", n_splits=1)
    env.reset()
    action = (
        "\n    from sklearn.model_selection import GridSearchCV\n    from sklearn.svm import SVC\n"
        "    return GridSearchCV(SVC(probability=True), {'C': [1, 10]}).fit(x_train, y_train)"
    )
    t0 = time.monotonic()
    obs, reward, terminated, truncated, info = env.step(action)
    assert info["status"] == "refused" and reward == -1.0
    assert "GridSearchCV" in info["error"] and "GridSearchCV" in obs
    assert time.monotonic() - t0 < 0.5  # nothing ran


def test_info_fields_and_bad_output(pool):
    env = make_env("wine", n_splits=1)
    env.reset()
    action = "\n    class M:\n        def predict_proba(self, x):\n            return x[:, :3]\n    return M()"
    _, reward, _, _, info = env.step(action)
    assert reward == -1.0 and info["status"] == "error" and "predict_proba" in info["error"]
    for key in ("status", "error", "auc", "aucs", "code", "steps", "stdout", "duration", "dataset"):
        assert key in info


def test_eight_envs_in_a_vector_env_share_data_and_pool(pool):
    t0 = time.monotonic()
    envs = [make_env("breast_cancer", n_splits=2) for _ in range(8)]
    assert time.monotonic() - t0 < 1.0  # cheap: the dataset, splits and prompt are cached
    assert all(e.dataset is envs[0].dataset and e.pool is envs[0].pool for e in envs)
    with TextVectorEnv(envs) as venv:
        obs, infos = venv.reset(seed=0)
        assert len(set(obs)) == 1
        actions = [LR_BODY] * 4 + ["\n    raise ValueError('nope')"] * 2 + ["garbage text", LR_BODY]
        obs, rewards, terminated, truncated, infos = venv.step(actions)
    statuses = [i["status"] for i in infos]
    assert statuses == ["ok"] * 4 + ["error"] * 2 + ["invalid-output", "ok"]
    assert rewards[0] == rewards[3] == rewards[7] > 0.9
    assert (rewards[4:7] == -1).all()
    assert terminated.tolist() == [True] * 4 + [False] * 3 + [True]
    assert not truncated.any()


def test_env_with_explicit_dataset_object(pool):
    ds = load_dataset("iris")
    env = DataScienceEnv(ds, pool=pool, n_splits=1, **FAST)
    env.reset()
    assert env.step(LR_BODY)[4]["status"] == "ok"


def test_benchmark_dataset_env(pool, shared_datasets):
    env = make_env("breast_w", data_dir=str(shared_datasets), n_splits=2)
    obs, _ = env.reset()
    assert "Dataset: breast_w" in obs and "Bare_Nuclei" in obs
    _, reward, terminated, _, info = env.step(LR_BODY)
    assert info["status"] == "ok" and reward > 0.95


def test_answer_class_counts_per_batch():
    """The rollout's per-batch class table: count, runnable count and mean reward per class, most frequent first;
    samples without a class (an environment that names none) are left out."""
    from datamodules.rollout import answer_class_counts

    samples = [{"answer_class": "RandomForestClassifier", "status": "ok", "reward": 0.8},
               {"answer_class": "LogisticRegression", "status": "ok", "reward": 0.95},
               {"answer_class": "RandomForestClassifier", "status": "error", "reward": -1.0},
               {"answer_class": "RandomForestClassifier", "status": "ok", "reward": 0.82},
               {"status": "ok", "reward": 0.5}]
    counts = answer_class_counts(samples)
    assert list(counts) == ["RandomForestClassifier", "LogisticRegression"]
    assert counts["RandomForestClassifier"] == {"n": 3, "runnable": 2, "mean_reward": pytest.approx((0.8 - 1 + 0.82) / 3)}
    assert counts["LogisticRegression"] == {"n": 1, "runnable": 1, "mean_reward": 0.95}
    assert answer_class_counts([{"status": "ok", "reward": 1.0}]) == {}


def test_an_answer_earns_the_same_and_leads_to_the_same_state_wherever_it_is_written(pool):
    """What ``actions_relabel_to_first_state`` promises: the reward, the next observation and the termination of an
    answer do not depend on the state it is written in (here: the task prompt, after a failure, after code that ran)."""
    assert DataScienceEnv.actions_relabel_to_first_state
    env = make_env("breast_cancer", n_splits=2, split_seed=1, stop_on_success=False, max_steps=5)
    first, _ = env.reset()
    at_first = env.step(LR_BODY)
    assert env.step("\n    return undefined_name")[1] == -1.0  # a failure: the next state shows its error
    after_failure = env.step(LR_BODY)
    after_success = env.step(LR_BODY)  # written at "improve on it" after code that ran
    for later in (after_failure, after_success):
        assert later[:3] == at_first[:3]  # observation, reward, terminated
    assert env.reset()[0] == first
