"""Prompts of the data-science env: structure, no label content, worked examples that run, the reflection prompt."""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest

from envs.datascience import DataScienceEnv, load_dataset
from envs.datascience.datasets import TabularDataset, dataset_names
from envs.datascience.prompts import PROMPT_STYLES, STYLES, error_hint, reflection_prompt
from envs.datascience.evaluation import get_default_pool

BUNDLED = ("breast_cancer", "wine", "iris", "digits")
FAST = dict(timeout=20.0, memory_limit_mb=1024)


@pytest.fixture(scope="module")
def pool():
    return get_default_pool()


def open_stubs(prompt: str) -> int:
    return len(re.findall(r"^def build_model\(", prompt, flags=re.MULTILINE))


@pytest.mark.parametrize("style", PROMPT_STYLES)
@pytest.mark.parametrize("name", BUNDLED)
def test_every_prompt_ends_inside_the_targets_open_function(style, name):
    env = DataScienceEnv(name, prompt_style=style)
    prompt, ds = env.prompt, env.dataset
    # right after the function docstring's closing quotes, no trailing newline (see envs.datascience.prompts)
    assert prompt.endswith('\n    """') and not prompt.endswith("\n")
    n_examples = min(2, len(STYLES[style].examples))
    assert open_stubs(prompt) == n_examples + 1 and len(re.findall(r"^    return ", prompt, re.MULTILINE)) == n_examples
    last = prompt[prompt.rfind("\ndef build_model(") :]
    n_train = len(env.splits[0][0])
    assert f"shape ({n_train}, {ds.n_features})" in last and f"({ds.n_classes} classes)" in last
    # the target is named once, after every worked example, and nothing of a solution follows its stub
    assert prompt.count(f"Dataset: {name}") == 1
    target_doc = prompt.rfind(f'"""Dataset: {name}')
    assert target_doc > prompt.rfind("\n    return ") and "import" not in last.replace("Import the modules", "")


def test_worked_examples_are_invented_datasets():
    names = set(dataset_names()) | set(BUNDLED)
    assert not STYLES["paper"].examples
    for style, chosen in STYLES.items():
        assert not {ex.name for ex in chosen.examples} & names, style


@pytest.mark.parametrize("style", [s for s in PROMPT_STYLES if s != "paper"])
def test_prompt_holds_no_data_or_label_values(style):
    """The prompt is a function of the table's metadata only: other features and shuffled labels give the same."""
    ds = load_dataset("breast_cancer")
    rng = np.random.default_rng(0)
    other = TabularDataset(ds.name, rng.normal(size=ds.X.shape), rng.permutation(ds.y), ds.feature_names,
                           ds.class_names, ds.description, ds.target_name, ds.source)
    assert DataScienceEnv(other, prompt_style=style).prompt == DataScienceEnv(ds, prompt_style=style).prompt


def test_few_shot_v1_is_the_prompt_measured_before():
    # docs/results/cpu and the "before" numbers of docs/results/base_rate.md were measured with this exact prompt
    prompt = DataScienceEnv("breast_cancer", prompt_style="few_shot_v1").prompt
    assert hashlib.sha256(prompt.encode()).hexdigest()[:16] == "4f129a841f7a6641"


_EXAMPLES = sorted({(ex.name, ex.body) for chosen in STYLES.values() for ex in chosen.examples})


@pytest.mark.parametrize("name,body", _EXAMPLES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(_EXAMPLES)])
@pytest.mark.parametrize("dataset", ["breast_cancer", "iris"])
def test_every_worked_example_runs_in_the_sandbox_and_scores(pool, name, body, dataset):
    env = DataScienceEnv(dataset, pool=pool, n_splits=1, **FAST)
    info = env.evaluate("\n" + body)
    assert info["status"] == "ok", info["error"]
    assert info["auc"] > 0.9


def _estimator(body: str) -> tuple[str, str]:
    module, cls = re.search(r"from ([\w.]+) import (\w+)", body).groups()
    return module, cls


