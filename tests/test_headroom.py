"""tools/headroom.py: reference pipelines scored by the env equal scikit-learn's own numbers on the env's splits; the
untrained model's summary, the gap and the verdict are what the records say."""

from __future__ import annotations

import gzip
import importlib.util
import json
import sys

import numpy as np
import pytest

from conftest import REPO
from envs.datascience import DataScienceEnv
from envs.datascience.evaluation import get_default_pool

_spec = importlib.util.spec_from_file_location("_tool_headroom", REPO / "tools" / "headroom.py")
headroom = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = headroom  # its dataclasses look their module up there
_spec.loader.exec_module(headroom)


def test_a_reference_scores_what_scikit_learn_scores_on_the_envs_splits():
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    env = DataScienceEnv("iris", n_splits=2, split_seed=3, pool=get_default_pool())
    refs = [r for r in headroom.REFERENCES if r.name in ("lr_scaled", "nb")]
    got = headroom.score_references(env, refs)
    ds = env.dataset
    aucs = []
    for tr, va in env.splits:
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(ds.X[tr], ds.y[tr])
        aucs.append(roc_auc_score(ds.y[va], clf.predict_proba(ds.X[va]), multi_class="ovo", average="macro"))
    assert got["lr_scaled"]["status"] == "ok" and got["lr_scaled"]["auc"] == pytest.approx(np.mean(aucs), abs=1e-9)
    assert got["lr_scaled"]["aucs"] == pytest.approx(aucs, abs=1e-9)
    assert got["nb"]["auc"] is not None and got["nb"]["auc"] != got["lr_scaled"]["auc"]


def test_every_reference_is_a_body_the_env_accepts():
    env = DataScienceEnv("breast_cancer", n_splits=1, pool=get_default_pool())
    for ref in headroom.REFERENCES:
        assert env.evaluate(ref.body)["status"] == "ok", ref.name


def _record(code, reward, status="ok", attempt=1):
    return {"attempt": attempt, "status": status, "reward": reward, "code": code, "text": code}


RF = "import numpy as np\ndef build_model(x_train, y_train):\n    clf = RandomForestClassifier()\n    return clf.fit(x_train, y_train)"
RF_SPACED = RF.replace("clf = RandomForestClassifier()", "clf  =  RandomForestClassifier()  # a forest")
LR = RF.replace("RandomForestClassifier()", "LogisticRegression(C=0.5)")


def test_untrained_summary_groups_answers_up_to_layout_and_finds_the_best():
    records = [_record(RF, 0.70), _record(RF_SPACED, 0.72), _record(LR, 0.75), _record(None, -1.0, "error"),
               _record(RF, 0.71), _record(LR, 0.60, attempt=2)]
    s = headroom.untrained_summary(records)
    assert (s["n"], s["runnable"]) == (5, 4) and s["rate"] == pytest.approx(0.8)
    assert s["most_common"]["count"] == 3 and s["most_common"]["label"] == "RandomForestClassifier()"
    assert s["most_common"]["mean_auc"] == pytest.approx(0.71) and s["most_common"]["max_auc"] == pytest.approx(0.72)
    assert s["mean_auc_runnable"] == pytest.approx(np.mean([0.70, 0.72, 0.75, 0.71]))
    assert s["best_auc"] == pytest.approx(0.75) and "LogisticRegression(C=0.5)" in s["best_code"]
    assert headroom.untrained_summary([_record(None, -1.0, "error")])["best_auc"] is None


def test_the_gap_and_the_verdict():
    refs = {"rf": {"auc": 0.70}, "hgb": {"auc": 0.78}, "svc": {"auc": None}}
    res = {"dataset": "x", "references": refs, "untrained": {"best_auc": 0.75, "runnable": 3, "n": 64}}
    row = headroom.headroom_row(res, min_gap=0.02)
    assert row["best_reference"] == "hgb" and row["gap"] == pytest.approx(0.03) and row["headroom"] == "yes"
    assert headroom.headroom_row({**res, "untrained": {"best_auc": 0.77, "runnable": 3}})["headroom"] == "no"
    assert headroom.headroom_row({**res, "untrained": {"best_auc": None, "runnable": 0}})["headroom"] == \
        "no runnable attempt"
    assert headroom.headroom_row({"dataset": "airlines", "unavailable": "not found"})["headroom"] == "no data"
    md = headroom.table_markdown([res, {"dataset": "airlines", "unavailable": "not found"}])
    assert "| x |" in md and "**0.780**" in md and "no data" in md


def test_earlier_samples_are_reused_only_for_todays_prompt(tmp_path):
    env = DataScienceEnv("iris", n_splits=1, prompt_style="few_shot", pool=get_default_pool())
    digest = headroom.base_rate.prompt_digest(env.prompt)
    path = tmp_path / "s.jsonl.gz"
    with gzip.open(path, "wt") as fh:
        for r in [_record(RF, 0.9), _record(LR, 0.95), _record(LR, 0.5, attempt=2)]:
            fh.write(json.dumps({**r, "prompt_sha256": digest}) + "\n")
    assert [r["reward"] for r in headroom._read_samples(str(path), env.prompt, 64)] == [0.9, 0.95]
    with pytest.raises(SystemExit, match="not sampled from today's task prompt"):
        headroom._read_samples(str(path), env.prompt + " ", 64)


def test_a_missing_dataset_is_named_relative_to_the_data_directory(tmp_path, monkeypatch):
    import envs.datascience.datasets as datasets

    data = tmp_path / "machine" / "shared" / "datasets"
    monkeypatch.setattr(datasets, "data_directories", lambda data_dir=None: [data])
    out, table = tmp_path / "out", tmp_path / "table.md"
    headroom.main(["--datasets", "airlines", "--out-dir", str(out), "--table", str(table)])
    why = json.loads((out / "airlines.json").read_text())["unavailable"]
    assert why.startswith("dataset 'airlines' not found. Looked for: <data dir>/airlines/airlines.csv, ")
    assert str(tmp_path) not in why and len(why) <= 160
    assert f"| airlines | `{why}` |" in table.read_text()  # in code: <data dir> is no HTML tag
