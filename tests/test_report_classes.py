"""etpo.report.classes: answer-class shares per batch (from history.jsonl, or parsed from samples) pooled over
seeds, and the probe's readings at the parting token, on a small hand-written benchmark folder."""

from __future__ import annotations

import json

import pytest

from etpo.report.classes import FAILED, choice_series, pooled_shares, run_classes, run_views, write_class_report

FOREST = ("\n    from sklearn.ensemble import RandomForestClassifier\n"
          "    return RandomForestClassifier().fit(x_train, y_train)")
LOGREG = ("\n    from sklearn.linear_model import LogisticRegression\n"
          "    return LogisticRegression().fit(x_train, y_train)")


def _write(run, history=None, samples=None):
    run.mkdir(parents=True)
    if history is not None:
        (run / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    if samples is not None:
        (run / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))


def _choice(batch, pi_forest, pi_logreg):
    def option(tok, pi):
        return {"token": tok, "pi": pi, "pi_ref": 0.3, "pi_optimal": 1 - pi, "q": pi}

    return {"batch": batch, "frequent": "RandomForestClassifier", "best": "LogisticRegression",
            "classes": {"RandomForestClassifier": {"runnable": True, "reward": 0.8},
                        "LogisticRegression": {"runnable": True, "reward": 0.95}},
            "choices": [{"position": 11, "context": "Classifier\n   ", "options": {
                "RandomForestClassifier": option(" clf", pi_forest),
                "LogisticRegression": option(" from", pi_logreg)}}]}


def test_class_shares_and_choice_readings(tmp_path):
    root = tmp_path / "bench" / "runs" / "etpo" / "balance_scale"
    # seed 0 recorded its classes (and the probe's readings); seed 1 is an older run with samples only
    _write(root / "seed0", history=[
        {"batch": 1, "classes": {"RandomForestClassifier": {"n": 2, "runnable": 1, "mean_reward": -0.1},
                                 "LogisticRegression": {"n": 1, "runnable": 1, "mean_reward": 0.95}},
         "choice": _choice(1, 0.4, 0.3)},
        {"batch": 2, "classes": {"RandomForestClassifier": {"n": 3, "runnable": 3, "mean_reward": 0.8}},
         "choice": _choice(2, 0.7, 0.1)}])
    _write(root / "seed1", history=[{"batch": 1}, {"batch": 2}], samples=[
        {"batch": 1, "status": "ok", "text": LOGREG}, {"batch": 1, "status": "error", "text": LOGREG},
        {"batch": 1, "status": "ok", "text": FOREST}, {"batch": 2, "status": "ok", "text": FOREST},
        {"batch": 2, "status": "ok", "text": FOREST}, {"batch": 2, "status": "invalid-output", "text": "no"}])
    assert run_classes(root / "seed1")[0] == {"LogisticRegression": 1, FAILED: 1, "RandomForestClassifier": 1}
    names, shares = pooled_shares([root / "seed0", root / "seed1"])
    assert names == ["RandomForestClassifier", "LogisticRegression", FAILED]
    # batch 1: forest 1 + 1, logistic regression 1 + 1, failed 1 + 1 of 6 answers; batch 2: forest 3 + 2 of 6
    assert shares[0] == pytest.approx({"RandomForestClassifier": 2 / 6, "LogisticRegression": 2 / 6, FAILED: 2 / 6})
    assert shares[1] == pytest.approx({"RandomForestClassifier": 5 / 6, "LogisticRegression": 0.0, FAILED: 1 / 6})
    series = choice_series(root / "seed0")
    assert series["tokens"] == (" clf", " from") and series["batches"] == [1, 2]
    assert series["pi"] == ([0.4, 0.7], [0.3, 0.1])
    assert series["pi_optimal"][0] == pytest.approx([0.6, 0.3])
    assert series["pi_optimal"][1] == pytest.approx([0.7, 0.9])
    assert choice_series(root / "seed1") is None
    written = write_class_report(tmp_path / "bench", "balance_scale", tmp_path / "out")
    assert [p.name for p in written] == ["class_shares_balance_scale.png", "choice_balance_scale.png",
                                         "classes_balance_scale.md"]
    table = (tmp_path / "out" / "classes_balance_scale.md").read_text()
    assert "| 1 | 0.33 | 0.33 | 0.00 | 0.33 |" in table and "' clf' / ' from' | 2 | 0.700 / 0.100" in table


def test_choice_figure_wraps_many_runs_into_rows(tmp_path):
    """A folder of tens of runs draws its choice panels CHOICE_PANELS_PER_ROW a row (one row of 14 was unreadable)."""
    from PIL import Image

    from etpo.report.classes import CHOICE_PANELS_PER_ROW

    def figure_size(n_runs, name):
        root = tmp_path / name / "runs" / "etpo" / "balance_scale"
        for seed in range(n_runs):
            _write(root / f"seed{seed}", history=[
                {"batch": 1, "classes": {"RandomForestClassifier": {"n": 1, "runnable": 1, "mean_reward": 0.8}},
                 "choice": _choice(1, 0.4, 0.3)}])
        write_class_report(tmp_path / name, "balance_scale", tmp_path / name / "out")
        return Image.open(tmp_path / name / "out" / "choice_balance_scale.png").size

    one_row = figure_size(CHOICE_PANELS_PER_ROW, "one")
    three_rows = figure_size(2 * CHOICE_PANELS_PER_ROW + 1, "three")
    assert three_rows[0] == one_row[0]                       # no wider than a full row
    assert three_rows[1] == pytest.approx(3 * one_row[1], rel=0.05)


