"""Runs inside the sandbox: ``model = build_model(x_train, y_train)``; returns ``model.predict_proba(x_val)``.

This file is the *runner* of the data-science task (:data:`envs.datascience.evaluation.MODEL_TASK`). The sandbox
worker (:mod:`envs.isolation.worker`) loads it by path inside bubblewrap, where no package of ours is importable:
it may import only the standard library and numpy. It runs in the forked, resource-limited, seccomp-filtered
job child, one fresh child per job. Validation *labels* never reach it: the caller scores the returned
probabilities.
"""

from __future__ import annotations

import linecache

GENERATED = "<generated>"


def run(code: str, inputs: dict, params: dict):
    """Execute ``code``, call ``params['function']`` (default ``build_model``) and return its ``predict_proba``.

    ``params['seed']`` (an int, or absent/None): seeds numpy's global generator and Python's ``random`` before the
    code runs, so that an estimator whose ``random_state`` is left unset (``RandomForestClassifier()`` draws from
    numpy's global generator) draws the same numbers on every call: the same code scores the same AUC on the same
    split (docs/method.md, section 13). Generators the code seeds itself, or creates from OS entropy
    (``np.random.default_rng()``), are its own business."""
    import random

    import numpy as np

    seed = params.get("seed")
    if seed is not None:
        np.random.seed(int(seed) % 2**32)
        random.seed(int(seed))
    linecache.cache[GENERATED] = (len(code), None, code.splitlines(True), GENERATED)
    namespace = {"__name__": "__generated__", "__builtins__": __builtins__, "np": np}
    exec(compile(code, GENERATED, "exec"), namespace)
    name = params.get("function", "build_model")
    build_model = namespace.get(name)
    if not callable(build_model):
        raise NameError(f"the code does not define a function {name}(x_train, y_train)")
    model = build_model(inputs["x_train"], inputs["y_train"])
    if model is None:
        raise TypeError(f"{name} returned None; it must return a fitted model with predict_proba")
    predict_proba = getattr(model, "predict_proba", None)
    if not callable(predict_proba):
        raise TypeError(f"{name} returned a {type(model).__name__} object without a predict_proba method")
    proba = np.asarray(predict_proba(inputs["x_val"]))
    if proba.dtype.kind not in "biuf":
        raise TypeError(f"predict_proba returned an array of dtype {proba.dtype}, not numbers")
    return proba
