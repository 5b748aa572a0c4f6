"""Turning generated text into a build_model function (envs.datascience.extract)."""

from __future__ import annotations

import ast

import pytest

from envs.datascience.extract import (NO_CODE, UNKNOWN_CLASS, answer_class, answer_configuration, extract_function,
                                     find_banned)

LR_BODY = [
    "from sklearn.linear_model import LogisticRegression",
    "model = LogisticRegression(max_iter=500)",
    "model.fit(x_train, y_train)",
    "return model",
]


def _function(code: str) -> ast.FunctionDef:
    tree = ast.parse(code)
    funcs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "build_model"]
    assert len(funcs) == 1
    return funcs[0]


def _body_calls(code: str) -> list[str]:
    return [ast.unparse(s) for s in _function(code).body]


@pytest.mark.parametrize("indent", [0, 2, 4, 8])
def test_body_at_any_indentation(indent):
    text = "\n" + "\n".join(" " * indent + line for line in LR_BODY) + "\n"
    ex = extract_function(text)
    assert ex.ok, ex.error
    assert ex.form == "body"
    assert _body_calls(ex.code) == LR_BODY
    assert ex.code.startswith("import numpy as np\n")


def test_body_with_trailing_chatter_and_module_level_usage():
    text = "\n    " + "\n    ".join(LR_BODY) + "\n\n\nThis code fits a logistic regression.\nmodel = build_model(X, y)\n"
    ex = extract_function(text)
    assert ex.ok and len(_function(ex.code).body) == 4
    # column-0 body followed by usage code: cut after the first top-level return
    text0 = "\n" + "\n".join(LR_BODY) + "\n\nmodel = build_model(X, y)\nprint(model.score(X, y))\n"
    ex0 = extract_function(text0)
    assert ex0.ok and _body_calls(ex0.code)[-1] == "return model"
    assert "print" not in ex0.code


def test_full_definition_in_markdown_fence_with_chatter():
    text = (
        "Sure! Here is a solution:\n```python\nimport numpy as np\nfrom sklearn.ensemble import RandomForestClassifier\n\n"
        "def build_model(x_train, y_train):\n    clf = RandomForestClassifier(n_estimators=10)\n"
        "    clf.fit(x_train, y_train)\n    return clf\n```\nIt uses a random forest."
    )
    ex = extract_function(text)
    assert ex.ok and ex.form == "function"
    assert "from sklearn.ensemble import RandomForestClassifier" in ex.code
    assert ex.code.count("import numpy as np") == 1
    assert "random forest." not in ex.code


def test_full_definition_keeps_its_own_parameter_names():
    ex = extract_function("def build_model(X, y):\n    from sklearn.dummy import DummyClassifier\n    return DummyClassifier().fit(X, y)\n")
    assert ex.ok
    fn = _function(ex.code)
    assert [a.arg for a in fn.args.args] == ["X", "y"]


def test_one_line_definition_and_unterminated_fence():
    ex = extract_function("def build_model(x, y): return __import__('sklearn.dummy').dummy.DummyClassifier().fit(x, y)")
    assert ex.ok and "return" in ex.code
    ex = extract_function("```python\n    from sklearn.naive_bayes import GaussianNB\n    return GaussianNB().fit(x_train, y_train)\n")
    assert ex.ok and "GaussianNB" in ex.code


def test_fenced_body():
    ex = extract_function("```\n    from sklearn.naive_bayes import GaussianNB\n    return GaussianNB().fit(x_train, y_train)\n```\nDone.")
    assert ex.ok and ex.form == "body"


def test_truncated_generation_keeps_longest_parseable_prefix_but_needs_a_return():
    text = "\n    from sklearn.svm import SVC\n    model = SVC(probability=True)\n    model.fit(x_train, y_train)\n    return model\n    x = foo(1,\n"
    ex = extract_function(text)
    assert ex.ok and _body_calls(ex.code)[-1] == "return model"
    cut = extract_function("\n    from sklearn.linear_model import LogisticRegression\n    model = LogisticRegression(C=1.0,\n")
    assert not cut.ok and "return" in cut.error


@pytest.mark.parametrize(
    "text",
    ["", "   \n\n", "I'm sorry, I can't help with that.", '\n    """Only more docstring."""\n', "\n    pass\n", None, ")))((("],
)
def test_garbage_is_invalid(text):
    ex = extract_function(text)
    assert not ex.ok and ex.code is None and ex.error


def test_extracted_code_is_runnable():
    ex = extract_function("\n  " + "\n  ".join(LR_BODY))
    namespace: dict = {}
    exec(compile(ex.code, "<test>", "exec"), namespace)
    import numpy as np

    x = np.random.default_rng(0).normal(size=(40, 3))
    y = (x[:, 0] > 0).astype(int)
    model = namespace["build_model"](x, y)
    assert model.predict_proba(x).shape == (40, 2)


def test_find_banned_uses_code_not_comments():
    assert find_banned("from sklearn.model_selection import GridSearchCV\n", ("GridSearchCV",)) == "GridSearchCV"
    assert find_banned("import sklearn.model_selection as ms\ng = ms.GridSearchCV", ("GridSearchCV",)) == "GridSearchCV"
    assert find_banned("g = getattr(ms, 'GridSearchCV')", ("GridSearchCV",)) == "GridSearchCV"
    assert find_banned("from sklearn.experimental import enable_halving_search_cv\nfrom sklearn.model_selection import HalvingGridSearchCV", ("GridSearchCV",))
    assert find_banned("# GridSearchCV would be too slow\nx = 1\n", ("GridSearchCV",)) is None
    assert find_banned("from sklearn.model_selection import RandomizedSearchCV", ("GridSearchCV",)) is None


