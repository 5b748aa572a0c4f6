"""Copy a benchmark's runs -- what a report and a reader need, not the checkpoints -- into a folder to commit.

    python tools/keep_runs.py runs/benchmark/learning_v2 docs/results/learning_v2

For every run directory ``<src>/runs/<contender>/<dataset>/seed<k>`` whose ``summary.json`` says ``finished``, copies
``config.yaml``, ``summary.json``, ``history.jsonl``, ``best_code.py`` and ``samples.jsonl`` (gzipped: every action,
its reward and error) to the same place under ``<dst>/runs/``. The copy is itself a benchmark folder:
``python -m etpo.report <dst>`` redraws its tables and plots. Unfinished runs are listed and left out (a benchmark is
resumable: copy again when it has gone on); files already kept are overwritten by the newer ones.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
from pathlib import Path

KEPT = ("config.yaml", "summary.json", "history.jsonl", "best_code.py")


def keep_runs(src: Path, dst: Path) -> tuple[list[Path], list[Path]]:
    """Returns (kept run directories, unfinished run directories), both relative to ``src/runs``."""
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
        if (run / "samples.jsonl").is_file():
            with open(run / "samples.jsonl", "rb") as fin, gzip.GzipFile(out / "samples.jsonl.gz", "wb",
                                                                         mtime=0) as fout:
                shutil.copyfileobj(fin, fout)
        kept.append(rel)
    return kept, unfinished


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path, help="the benchmark's folder (its `out:`)")
    parser.add_argument("dst", type=Path, help="where to keep the runs (e.g. docs/results/<name>)")
    args = parser.parse_args(argv)
    kept, unfinished = keep_runs(args.src, args.dst)
    print(f"kept {len(kept)} finished runs in {args.dst / 'runs'}")
    for rel in unfinished:
        print(f"  not finished, left out: {rel}", file=sys.stderr)


if __name__ == "__main__":
    main()
