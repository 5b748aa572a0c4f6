"""envs.machine_paths: installation prefixes, data directories and checkouts of the project are cut from text where a
path starts, and nowhere else; summarize_error (what a run records) cuts this checkout's paths too."""

from __future__ import annotations

import pytest

from envs.datascience.env import summarize_error
from envs.machine_paths import PROJECT_ROOT, MachinePaths, portable_text

MACHINE = MachinePaths(checkouts=["/home/u/etpo", "/srv/clone"], data_dirs=["/data/shared/datasets"])


@pytest.mark.parametrize("text, portable", [
    ("from 'sklearn.ensemble' (/home/u/etpo/.venv/lib/python3.11/site-packages/sklearn/ensemble/__init__.py)",
     "from 'sklearn.ensemble' (site-packages/sklearn/ensemble/__init__.py)"),
    ('File "/usr/lib/python3.12/json/decoder.py", line 3', 'File "python3.12/json/decoder.py", line 3'),
    ("Looked for: /data/shared/datasets/airlines/airlines.csv, /data/shared/datasets/air",
     "Looked for: <data dir>/airlines/airlines.csv, <data dir>/air"),
    ("data_dir: /data/shared/datasets", "data_dir: <data dir>"),
    ("run_dir: /home/u/etpo/runs/benchmark/x/seed0", "run_dir: runs/benchmark/x/seed0"),
    ('{"gguf_cache_dir": "/srv/clone/runs/.model_cache"}', '{"gguf_cache_dir": "runs/.model_cache"}'),
    ("etpo,tic_tac_toe,0,/home/u/etpo/runs/x/seed0", "etpo,tic_tac_toe,0,runs/x/seed0"),
    ("cwd (/home/u/etpo) and /home/u/etpo/", "cwd (.) and ./"),
])
def test_machine_paths_are_cut_where_a_path_starts(text, portable):
    assert MACHINE.portable_text(text) == portable


@pytest.mark.parametrize("text", [
    "/home/u/etpo2/runs/x",          # another folder that merely starts with the checkout's name
    "/home/u/etpo-old/runs/x",
    "backup/home/u/etpo/runs/x",     # a relative path that contains it
    "ValueError: data/python3.11/x and my-site-packages/y",
    "RandomForestClassifier(n_estimators=100)",
])
def test_text_that_only_resembles_a_machine_path_is_left_alone(text):
    assert MACHINE.portable_text(text) == text


def test_a_data_directory_inside_the_project_stays_a_data_directory():
    machine = MachinePaths(checkouts=["/home/u/etpo"], data_dirs=["/home/u/etpo/data"])
    text = "/home/u/etpo/data/cmc/cmc.csv and /home/u/etpo/runs"
    assert machine.portable_text(text) == "<data dir>/cmc/cmc.csv and runs"


def test_every_string_of_a_json_value_is_cut_keys_included_and_nothing_else_changes():
    value = {"options": {"data_dir": "/data/shared/datasets", "n": 64, "rate": 0.078125, "quiet": None},
             "top_errors": [["ImportError: ... (/srv/clone/.venv/lib/python3.11/site-packages/sklearn/svm/__...", 2]],
             "/home/u/etpo/runs/a": True}
    assert MACHINE.portable_value(value) == {
        "options": {"data_dir": "<data dir>", "n": 64, "rate": 0.078125, "quiet": None},
        "top_errors": [["ImportError: ... (site-packages/sklearn/svm/__...", 2]],
        "runs/a": True}


def test_the_error_a_run_records_names_no_path_of_this_checkout():
    traceback = ("Traceback (most recent call last):\n"
                 f'  File "{PROJECT_ROOT}/envs/datascience/_model_runner.py", line 40, in main\n'
                 "    model = build_model(x_train, y_train)\n"
                 f"OSError: cannot write {PROJECT_ROOT}/runs/model.bin")
    short = summarize_error(traceback)
    assert str(PROJECT_ROOT) not in short
    assert 'File "envs/datascience/_model_runner.py", line 40' in short and short.endswith("write runs/model.bin")
    assert portable_text(str(PROJECT_ROOT / "tools" / "keep_runs.py")) == "tools/keep_runs.py"