def test_a_run_with_reference_rows_is_counted_per_view(tmp_path):
    """Samples that name their view (ETPO's reference_rows) are counted per view, the policy's rows apart from the
    reference's -- the history's pooled classes would mix them -- and the report draws one panel per view."""
    root = tmp_path / "bench" / "runs" / "etpo_ref" / "balance_scale"
    pooled = {"RandomForestClassifier": {"n": 3, "runnable": 2, "mean_reward": 0.3}}
    _write(root / "seed0", history=[{"batch": 1, "classes": pooled}], samples=[
        {"batch": 1, "status": "ok", "text": FOREST, "view": "policy"},
        {"batch": 1, "status": "ok", "text": FOREST, "view": "policy"},
        {"batch": 1, "status": "ok", "text": LOGREG, "view": "reference"},
        {"batch": 1, "status": "error", "text": FOREST, "view": "reference"}])
    run = root / "seed0"
    assert run_views(run) == ["policy", "reference"]
    assert run_classes(run, "policy") == [{"RandomForestClassifier": 2}]
    assert run_classes(run, "reference") == [{"LogisticRegression": 1, FAILED: 1}]
    assert run_classes(run) == [{"RandomForestClassifier": 2, FAILED: 1}]  # the history's, as recorded
    _write(tmp_path / "bench" / "runs" / "etpo" / "balance_scale" / "seed0",
           samples=[{"batch": 1, "status": "ok", "text": LOGREG}])
    assert run_views(tmp_path / "bench" / "runs" / "etpo" / "balance_scale" / "seed0") == ["policy"]
    write_class_report(tmp_path / "bench", "balance_scale", tmp_path / "out")
    table = (tmp_path / "out" / "classes_balance_scale.md").read_text()
    assert "## etpo (1 seeds)" in table
    assert "## etpo_ref, policy rows (1 seeds)" in table and "## etpo_ref, reference rows (1 seeds)" in table


def test_a_class_keeps_its_colour_in_every_panel(tmp_path):
    """Two contenders that rank the classes differently (the trained one mostly logistic regressions, the untrained
    one mostly forests): each class is drawn in one colour in both panels, distinct classes in distinct colours."""
    from etpo.report.classes import class_colors

    colors = class_colors([["LogisticRegression", "RandomForestClassifier"],
                           ["RandomForestClassifier", "KNeighborsClassifier", "LogisticRegression"]])
    assert list(colors) == ["LogisticRegression", "RandomForestClassifier", "KNeighborsClassifier"]
    assert len(set(colors.values())) == 3
    for contender, texts in (("etpo", [LOGREG, LOGREG, FOREST]), ("reflection", [FOREST, FOREST, LOGREG])):
        _write(tmp_path / "bench" / "runs" / contender / "balance_scale" / "seed0", history=[{"batch": 1}],
               samples=[{"batch": 1, "status": "ok", "text": t} for t in texts])
    assert [p.name for p in write_class_report(tmp_path / "bench", "balance_scale", tmp_path / "out")] == [
        "class_shares_balance_scale.png", "classes_balance_scale.md"]


def test_by_arguments_a_better_argument_of_the_common_class_shows(tmp_path):
    """tic_tac_toe's better answer is an argument of the common class (max_samples=1000): by class every answer is a
    forest; by configuration the argued forests are counted apart, from the samples even where the history recorded
    the classes, and the files are named apart from the class report's."""
    argued = FOREST.replace("RandomForestClassifier()", "RandomForestClassifier(random_state=0, max_samples=1000)")
    root = tmp_path / "bench" / "runs" / "etpo" / "tic_tac_toe"
    recorded = {"RandomForestClassifier": {"n": 3, "runnable": 3, "mean_reward": 0.98}}
    _write(root / "seed0", history=[{"batch": 1, "classes": recorded}, {"batch": 2, "classes": recorded}], samples=[
        {"batch": 1, "status": "ok", "text": argued}, {"batch": 1, "status": "ok", "text": FOREST},
        {"batch": 1, "status": "ok", "text": FOREST}, {"batch": 2, "status": "ok", "text": FOREST},
        {"batch": 2, "status": "ok", "text": FOREST}, {"batch": 2, "status": "error", "text": argued}])
    assert run_classes(root / "seed0") == [{"RandomForestClassifier": 3}] * 2  # the history's classes
    configured = "RandomForestClassifier(max_samples=1000, random_state=0)"
    assert run_classes(root / "seed0", arguments=True) == [
        {"RandomForestClassifier()": 2, configured: 1}, {"RandomForestClassifier()": 2, FAILED: 1}]
    names, shares = pooled_shares([root / "seed0"], arguments=True)
    assert names == ["RandomForestClassifier()", configured, FAILED]
    assert shares[0] == pytest.approx({"RandomForestClassifier()": 2 / 3, configured: 1 / 3, FAILED: 0.0})
    written = write_class_report(tmp_path / "bench", "tic_tac_toe", tmp_path / "out", arguments=True)
    assert [p.name for p in written] == ["class_shares_tic_tac_toe_arguments.png", "classes_tic_tac_toe_arguments.md"]
    table = written[-1].read_text()
    assert table.startswith("# Answer configurations (class and constructor arguments) on tic_tac_toe")
    assert f"| batch | RandomForestClassifier() | {configured} | other runnable | failed |" in table
    assert "| 1 | 0.67 | 0.33 | 0.00 | 0.00 |" in table and "| 2 | 0.67 | 0.00 | 0.00 | 0.33 |" in table
