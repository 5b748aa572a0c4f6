"""The data-science environment of ETPO (paper Section 5.1, Eq. 10; docs/method.md, section 13).

State: a Python stub prompt (:mod:`envs.datascience.prompts`). Action: generated text, turned into a
``build_model`` function by :func:`envs.datascience.extract.extract_function`. Reward (Eq. 10): the mean ROC AUC
of the returned model's ``predict_proba`` over ``n_splits`` random 50/50 train/validation splits
(``sklearn.model_selection.train_test_split(test_size=0.5, stratify=y, random_state=s)`` for
``s = split_seed .. split_seed + n_splits - 1``; the reference implementation uses 5 splits, seeds 0..4),
macro one-vs-one for more than two classes; ``-1`` for any failure.

The code runs in a :class:`envs.datascience.evaluation.ModelSandbox` worker that receives ``x_train``,
``y_train`` and the validation *features* only; the AUC is computed here, in the caller's process, so validation
labels never reach the sandbox, nor does any other copy of the data (``sandbox:`` below, :mod:`envs.isolation`).
``GridSearchCV`` is refused before anything runs (as in the reference implementation).

Episode (the paper's): after a failure the next observation is a reflection prompt with the previous code and the
error (``reflection=True``), else the task prompt again; the episode terminates when the code runs and is truncated
after ``max_steps`` steps (T = 5 in the paper; ETPO(1-step) is ``max_steps=1, reflection=False``).
``stop_on_success=False`` goes beyond the paper: code that runs does not end the episode, the next observation
shows its validation AUC with a request to improve on it, and every episode lasts ``max_steps`` steps (each step
rewarded as Eq. 10). ``reflection_layout`` places the feedback (:func:`envs.datascience.prompts.reflection_prompt`):
``task_first`` (the task prompt, the previous attempt, its feedback, the task's block again: every row of a batch
shares the task prompt as its prefix) or ``feedback_first`` (the earlier layout, errors only).

``info`` of every step: ``status`` (``ok`` / ``error`` / ``timeout`` / ``refused`` / ``invalid-output``),
``error`` (str or None), ``auc`` (mean AUC or None), ``aucs`` (per split), ``code`` (the program that was run,
or None), ``steps``, ``stdout`` (tail of the code's output), ``duration`` (s), ``dataset``, ``answer_class`` (the
estimator the code builds, :func:`envs.datascience.extract.answer_class`; any environment may report one, and the
rollout counts the classes of every batch).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import numpy as np

from ..base import EpisodeOverError, TextEnv
from .datasets import TabularDataset, load_dataset
from ..isolation import resolve_isolation
from ..machine_paths import portable_text
from .evaluation import get_default_pool, make_splits, roc_auc
from .extract import NO_CODE, answer_class, extract_function, find_banned
from .prompts import REFLECTION_LAYOUTS, clean_description, reflection_prompt, task_prompt

__all__ = ["DataScienceEnv", "make_splits", "roc_auc", "summarize_error", "FAILURE_REWARD"]

FAILURE_REWARD = -1.0
STATUSES = ("ok", "error", "timeout", "refused", "invalid-output")

# Where Python, its packages and the project are installed must not reach the prompt: an ImportError names the
# module's file ("cannot import name 'X' from 'sklearn.ensemble' (/home/u/proj/.venv/lib/python3.11/site-packages/
# ...)"), so the same mistake would read differently (and cost a different number of tokens) in every clone of the
# project, and a run would record the machine's paths. envs.machine_paths cuts them.


def summarize_error(text: str, max_lines: int = 8, max_chars: int = 800) -> str:
    """Short form of an error for the reflection prompt: the generated code's frames and the exception.

    Of a Python traceback (the last one, if exceptions were chained) this keeps the frames in the generated
    code (``File "<generated>"`` and its source line) - or the innermost frame if none is - and the final
    exception lines, drops library frames and caret markers, then keeps the last ``max_lines`` lines and at
    most ``max_chars`` characters. Other text is just cut the same way. Installation prefixes are cut from file
    paths (``.../site-packages/sklearn/x.py`` -> ``site-packages/sklearn/x.py``) and paths in the project are made
    relative to it (:func:`envs.machine_paths.portable_text`), so the text does not depend on where Python, the
    project's environment or the project lives.
    """
    lines = [line for line in text.rstrip().splitlines() if line.strip()]
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
    if starts:
        body = lines[starts[-1] + 1 :]
        frames: list[list[str]] = []
        exc_lines: list[str] = []
        for line in body:
            if line.startswith("  File "):
                frames.append([line])
            elif line.startswith("    ") and frames and not exc_lines:
                if line.strip().strip("^~ "):  # skip the caret/tilde markers under the code
                    frames[-1].append(line)
            else:
                exc_lines.append(line)
        keep = [f for f in frames if '"<generated>"' in f[0]] or frames[-1:]
        lines = [line for f in keep for line in f] + exc_lines
    short = "\n".join(lines[-max_lines:])
    short = portable_text(short)
    if len(short) > max_chars:
        short = "[...]" + short[-max_chars:]
    return short


@dataclass(frozen=True, eq=False)
class _Task:
    dataset: TabularDataset
    splits: tuple
    n_train: int


@functools.lru_cache(maxsize=64)
def _cached_task(name, data_dir, max_rows, subsample, subsample_seed, download, n_splits, split_seed) -> _Task:
    ds = load_dataset(name, data_dir, max_rows, subsample=subsample, subsample_seed=subsample_seed, download=download)
    return _make_task(ds, n_splits, split_seed)


def _make_task(ds: TabularDataset, n_splits: int, split_seed: int) -> _Task:
    splits = []
    for tr, va in make_splits(ds.y, n_splits, split_seed):
        tr.setflags(write=False)
        va.setflags(write=False)
        splits.append((tr, va))
    return _Task(ds, tuple(splits), len(splits[0][0]))


class DataScienceEnv(TextEnv):
    """Write ``build_model`` for a tabular classification task; reward = mean validation ROC AUC or -1.

    Args:
        dataset: a name accepted by :func:`envs.datascience.datasets.load_dataset`, or a
            :class:`TabularDataset`.
        max_steps: steps per episode before truncation (paper: 5).
        n_splits, split_seed: the validation splits (seeds ``split_seed .. split_seed + n_splits - 1``).
        timeout: wall-clock seconds per split evaluation (a step takes at most ``n_splits * timeout``).
        memory_limit_mb: memory budget of the code per evaluation.
        max_rows, subsample, subsample_seed, data_dir, download: dataset loading (see ``load_dataset``).
        prompt_style: ``"paper"`` (bare stub) or ``"few_shot"`` (``n_few_shot`` worked examples first).
        reflection: after a failure, show the previous code and error (False: show the task prompt again).
        reflection_layout: ``"task_first"`` or ``"feedback_first"`` (see the module docstring).
        stop_on_success: True (the paper): the episode ends when the code runs. False: it goes on to ``max_steps``,
            and after code that ran the next observation shows its validation AUC and asks for a better one
            (whatever ``reflection`` says: it governs what follows a failure).
        pool: a :class:`envs.datascience.evaluation.ModelSandbox`; None uses the process-wide pool for ``sandbox``.
        sandbox: isolation of the generated code: ``"auto"`` (bubblewrap when installed; an error when it is
            installed but cannot start), ``"isolated"`` (bubblewrap or an error) or ``"rlimits"`` (resource limits
            only: the code can read the data files); None = the ``ETPO_SANDBOX`` environment variable, else
            ``"auto"``. Resolved, and one worker started, when the environment is built, so that a sandbox
            that cannot work stops the run before it begins (:class:`envs.isolation.SandboxError`).
        banned: names whose use is refused before running (reference implementation: ``GridSearchCV``).
        seed_estimators: seed numpy's and Python's global random generators with the split's own seed before the
            code runs on that split (True, the default): an estimator whose ``random_state`` is unset
            (``RandomForestClassifier()``) then scores the same AUC every time the same code meets the same split,
            instead of moving by ~0.002 between calls. False: unseeded, as before (docs/method.md, section 13).
        max_description_chars: cap on the dataset description in the prompt.
        max_error_chars, max_error_lines: cap on the error shown in the reflection prompt and in ``info``.

    Datasets, splits and prompts are cached, so constructing many environments on one dataset is cheap.
    """

    # The reward is the code's own score on fixed splits, and the next observation shows the task with this answer
    # and its result only (no earlier attempt): what an answer earns does not depend on where it was written.
    actions_relabel_to_first_state = True

    def __init__(
        self,
        dataset: str | TabularDataset = "breast_cancer",
        max_steps: int = 5,
        n_splits: int = 5,
        split_seed: int = 0,
        timeout: float = 30.0,
        memory_limit_mb: int = 2048,
        max_rows: int | None = 2000,
        prompt_style: str = "paper",
        reflection: bool = True,
        data_dir: str | None = None,
        pool=None,
        *,
        n_few_shot: int = 2,
        banned: tuple[str, ...] | list[str] = ("GridSearchCV",),
        subsample: str = "random",
        subsample_seed: int = 0,
        download: bool | None = None,
        max_description_chars: int = 1200,
        max_error_chars: int = 800,
        max_error_lines: int = 8,
        sandbox: str | None = None,
        reflection_layout: str = "task_first",
        stop_on_success: bool = True,
        seed_estimators: bool = True,
    ):
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        if n_splits < 1:
            raise ValueError(f"n_splits must be >= 1, got {n_splits}")
        if isinstance(dataset, TabularDataset):
            self._task = _make_task(dataset, int(n_splits), int(split_seed))
        else:
            self._task = _cached_task(
                str(dataset), None if data_dir is None else str(data_dir), max_rows, subsample, int(subsample_seed),
                download, int(n_splits), int(split_seed),
            )
        ds = self._task.dataset
        if ds.n_classes < 2:
            raise ValueError(f"dataset {ds.name!r} has fewer than two classes")
        self.max_steps = int(max_steps)
        self.n_splits = int(n_splits)
        self.split_seed = int(split_seed)
        self.timeout = float(timeout)
        self.memory_limit_mb = int(memory_limit_mb)
        self.reflection = bool(reflection)
        if reflection_layout not in REFLECTION_LAYOUTS:
            raise ValueError(f"reflection_layout must be one of {', '.join(REFLECTION_LAYOUTS)}; got "
                             f"{reflection_layout!r}")
        if not stop_on_success and reflection_layout != "task_first":
            raise ValueError("stop_on_success=False needs reflection_layout='task_first' (the feedback_first layout "
                             "shows errors only)")
        self.reflection_layout = reflection_layout
        self.stop_on_success = bool(stop_on_success)
        self.seed_estimators = bool(seed_estimators)
        self.banned = tuple(banned)
        self.max_error_chars = int(max_error_chars)
        self.max_error_lines = int(max_error_lines)
        self.prompt_style = prompt_style
        self.prompt = task_prompt(
            ds.name, clean_description(ds.description, max_description_chars), ds.feature_names, ds.target_name,
            ds.class_names, self._task.n_train, style=prompt_style, n_few_shot=n_few_shot, banned=self.banned,
        )
        if pool is None:
            self.isolation_info = resolve_isolation(sandbox, source="config")
            pool = get_default_pool(self.isolation_info)
        else:
            self.isolation_info = pool.isolation_info
        self._pool = pool
        if not getattr(self._pool, "_checked", True):
            self._pool.check()  # a worker that cannot start is a set-up error: raise now, not on the first step
        self._steps = 0
        self._done = True

    # ------------------------------------------------------------------ properties
    @property
    def dataset(self) -> TabularDataset:
        return self._task.dataset

    @property
    def splits(self) -> tuple:
        """The (train indices, validation indices) pairs used for the reward."""
        return self._task.splits

    @property
    def pool(self):
        return self._pool

    @property
    def isolation(self) -> str:
        """The isolation generated code runs under: ``"isolated"`` or ``"rlimits"``."""
        return self._pool.isolation

    # ------------------------------------------------------------------ gym API
    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[str, dict]:
        # The task is deterministic (fixed splits); the seed is accepted for the Gymnasium signature.
        self._steps = 0
        self._done = False
        return self.prompt, {"status": "reset", "steps": 0, "dataset": self.dataset.name}

    def step(self, action: str) -> tuple[str, float, bool, bool, dict]:
        if self._done:
            raise EpisodeOverError("episode is over (or was never started); call reset() first")
        self._steps += 1
        t0 = time.monotonic()
        result = self.evaluate(action)
        result["steps"] = self._steps
        result["dataset"] = self.dataset.name
        result["duration"] = time.monotonic() - t0
        answer = action if isinstance(action, str) else ""
        if result["status"] == "ok":
            reward, terminated = float(result["auc"]), self.stop_on_success
            obs = self.prompt
            if not terminated:  # the episode goes on after code that ran: show how well it did, ask for better
                obs = reflection_prompt(self.prompt, result["code"], answer, None, auc=reward,
                                        layout=self.reflection_layout)
        else:
            reward, terminated = FAILURE_REWARD, False
            obs = self.prompt
            if self.reflection:
                obs = reflection_prompt(self.prompt, result["code"], answer, result["error"],
                                        layout=self.reflection_layout)
        truncated = not terminated and self._steps >= self.max_steps
        self._done = terminated or truncated
        result["reward"] = reward
        return obs, reward, terminated, truncated, result

    def evaluate(self, action: str) -> dict:
        """Score one action without touching the episode state; returns the ``info`` fields of a step."""
        info = {"status": "ok", "error": None, "auc": None, "aucs": [], "code": None, "stdout": "",
                "answer_class": NO_CODE}
        extraction = extract_function(action)
        if not extraction.ok:
            info.update(status="invalid-output", error=extraction.error)
            return info
        code = extraction.code
        info["code"] = code
        info["answer_class"] = answer_class(code)  # the estimator it builds: what a run's class shares count
        bad = find_banned(code, self.banned)
        if bad is not None:
            info.update(status="refused", error=f"{bad} is not allowed in this task; fit a single model instead")
            return info
        ds = self.dataset
        aucs = []
        for i, (tr, va) in enumerate(self.splits):
            res = self.pool.evaluate(
                code, ds.X[tr], ds.y[tr], ds.X[va], n_classes=ds.n_classes, timeout=self.timeout,
                memory_limit_mb=self.memory_limit_mb, seed=self.split_seed + i if self.seed_estimators else None,
            )
            info["stdout"] = res.stdout
            if res.status != "ok":
                info.update(status=res.status, error=self._short_error(res.error or res.status), aucs=aucs)
                return info
            try:
                aucs.append(roc_auc(ds.y[va], res.proba, ds.n_classes))
            except ValueError as exc:
                info.update(status="error", error=f"could not score predict_proba output: {exc}", aucs=aucs)
                return info
        info.update(auc=float(np.mean(aucs)), aucs=aucs)
        return info

    def _short_error(self, text: str) -> str:
        return summarize_error(text, self.max_error_lines, self.max_error_chars)

    def close(self) -> None:
        # The pool is shared (default pool) or owned by whoever passed it in: nothing to release here.
        self._done = True