def test_huge_action_is_bounded_in_time():
    import time

    text = "\n    " + "\n    ".join(LR_BODY) + "\n" + "blah blah ((( \n" * 50_000
    t0 = time.monotonic()
    ex = extract_function(text)
    assert ex.ok and time.monotonic() - t0 < 2.0


@pytest.mark.parametrize("body, expected", [
    (["from sklearn.ensemble import RandomForestClassifier", "clf = RandomForestClassifier()", "clf.fit(x_train, y_train)",
      "return clf"], "RandomForestClassifier"),
    (LR_BODY, "LogisticRegression"),
    (["from sklearn import linear_model", "return linear_model.LogisticRegression().fit(x_train, y_train)"],
     "LogisticRegression"),
    (["from sklearn.pipeline import make_pipeline", "from sklearn.preprocessing import StandardScaler",
      "from sklearn.svm import SVC", "m = make_pipeline(StandardScaler(), SVC(probability=True))",
      "m.fit(x_train, y_train)", "return m"], "SVC"),
    (["from sklearn.pipeline import Pipeline", "from sklearn.preprocessing import StandardScaler",
      "from sklearn.neighbors import KNeighborsClassifier",
      "pipe = Pipeline(steps=[('s', StandardScaler()), ('knn', KNeighborsClassifier())])",
      "return pipe.fit(x_train, y_train)"], "KNeighborsClassifier"),
    (["from sklearn.tree import DecisionTreeClassifier", "from sklearn.ensemble import RandomForestClassifier",
      "if len(x_train) > 100:", "    model = RandomForestClassifier()", "else:", "    model = DecisionTreeClassifier()",
      "model.fit(x_train, y_train)", "return model"], "DecisionTreeClassifier"),
    (["from sklearn.calibration import CalibratedClassifierCV", "from sklearn.svm import LinearSVC",
      "model = CalibratedClassifierCV(LinearSVC())", "model.fit(x_train, y_train)", "return model"],
     "CalibratedClassifierCV"),
    (["return models[0]"], UNKNOWN_CLASS),
])
def test_answer_class_is_the_returned_estimator(body, expected):
    """The class of an answer is the estimator its build_model returns: followed through assignments, fit (which
    returns the estimator), make_pipeline / Pipeline (the last step); the last assignment in source order wins."""
    ex = extract_function("\n    " + "\n    ".join(body))
    assert ex.ok, ex.error
    assert answer_class(ex.code) == expected


@pytest.mark.parametrize("body, expected", [
    (["from sklearn.ensemble import RandomForestClassifier", "clf = RandomForestClassifier()", "clf.fit(x_train, y_train)",
      "return clf"], "RandomForestClassifier()"),
    # keywords sorted by name, values as written; the same configuration however the keywords were ordered
    (["from sklearn.ensemble import RandomForestClassifier",
      "clf = RandomForestClassifier(random_state = 0, max_samples=1000)", "clf.fit(x_train, y_train)", "return clf"],
     "RandomForestClassifier(max_samples=1000, random_state=0)"),
    (["from sklearn import linear_model", "C = 10",
      "return linear_model.LogisticRegression(C, max_iter=10**3).fit(x_train, y_train)"],
     "LogisticRegression(C, max_iter=10 ** 3)"),
    (["from sklearn.pipeline import make_pipeline", "from sklearn.preprocessing import StandardScaler",
      "from sklearn.svm import SVC", "m = make_pipeline(StandardScaler(with_mean=False), SVC(probability=True))",
      "m.fit(x_train, y_train)", "return m"], "SVC(probability=True)"),
    (["from sklearn.ensemble import RandomForestClassifier", "kw = {'n_estimators': 5}",
      "return RandomForestClassifier(**kw).fit(x_train, y_train)"], "RandomForestClassifier(**kw)"),
    (["return models[0]"], UNKNOWN_CLASS),
])
def test_answer_configuration_is_the_returned_constructor_call(body, expected):
    """The configuration: the class answer_class names, with the arguments of the very constructor it was read off
    (a pipeline's last step's, not its preprocessing's)."""
    ex = extract_function("\n    " + "\n    ".join(body))
    assert ex.ok, ex.error
    assert answer_configuration(ex.code) == expected
    if expected != UNKNOWN_CLASS:
        assert answer_configuration(ex.code).split("(")[0] == answer_class(ex.code)


def test_answer_class_of_answers_without_code():
    assert answer_class(extract_function("I cannot help with that.").code) == NO_CODE
    assert answer_class(None) == NO_CODE
    assert answer_class("def build_model(x_train, y_train):\n    return (\n") == UNKNOWN_CLASS  # does not parse
    assert answer_class("def other(x, y):\n    return 1\n") == UNKNOWN_CLASS
    assert answer_configuration(None) == NO_CODE
    assert answer_configuration("def build_model(x_train, y_train):\n    return (\n") == UNKNOWN_CLASS
