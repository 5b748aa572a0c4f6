"""tools/answer_table.py: the summary of a samples file, counted against a table written by hand."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("_tool_answer_table", REPO / "tools" / "answer_table.py")
tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tool)

FOREST = "\n    from sklearn.ensemble import RandomForestClassifier\n    clf = RandomForestClassifier({})\n" \
         "    clf.fit(x_train, y_train)\n    return clf\n"
LOGREG = "\n    from sklearn.linear_model import LogisticRegression\n    model = LogisticRegression()\n" \
         "    model.fit(x_train, y_train)\n    return model\n"


def _samples() -> list[dict]:
    ok = lambda text, auc: {"status": "ok", "text": text, "reward": auc}  # noqa: E731
    return [ok(FOREST.format(""), 0.8151)] * 3 + [
        ok(LOGREG, 0.9519),
        ok(LOGREG, 0.9519),
        ok(FOREST.format("max_samples=1000"), 0.9843),
        ok(FOREST.format("max_depth=None"), 0.8151),  # the common forest's value: not "above" it
        ok(FOREST.format("max_depth=2"), 0.70),
        {"status": "error", "text": "\n    return Foo()\n", "reward": -1.0},
    ]


def test_summary_counts_as_by_hand():
    s = tool.summarise(_samples())
    assert (s["attempts"], s["runnable"]) == (9, 8)
    assert s["classes"] == {"RandomForestClassifier": 6, "LogisticRegression": 2}
    assert s["best"] == pytest.approx(0.9843)
    assert (s["common"], s["common_auc"]) == ("RandomForestClassifier()", 0.8151)
    assert s["above"] == [("RandomForestClassifier(max_samples=1000)", 0.9843, 1), ("LogisticRegression()", 0.9519, 2)]


def test_files_plain_and_gzipped_give_one_table(tmp_path, capsys):
    rows = _samples()
    plain = tmp_path / "bs_t0.5.jsonl"
    plain.write_text("".join(json.dumps(r) + "\n" for r in rows))
    zipped = tmp_path / "bs_t1.0.jsonl.gz"
    with gzip.open(zipped, "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows[:3] + rows[-1:]))
    tool.main([str(plain), str(zipped)])
    table = capsys.readouterr().out.splitlines()
    assert table[2].startswith("| bs_t0.5 | 9 | 8 |") and "`LogisticRegression()` 0.9519 x 2" in table[2]
    assert table[3].startswith("| bs_t1.0 | 4 | 3 | RandomForestClassifier 3 | 0.8151 |") and table[3].endswith("| none |")


def test_bad_input_is_named(tmp_path):
    with pytest.raises(SystemExit, match="no samples file .*missing.jsonl"):
        tool.main([str(tmp_path / "missing.jsonl")])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"status": "ok", "text": "x", "reward": 0.5}) + "\n{not json\n")
    with pytest.raises(SystemExit, match="bad.jsonl, line 2 is not JSON"):
        tool.main([str(bad)])
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"batch": 1}) + "\n")
    with pytest.raises(SystemExit, match="line 1 has no status/text/reward"):
        tool.main([str(other)])
