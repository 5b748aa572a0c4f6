"""Copy a benchmark's runs -- what a report and a reader need, not the checkpoints -- into a folder to commit.

    python tools/keep_runs.py runs/benchmark/learning_v2 docs/results/learning_v2
    python tools/keep_runs.py --fix-paths docs/results/learning_v2 docs/results/base_rate.jsonl

For every run directory ``<src>/runs/<contender>/<dataset>/seed<k>`` whose ``summary.json`` says ``finished``, copies
``config.yaml``, ``summary.json``, ``history.jsonl``, ``best_code.py`` and ``samples.jsonl`` (gzipped: every action,
its reward and error) to the same place under ``<dst>/runs/``. The copy is itself a benchmark folder:
``python -m etpo.report <dst>`` redraws its tables and plots. Unfinished runs are listed and left out (a benchmark is
resumable: copy again when it has gone on); files already kept are overwritten by the newer ones.

What is kept names no path of the machine the runs were made on. In ``config.yaml`` the run's own folder -- the
value of ``run_dir`` and every value at or below it (the logger's ``save_dir``, the trainer's ``default_root_dir``)
-- becomes the folder the run is kept in, relative to the project root (e.g.
``docs/results/learning_v2/runs/etpo/balance_scale/seed0``). In every kept file installation prefixes are cut, paths
in the project made relative to it and paths in a data directory relative to that (``<data dir>/...``), as
:class:`envs.machine_paths.MachinePaths` does.

``--fix-paths PATH ...`` does the same to files kept before: each ``config.yaml`` below the folders given names the
folder it lies in, and each data file (``.json``, ``.jsonl``, ``.jsonl.gz``, ``.csv``, ``best_code.py``) is cut the
same way; a ``runs.csv`` whose ``run_dir`` is an absolute path names the kept copy of that run next to it where there
is one. ``--checkout DIR`` names another clone of the project the files were written in (its paths become
project-relative too). Only the path text changes: JSON is written back in the layout it had (a file in another
layout is named and left as it is), and a file is written only when it changes.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Iterable, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from envs.datascience.datasets import data_directories  # noqa: E402
from envs.machine_paths import MachinePaths  # noqa: E402

__all__ = ["KEPT", "keep_runs", "fix_paths", "machine_paths", "relocated_config", "portable_file", "main"]

KEPT = ("config.yaml", "summary.json", "history.jsonl", "best_code.py")
_JSON_INDENTS = (None, 1, 2, 4)  # jsonl lines and one-line JSON; the tools' result files; etpo.fit's summary.json
_TOP_LEVEL_RUN_DIR = re.compile(r"""^run_dir:[ \t]*(['"]?)(.+?)\1[ \t]*$""", re.M)


def machine_paths(project_root: Path = REPO, checkouts: Iterable[Path] = (), data_dir: Optional[Path] = None
                  ) -> MachinePaths:
    """This machine's paths to cut: the project root and ``checkouts`` (other clones), the data directories."""
    return MachinePaths(checkouts=(project_root, *checkouts), data_dirs=data_directories(data_dir))


def _project_relative(path: Path, project_root: Path) -> str:
    """``path`` relative to the project root (POSIX form) when it lies inside it, else absolute."""
    absolute = Path(os.path.abspath(path))
    try:
        return absolute.relative_to(os.path.abspath(project_root)).as_posix()
    except ValueError:
        return str(absolute)


def relocated_config(text: str, location: str) -> str:
    """A run's ``config.yaml`` naming ``location`` as the run's folder: the value of the top-level ``run_dir`` and
    every value at or below it (``save_dir``, ``default_root_dir``, ...) start with ``location`` instead."""
    found = _TOP_LEVEL_RUN_DIR.search(text)
    if found is None or found.group(2) in ("null", "~"):
        return text
    old = found.group(2).rstrip("/")
    value = re.compile(r"""((?::|^[ \t]*-)[ \t]+(['"]?))""" + re.escape(old) + r"""(?=(?:/[^\n'"]*)?\2[ \t]*$)""",
                       re.M)
    return value.sub(lambda m: m.group(1) + location, text)


def _json_indent(value, text: str, where: str):
    """The ``indent`` json.dumps wrote ``text`` with; SystemExit when none does (rewriting would change its layout,
    perhaps its numbers)."""
    for indent in _JSON_INDENTS:
        if json.dumps(value, indent=indent) == text:
            return indent
    raise SystemExit(f"keep_runs: {where} is not in a layout json.dumps writes; its paths are left as they are "
                     "(rewrite it by hand)")


def _portable_json(text: str, machine: MachinePaths, where: str) -> str:
    body = text.rstrip("\n")
    if not machine.may_hold(body):
        return text
    try:
        value = json.loads(body)
    except json.JSONDecodeError as err:
        raise SystemExit(f"keep_runs: {where} is not JSON ({err}); its paths are left as they are") from None
    portable = machine.portable_value(value)
    if portable == value:
        return text
    return json.dumps(portable, indent=_json_indent(value, body, where)) + text[len(body):]


def _portable_jsonl(text: str, machine: MachinePaths, where: str) -> str:
    lines = text.split("\n")
    for number, line in enumerate(lines, 1):
        if line.strip() and machine.may_hold(line):
            lines[number - 1] = _portable_json(line, machine, f"{where}:{number}")
    return "\n".join(lines)


def _relocated_runs_csv(text: str, folder: Path, project_root: Path) -> str:
    """A report's ``runs.csv``: a ``run_dir`` that is an absolute path names the kept copy of the run in ``folder``
    (``runs/<contender>/<dataset>/seed<k>``) where there is one."""
    lines = text.split("\n")
    header = next(csv.reader(lines[:1]), [])
    if not {"contender", "dataset", "seed", "run_dir"} <= set(header):
        return text
    for number, line in enumerate(lines[1:], 1):
        row = dict(zip(header, next(csv.reader([line]), [])))
        kept = folder / "runs" / row.get("contender", "") / row.get("dataset", "") / f"seed{row.get('seed', '')}"
        old = row.get("run_dir", "")
        if old.startswith("/") and line.count(old) == 1 and kept.is_dir():
            lines[number] = line.replace(old, _project_relative(kept, project_root))
    return "\n".join(lines)


def _is_rewritten(path: Path) -> bool:
    """Whether ``path`` is a kept file whose paths are rewritten (the others: figures, hand-written notes, logs)."""
    name = path.name
    return name in ("config.yaml", "best_code.py") or name.endswith((".jsonl", ".jsonl.gz", ".json", ".csv"))


def _portable_text_of(path: Path, text: str, machine: MachinePaths, project_root: Path) -> str:
    """``text`` (the content of the kept file ``path``, :func:`_is_rewritten`) without machine paths."""
    name = path.name
    if name == "config.yaml":
        text = relocated_config(text, _project_relative(path.parent, project_root))
        return machine.portable_text(text)
    if name.endswith(".jsonl") or name.endswith(".jsonl.gz"):
        return _portable_jsonl(text, machine, str(path))
    if name.endswith(".json"):
        return _portable_json(text, machine, str(path))
    if name.endswith(".csv"):
        return machine.portable_text(_relocated_runs_csv(text, path.parent, project_root))
    return machine.portable_text(text)  # best_code.py


def _write_gzip(path: Path, text: str) -> None:
    with gzip.GzipFile(path, "wb", mtime=0) as fout:  # no time stamp: the same content gives the same bytes
        fout.write(text.encode("utf-8"))


def portable_file(path: Path, machine: MachinePaths, project_root: Path = REPO) -> bool:
    """Rewrite the kept file ``path`` without machine paths (module docstring); True when it changed."""
    if not _is_rewritten(path):
        return False
    packed = path.name.endswith(".gz")
    raw = gzip.decompress(path.read_bytes()) if packed else path.read_bytes()
    text = raw.decode("utf-8")
    portable = _portable_text_of(path, text, machine, project_root)
    if portable == text:
        return False
    if packed:
        _write_gzip(path, portable)
    else:
        path.write_text(portable, encoding="utf-8")
    return True


def fix_paths(targets: Sequence[Path], machine: MachinePaths, project_root: Path = REPO) -> list[Path]:
    """:func:`portable_file` on every file given and every file below the folders given; returns the files changed."""
    changed = []
    for target in targets:
        if not target.exists():
            raise SystemExit(f"keep_runs --fix-paths: {target} does not exist")
        files = sorted(p for p in target.rglob("*") if p.is_file()) if target.is_dir() else [target]
        changed += [p for p in files if portable_file(p, machine, project_root)]
    return changed


def keep_runs(src: Path, dst: Path, machine: Optional[MachinePaths] = None, project_root: Path = REPO
              ) -> tuple[list[Path], list[Path]]:
    """Returns (kept run directories, unfinished run directories), both relative to ``src/runs``."""
    machine = machine or machine_paths(project_root)
    root = src / "runs"
    if not root.is_dir():
        raise SystemExit(f"keep_runs: {root} does not exist: give the benchmark's folder (its `out:`), e.g. "
                         "runs/benchmark/learning_v2")
    kept, unfinished = [], []
    for summary in sorted(root.glob("*/*/seed*/summary.json")):
        run = summary.parent
        rel = run.relative_to(root)
        try:
            finished = json.loads(summary.read_text()).get("finished") is True
        except json.JSONDecodeError:
            finished = False
        if not finished:
            unfinished.append(rel)
            continue
        out = dst / "runs" / rel
        out.mkdir(parents=True, exist_ok=True)
        for name in KEPT:
            if (run / name).is_file():
                shutil.copyfile(run / name, out / name)
                portable_file(out / name, machine, project_root)
        if (run / "samples.jsonl").is_file():
            samples = out / "samples.jsonl.gz"
            text = (run / "samples.jsonl").read_text(encoding="utf-8")
            _write_gzip(samples, _portable_text_of(samples, text, machine, project_root))
        kept.append(rel)
    return kept, unfinished


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path, nargs="?", help="the benchmark's folder (its `out:`)")
    parser.add_argument("dst", type=Path, nargs="?", help="where to keep the runs (e.g. docs/results/<name>)")
    parser.add_argument("--fix-paths", type=Path, nargs="+", metavar="PATH",
                        help="instead of copying: take machine paths out of files kept before (folders or files)")
    parser.add_argument("--checkout", type=Path, action="append", default=[], metavar="DIR",
                        help="another clone of the project the files were written in (repeatable)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="a data directory besides ETPO_DATA_DIR and the project's shared/datasets")
    args = parser.parse_args(argv)
    machine = machine_paths(REPO, args.checkout, args.data_dir)
    if args.fix_paths:
        if args.src is not None:
            parser.error("give either SRC DST (copy runs) or --fix-paths PATH ... (fix kept files), not both")
        changed = fix_paths(args.fix_paths, machine)
        print(f"rewrote {len(changed)} files without machine paths")
        for path in changed:
            print(f"  {path}")
        return
    if args.src is None or args.dst is None:
        parser.error("give SRC DST (the benchmark's folder and where to keep its runs), or --fix-paths PATH ...")
    kept, unfinished = keep_runs(args.src, args.dst, machine)
    print(f"kept {len(kept)} finished runs in {args.dst / 'runs'}")
    for rel in unfinished:
        print(f"  not finished, left out: {rel}", file=sys.stderr)


if __name__ == "__main__":
    main()
