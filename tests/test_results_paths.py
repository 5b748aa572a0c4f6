"""docs/results names no path of the machine a run was made on: every text file under it, and every gzipped one
decompressed, is free of absolute paths of the kinds a machine has (/work/, /home/, /root/, /tmp/, /usr/ ...) and of
this machine's own (the project root, the interpreter's prefixes, the home and data directories). Paths there are
relative to the project (tools/keep_runs.py) or to the data directory (``<data dir>/...``)."""

from __future__ import annotations

import gzip
import os
import re
import sys
from pathlib import Path

import pytest

from conftest import REPO
from envs.datascience.datasets import data_directories

RESULTS = REPO / "docs" / "results"
IMAGES = (".png", ".jpg", ".jpeg", ".gif", ".pdf")
_START = r"(?<![\w.~+@%/\-])"  # where a path starts: not inside a word, a relative path or a URL
MACHINE_KINDS = re.compile(_START + r"/(?:work|home|root|tmp|usr|Users|mnt|scratch|opt|srv|var|private)/[^\s\"'`),]*")
ALLOWED = {"/usr/bin/time"}  # a command named in prose (learning_v2.md), the same on every machine


def this_machine() -> list[str]:
    """This machine's own folders, wherever they lie (two levels deep at least: /usr itself is a kind above)."""
    folders = {REPO, Path(os.path.realpath(REPO)), Path(sys.prefix), Path(sys.base_prefix), Path.home(),
               *data_directories()}
    return sorted({str(f) for f in folders if len(f.parts) > 2})


def machine_paths_in(text: str, own: list[str]) -> list[str]:
    """The absolute machine paths ``text`` holds (``own``: this machine's folders, see :func:`this_machine`)."""
    found = {m.start(): m.group(0) for m in MACHINE_KINDS.finditer(text) if m.group(0) not in ALLOWED}
    for folder in own:
        found.update((m.start(), m.group(0))
                     for m in re.finditer(_START + re.escape(folder) + r"(?![\w.~+@%\-])[^\s\"'`),]*", text))
    return [found[start] for start in sorted(found)]


def _texts(root: Path):
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.name.lower().endswith(IMAGES):
            raw = path.read_bytes()
            yield path, (gzip.decompress(raw) if path.suffix == ".gz" else raw).decode("utf-8", errors="replace")


def test_docs_results_name_no_path_of_a_machine():
    own = this_machine()
    found = []
    for path, text in _texts(RESULTS):
        if MACHINE_KINDS.search(text) or any(folder in text for folder in own):
            found += [f"{path.relative_to(REPO)}: {hit}" for hit in machine_paths_in(text, own)]
    assert not found, (f"{len(found)} machine paths under docs/results (keep runs with tools/keep_runs.py; "
                       "`python tools/keep_runs.py --fix-paths <folder>` fixes kept ones):\n" + "\n".join(found[:20]))


@pytest.mark.parametrize("text, hits", [
    ("(/work/main/.venv/lib/python3.11/site-packages/sklearn/x.py)", 1),
    ("run_dir: /tmp/qs/probeD", 1),
    ("etpo,breast_w,0,/home/u/etpo/runs/x/seed0", 1),
    (f"a file at {REPO}/runs/x", 1),
    ("(site-packages/sklearn/x.py) and docs/results/learning_v2/runs/etpo/x/seed0", 0),
    ("<data dir>/airlines/airlines.csv and https://github.com/home/work/x", 0),
    ("`make quickstart` run alone (`/usr/bin/time -v`)", 0),
])
def test_the_check_finds_machine_paths_and_only_those(text, hits):
    assert len(machine_paths_in(text, [str(REPO)])) == hits