def test_default_examples_survive_being_copied_onto_each_others_class(pool):
    """Small models copy an example but swap the class (``RandomForestClassifier(max_iter=1000)`` from a
    LogisticRegression example): every example's arguments must be valid for every other example's class."""
    examples = STYLES["few_shot"].examples
    env = DataScienceEnv("breast_cancer", pool=pool, n_splits=1, **FAST)
    for a in examples:
        for b in examples:
            (mod_a, cls_a), (mod_b, cls_b) = _estimator(a.body), _estimator(b.body)
            swapped = a.body.replace(mod_a, mod_b).replace(cls_a, cls_b)
            info = env.evaluate("\n" + swapped)
            assert info["status"] == "ok", (swapped, info["error"])


@pytest.mark.parametrize("error,expected", [
    ("TypeError: RandomForestClassifier.__init__() got an unexpected keyword argument 'max_iter'",
     "RandomForestClassifier has no parameter max_iter: remove it."),
    ("ImportError: cannot import name 'LogisticRegression' from 'sklearn.svm' (/x/sklearn/svm/__init__.py)",
     "sklearn.svm has no LogisticRegression: import a class that exists."),
    ("ModuleNotFoundError: No module named 'tensorflow'", "tensorflow is not available: use scikit-learn."),
    ('  File "<generated>", line 7, in build_model\nRecursionError: maximum recursion depth exceeded',
     "build_model must not call build_model: create a scikit-learn classifier instead."),
    ("NameError: name 'build_model_2' is not defined",
     "build_model_2 does not exist: create a scikit-learn classifier instead."),
    ("NameError: name 'RandomForestClassifier' is not defined",
     "RandomForestClassifier is not defined: import it inside build_model."),
    ("TypeError: build_model returned a LinearRegression object without a predict_proba method",
     "LinearRegression has no predict_proba: return a classifier that has one."),
    ("build_model never returns a model (no return statement; was the answer cut off?)",
     "end build_model with a return of the fitted classifier."),
    ("ValueError: something specific to the data", None),
])
def test_error_hints(error, expected):
    assert error_hint(error) == expected


def test_reflection_prompt_is_the_feedback_as_comments_then_the_task_unchanged():
    task = DataScienceEnv("breast_cancer", prompt_style="few_shot").prompt
    code = ("import numpy as np\n\n\ndef build_model(x_train: np.ndarray, y_train: np.ndarray):\n"
            "    from sklearn.ensemble import RandomForestClassifier\n    clf = RandomForestClassifier(max_iter=1000)\n"
            "    clf.fit(x_train, y_train)\n    return clf\n")
    error = ('  File "<generated>", line 6, in build_model\n    clf = RandomForestClassifier(max_iter=1000)\n'
             "TypeError: RandomForestClassifier.__init__() got an unexpected keyword argument 'max_iter'")
    obs = reflection_prompt(task, code, "unused", error)
    # what the first attempt saw comes last, unchanged: the examples and the task up to its open stub
    assert obs.endswith("\n\n\n" + task)
    feedback = obs[: len(obs) - len(task)]
    assert "#     clf = RandomForestClassifier(max_iter=1000)" in feedback
    assert all(line.startswith("#") for line in feedback.strip("\n").splitlines())  # nothing to copy as code
    assert "# TypeError: RandomForestClassifier.__init__() got an unexpected keyword argument 'max_iter'" in feedback
    assert "# Hint: RandomForestClassifier has no parameter max_iter: remove it." in feedback
    assert "import numpy as np" not in feedback
    assert open_stubs(obs) == open_stubs(task)
    # an answer without usable code is shown as a (shortened) comment
    paper = DataScienceEnv("iris", prompt_style="paper").prompt
    obs = reflection_prompt(paper, None, "I would use\n" * 40, "no valid Python code was found in the answer")
    assert obs.startswith("# I would use\n") and obs.endswith("\n\n\n" + paper)
    assert obs.count("# I would use") == 10 and "# [...]" in obs
    assert "# Hint: write the Python code of the function body only." in obs
