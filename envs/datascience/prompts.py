"""Prompts of the data-science environment (docs/method.md section 13), in the project's own words.

A task prompt is a Python stub: a module docstring naming the dataset with its description and columns,
``import numpy as np``, and ``def build_model(x_train: np.ndarray, y_train: np.ndarray):`` with a docstring that
gives the training-array shape and class count; the body is left for the model.

Every prompt ends right after the closing ``\"\"\"`` of the function docstring, *without* a trailing newline.
Reason: byte-level BPE tokenizers (SmolLM2's included) merge a newline with the following indentation into a
single token, so a prompt ending in a bare ``"\\n"`` leaves the model at column 0 and pushes it to write
module-level code; ending on the ``\"\"\"`` line lets its first token be ``"\\n    "``, the natural
continuation of a function body.

Styles (:data:`STYLES`): ``"paper"`` is the bare stub (as the paper). ``"few_shot"`` puts two complete worked
examples on invented (non-benchmark) datasets before the stub, which small models copy, and keeps every module
docstring to one sentence without the column list. ``"few_shot_v1"`` is the earlier few-shot prompt, byte for byte
(docs/results/cpu was measured with it).

Measured with ``tools/base_rate.py`` (docs/results/base_rate.md): SmolLM2-135M-Instruct, untrained, the quickstart's
sampling (temperature 0.5, top-k 50, 128 new tokens, stop strings at the next top-level block), breast_cancer,
runnable first attempts (95 % Wilson interval):

* ``few_shot_v1`` (534 tokens): 5/64 = 7.8 % [3.4, 17.0]. Its failures: ``model = build_model(...)`` (recursion or
  an invented ``build_model_xyz``), the penguins example's ``max_iter=1000`` copied onto RandomForestClassifier,
  LinearRegression (no predict_proba), long runs of invented imports after "Import the modules you need".
* estimator named ``clf`` and no hyperparameters in the examples (``RandomForestClassifier()``: every
  scikit-learn classifier accepts no arguments, so a copied call runs whatever class it is pasted onto): 22/64 =
  34.4 % [23.9, 46.6].
* ``few_shot`` = that, plus the function docstring "Fit a scikit-learn classifier on x_train, y_train and return
  it." (516 tokens): 31/64 = 48.4 % [36.6, 60.4] (seed 0) and 37/64 = 57.8 % [45.6, 69.1] (seed 1).
* one-line ``return RandomForestClassifier().fit(x_train, y_train)`` examples (502 tokens): 24/64 = 37.5 %
  [26.7, 49.7] -- the model then often returns an unfitted classifier.

The reflection prompt (after a failed step) shows the previous code and the error as comments with a one-line hint
derived from the error text alone (:func:`error_hint`), then the task prompt again, unchanged. Second attempts
that ran, one per failed first attempt: the earlier layout (the failed code as code after the task's docstring,
then a fresh stub; after ``few_shot_v1``) 1/59 = 1.7 % [0.3, 9.0]; the feedback as comments between the examples
and the task (after ``few_shot``) 1/27 = 3.7 % [0.7, 18.3] -- next to the stub, the failed attempt is copied back;
the feedback first, then the task unchanged (after ``few_shot``, seeds 0 and 1): 29/60 = 48.3 % [36.2, 60.7].
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass

__all__ = [
    "task_prompt", "reflection_prompt", "task_first_prompt", "feedback_first_prompt", "open_stub", "short_stub", "REFLECTION_LAYOUTS",
    "stub", "clean_description", "error_hint", "WorkedExample", "PromptStyle",
    "STYLES", "PROMPT_STYLES", "FEW_SHOT_EXAMPLES", "FUNCTION_DOCS",
]

# The function docstring of the stub. "fit": what to do with the data, in one sentence (the default few-shot style);
# "v1": the earlier wording, whose "Import the modules you need" drew long runs of invented imports from SmolLM2.
FUNCTION_DOCS: dict[str, str] = {
    "fit": '''    """Fit a scikit-learn classifier on x_train, y_train and return it.

    x_train: float array of shape ({n}, {d}); y_train: int array of shape ({n},) with labels 0..{k1} ({k} classes).
    The classifier must have predict_proba(x).{extra}
    """''',
    "v1": '''    """Import the modules you need, then build and return a fitted scikit-learn classifier.

    x_train: float array of shape ({n}, {d}); y_train: int array of shape ({n},) with labels 0..{k1} ({k} classes).
    The returned model must implement predict_proba(x).{extra}
    """''',
}


def clean_description(text: str, max_chars: int = 1200) -> str:
    """Make a description safe inside a docstring and short enough for a small model's context."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace('"""', "'''").replace("\\", "/")
    text = re.sub(r"[^\S\n]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text).strip()
    if len(text) > max_chars:
        cut = text[:max_chars]
        cut = cut[: cut.rfind(" ")] if " " in cut[max_chars // 2 :] else cut
        text = cut.rstrip() + " [...]"
    return text


def _first_sentence(text: str, max_chars: int = 200) -> str:
    text = " ".join(text.split())
    cut = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0]
    return cut if len(cut) <= max_chars else cut[:max_chars].rsplit(" ", 1)[0] + " [...]"


def _module_doc(name: str, description: str, feature_names, target: str, class_names, compact: bool = False) -> str:
    if compact:
        # few-shot style: the examples already show the shape of an answer, and every prompt token costs the
        # small model attention (and the trainer compute): one sentence, no column list
        first = _first_sentence(description) if description.strip() else ""
        return (f'"""Dataset: {name}. {first}\nTarget: {target} ({len(class_names)} classes).\n"""\n'
                "import numpy as np\n").replace(". \n", ".\n")
    cols = ", ".join(feature_names)
    if len(cols) > 600:  # e.g. 64 pixel columns of digits
        cols = cols[:600].rsplit(", ", 1)[0] + ", ..."
    classes = ", ".join(str(c) for c in class_names)
    if len(classes) > 200:
        classes = classes[:200].rsplit(", ", 1)[0] + ", ..."
    parts = [f"Dataset: {name}", description.strip()] if description.strip() else [f"Dataset: {name}"]
    wrapped = textwrap.fill(
        f"Columns of x_train, in order (categorical columns are integer codes): {cols}.", width=100
    )
    parts.append(wrapped + f"\nTarget: {target} ({len(class_names)} classes: {classes}).")
    return '"""' + "\n\n".join(parts) + '\n"""\nimport numpy as np\n'


def stub(n_train: int, n_features: int, n_classes: int, banned=("GridSearchCV",), doc: str = "v1") -> str:
    """The open function: header + docstring ``FUNCTION_DOCS[doc]``, ending at the closing quotes (no trailing
    newline)."""
    if doc not in FUNCTION_DOCS:
        raise ValueError(f"function docstring must be one of {', '.join(FUNCTION_DOCS)}; got {doc!r}")
    extra = f" Do not use {', '.join(banned)}." if banned else ""
    text = FUNCTION_DOCS[doc].format(n=n_train, d=n_features, k=n_classes, k1=n_classes - 1, extra=extra)
    return "def build_model(x_train: np.ndarray, y_train: np.ndarray):\n" + text


# Worked examples of the few-shot styles, on invented datasets that are not in the benchmark. Short on purpose:
# small models copy them nearly verbatim, so they must be correct, general and quick to fit.
@dataclass(frozen=True)
class WorkedExample:
    """One complete solved stub of a few-shot prompt: an invented dataset and a ``build_model`` body."""

    name: str
    description: str
    features: tuple[str, ...]
    target: str
    classes: tuple[str, ...]
    n_train: int
    body: str


_PENGUINS = dict(
    name="penguins", description="Body measurements of penguins from three islands. Predict the species.",
    features=("bill_length_mm", "bill_depth_mm", "flipper_length_mm", "body_mass_g"), target="species",
    classes=("Adelie", "Chinstrap", "Gentoo"), n_train=166,
)
_BANK = dict(
    name="bank_marketing",
    description="Clients contacted by a bank's phone campaign. Predict whether the client subscribes to a term deposit.",
    features=("age", "job", "marital", "education", "balance", "housing", "loan", "duration", "campaign", "previous"),
    target="subscribed", classes=("no", "yes"), n_train=1000,
)
_STEEL = dict(
    name="steel_plates",
    description="Geometry and luminosity measurements of steel plates. Predict the type of surface fault.",
    features=("x_min", "x_max", "y_min", "y_max", "pixels_area", "perimeter", "luminosity", "thickness"),
    target="fault", classes=("bumps", "dirtiness", "k_scratch", "other", "pastry", "stains", "z_scratch"), n_train=970,
)


def _body(*lines: str) -> str:
    return "\n".join("    " + line if line else "" for line in lines)


@dataclass(frozen=True)
class PromptStyle:
    """A ``prompt_style``: the worked examples put before the task (in order; the first ``n_few_shot`` not named
    like the task are used) and the function docstring of every stub (a key of ``FUNCTION_DOCS``)."""

    examples: tuple[WorkedExample, ...]
    function_doc: str


def _fit_and_return(module: str, cls: str) -> str:
    # No hyperparameters: a small model copies an example's arguments onto whatever class it picks
    # (``RandomForestClassifier(max_iter=1000)``), and every scikit-learn classifier accepts none. The estimator is
    # ``clf``: after ``model = `` SmolLM2 tends to write ``build_model(...)`` (a recursive call).
    return _body(f"from {module} import {cls}", f"clf = {cls}()", "clf.fit(x_train, y_train)", "return clf")


STYLES: dict[str, PromptStyle] = {
    # the bare stub, as the paper
    "paper": PromptStyle((), "v1"),
    # two worked examples (measured in docs/results/base_rate.md)
    "few_shot": PromptStyle((
        WorkedExample(**_PENGUINS, body=_fit_and_return("sklearn.linear_model", "LogisticRegression")),
        WorkedExample(**_BANK, body=_fit_and_return("sklearn.ensemble", "RandomForestClassifier")),
    ), "fit"),
    # the earlier few-shot prompt, byte for byte: docs/results/cpu and the "before" numbers were measured with it
    "few_shot_v1": PromptStyle((
        WorkedExample(**_PENGUINS, body=_body(
            "from sklearn.linear_model import LogisticRegression", "model = LogisticRegression(max_iter=1000)",
            "model.fit(x_train, y_train)", "return model")),
        WorkedExample(**_BANK, body=_body(
            "from sklearn.ensemble import RandomForestClassifier", "model = RandomForestClassifier(n_estimators=100)",
            "model.fit(x_train, y_train)", "return model")),
        WorkedExample(**_STEEL, body=_body(
            "from sklearn.ensemble import HistGradientBoostingClassifier", "",
            "model = HistGradientBoostingClassifier(max_iter=200, learning_rate=0.1, random_state=0)",
            "model.fit(x_train, y_train)", "return model")),
    ), "v1"),
}

#: every accepted ``prompt_style``
PROMPT_STYLES: tuple[str, ...] = tuple(STYLES)

#: the examples of the default few-shot style, by name
FEW_SHOT_EXAMPLES: dict[str, WorkedExample] = {ex.name: ex for ex in STYLES["few_shot"].examples}


def _few_shot_prefix(style: PromptStyle, dataset_name: str, n_examples: int, banned) -> str:
    chosen = [ex for ex in style.examples if ex.name != dataset_name][:n_examples]
    blocks = []
    for ex in chosen:
        header = _module_doc(ex.name, ex.description, ex.features, ex.target, ex.classes, compact=True)
        blocks.append(header + "\n\n" + stub(ex.n_train, len(ex.features), len(ex.classes), banned, style.function_doc)
                      + "\n" + ex.body + "\n")
    return "\n\n".join(blocks) + ("\n\n" if blocks else "")


def task_prompt(
    name: str,
    description: str,
    feature_names,
    target: str,
    class_names,
    n_train: int,
    *,
    style: str = "paper",
    n_few_shot: int = 2,
    banned=("GridSearchCV",),
) -> str:
    """The initial observation of an episode (see the module docstring)."""
    if style not in STYLES:
        raise ValueError(f"prompt_style must be one of {', '.join(PROMPT_STYLES)}; got {style!r}")
    chosen = STYLES[style]
    few_shot = bool(chosen.examples)
    body = _module_doc(name, description, feature_names, target, class_names, compact=few_shot) + "\n\n" + stub(
        n_train, len(feature_names), len(class_names), banned, chosen.function_doc
    )
    if few_shot:
        return _few_shot_prefix(chosen, name, n_few_shot, banned) + body
    return body


def _as_comment(text: str, max_lines: int = 30, width: int = 160) -> str:
    lines = text.strip("\n").splitlines() or [""]
    if len(lines) > max_lines:
        lines = lines[:max_lines] + ["[...]"]
    return "\n".join(("# " + line[:width]).rstrip() for line in lines)


# What the most common errors of small models mean, as one line of advice derived from the error text alone
# (never from the task: the same error gets the same hint on every dataset). First match wins.
_HINTS: tuple[tuple[re.Pattern, str], ...] = tuple((re.compile(p), h) for p, h in (
    (r"(\w+)\.__init__\(\) got an unexpected keyword argument '(\w+)'", "{0} has no parameter {1}: remove it."),
    (r"cannot import name '(\w+)' from '([\w.]+)'", "{1} has no {0}: import a class that exists."),
    (r"No module named '([\w.]+)'", "{0} is not available: use scikit-learn."),
    (r"RecursionError", "build_model must not call build_model: create a scikit-learn classifier instead."),
    (r"name '(build_model\w*)' is not defined", "{0} does not exist: create a scikit-learn classifier instead."),
    (r"name '(\w+)' is not defined", "{0} is not defined: import it inside build_model."),
    (r"returned an? (\w+) object without a predict_proba method",
     "{0} has no predict_proba: return a classifier that has one."),
    (r"too many indices for array: array is 1-dimensional", "y_train is 1-dimensional: fit on x_train, y_train as they are."),
    (r"never returns a model", "end build_model with a return of the fitted classifier."),
    (r"no valid Python code|not valid Python", "write the Python code of the function body only."),
    (r"timed out", "use a smaller or faster model."),
))


def error_hint(error: str) -> str | None:
    """One line of advice for a known kind of error (see ``_HINTS``), or None."""
    for pattern, hint in _HINTS:
        match = pattern.search(error or "")
        if match:
            return hint.format(*match.groups())
    return None


#: where the feedback of a reflection prompt goes (:func:`reflection_prompt`)
REFLECTION_LAYOUTS: tuple[str, ...] = ("task_first", "feedback_first")

#: lines of the previous attempt a reflection prompt shows (enough for a short body; a runaway answer is cut)
SHOWN_LINES = 12
#: longest line of the previous attempt shown; a longer one (a runaway string, a flood) ends what is shown there
SHOWN_LINE_CHARS = 240


def open_stub(task: str) -> str:
    """The open function a task prompt ends with: its last ``def build_model(`` to the end (header + docstring)."""
    at = task.rfind("def build_model(")
    if at < 0:
        raise ValueError("the task prompt has no open build_model stub")
    return task[at:]


def _previous_body(previous_code: str | None, previous_answer: str) -> str:
    """The previous attempt as the continuation of the task's open function: the answer as it was generated, up to
    where a new top-level block began (the rollout's stop strings) -- so its tokens are the ones the row sampled and
    the next state shares them with it -- at most :data:`SHOWN_LINES` lines; the body of the program that ran when the
    answer wrote a whole function of its own. A line over :data:`SHOWN_LINE_CHARS` characters ends it, so the next
    state stays short whatever the answer was."""
    lines = []
    for line in (previous_answer or "").splitlines():
        # never show an unclosed string either: it would swallow the feedback below it
        if line.startswith(("def ", "class ", "if __name__")) or line.strip().startswith(('"""', "'''")):
            break
        lines.append(line.replace('"""', "'''"))
    if not any(line.startswith((" ", "\t")) and line.strip() for line in lines) and previous_code is not None \
            and "def build_model" in previous_code:
        lines = previous_code.split("def build_model", 1)[1].splitlines()[1:]
    while lines and not lines[0].strip():
        lines = lines[1:]
    lines = [line.rstrip() for line in lines]
    while lines and not lines[-1]:
        lines.pop()
    keep = next((i for i, line in enumerate(lines[:SHOWN_LINES]) if len(line) > SHOWN_LINE_CHARS), SHOWN_LINES)
    if keep < len(lines):
        lines = lines[:keep] + ["    # [...]"]
    return "\n" + "\n".join(lines) if lines else "\n    pass"


def short_stub(task: str) -> str:
    """The task's open function with the first line of its docstring only (the header and one sentence)."""
    header, _, doc = open_stub(task).partition("\n")
    quotes = '"""'
    first = doc.strip().removeprefix(quotes).splitlines()[0].strip().removesuffix(quotes) if doc.strip() else ""
    return f"{header}\n    {quotes}{first}{quotes}" if first else header


def task_first_prompt(task: str, previous_code: str | None, previous_answer: str, error: str | None = None,
                      auc: float | None = None) -> str:
    """The paper's reflection state laid out task-first: the task prompt unchanged, the previous attempt as the
    body of its open function, one or two lines of feedback as comments, then the open function again with the first
    sentence of its docstring (:func:`short_stub`).

    The feedback is the error's last line (the exception, as the env summarised it) with the :func:`error_hint` of
    known errors and a request for a fixed version, or -- after code that ran (episodes that go on after a success)
    -- its mean validation ROC AUC with a request for a better one. Every reflection prompt starts with the whole task
    prompt, which is also every first attempt's prompt: a batch's rows share it as one prefix, computed once
    (generation and update); and the previous attempt is shown as it was sampled, so the row that sampled it and its
    next state share that part too. A reflection costs each row its feedback and the short stub (~40 tokens).

    Why so short (docs/results/reflection_layout.md; SmolLM2-135M, 32 replayed first attempts on pharyngitis, one
    second attempt each): after code that ran, the second attempt ran in 8 of 18 cases with the whole stub after a
    two-line request, in 13 of 18 with the task's whole block (docstring and stub) again, and in 6 of 18 with this
    layout, which is 130 tokens shorter per row than the block; after a failure almost never (0-2 of 14 in every
    layout: the small model copies the failed attempt back)."""
    body = _previous_body(previous_code, previous_answer)
    if auc is not None:
        feedback = f"# build_model above ran: validation ROC AUC {auc:.4f}. A better build_model:\n"
    else:
        lines = [line.strip() for line in (error or "").strip().splitlines() if line.strip()]
        last = (lines[-1] if lines else "unknown error")[:200]
        hint = error_hint(error or "")
        feedback = (f"# build_model above failed: {last}\n" + (f"# Hint: {hint}\n" if hint else "")
                    + "# A fixed build_model:\n")
    return f"{task}{body}\n\n\n{feedback}{short_stub(task)}"


def reflection_prompt(task: str, previous_code: str | None, previous_answer: str, error: str | None,
                      auc: float | None = None, layout: str = "feedback_first") -> str:
    """Observation after a step that does not end the episode: :func:`task_first_prompt` (``layout="task_first"``)
    or the earlier feedback-first layout below (``"feedback_first"``, after failures only)."""
    if layout == "task_first":
        return task_first_prompt(task, previous_code, previous_answer, error, auc)
    if layout != "feedback_first":
        raise ValueError(f"reflection layout must be one of {', '.join(REFLECTION_LAYOUTS)}; got {layout!r}")
    if auc is not None:
        raise ValueError("the feedback_first layout shows errors only; use layout='task_first' for feedback on "
                         "code that ran")
    return feedback_first_prompt(task, previous_code, previous_answer, error)


def feedback_first_prompt(task: str, previous_code: str | None, previous_answer: str, error: str) -> str:
    """Observation after a failed step: the previous code (or answer) and its error as comments with a one-line
    hint, then the task prompt again, unchanged.

    ``task`` is the episode's initial prompt, so the prompt again ends inside the open function body (right after
    the docstring, no trailing newline) and everything between the feedback and the open stub -- the worked
    examples and the task -- is what the first attempt saw. Why this order and comments: small models copy the
    code nearest to the open stub; shown there (as code or as a comment), the failed attempt was copied back
    nearly verbatim, and second attempts ran far less often than fresh first attempts (docs/results/base_rate.md).
    ``error`` is shown as the env summarised it, then the :func:`error_hint` of known errors.
    """
    if previous_code is not None:
        # at most 10 lines: enough for a short body, and a runaway answer is not worth its tokens
        shown = _as_comment(previous_code.replace("import numpy as np\n", "", 1).strip("\n"), max_lines=10)
        what = "This build_model for the task at the end failed"
    else:
        shown = _as_comment(previous_answer, max_lines=10)
        what = "This answer for the task at the end is not a usable build_model function"
    message = _as_comment(error, max_lines=15)
    hint = error_hint(error)
    advice = f"# Hint: {hint}\n" if hint else ""
    return f"{shown}\n# {what}:\n{message}\n{advice}# Fix the problem and write build_model again.\n\n\n{task}"
