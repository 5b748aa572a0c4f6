"""Benchmark report from a folder of run summaries: ``python -m etpo.report <folder> --out <dir>``.

Reads every ``summary.json`` below ``<folder>`` (format: docs/architecture.md, "Run directory") and writes into
``<dir>``:

* ``table.md`` / ``table.csv`` -- Table 2 of the paper: one row per dataset plus an ``average`` row, one column per
  contender; a cell is the best reward explored within N environment steps, mean ± std over seeds;
* ``runs.csv`` -- one line per run (contender, dataset, seed, best reward, env steps, finished, its learning values,
  its mean seconds per batch of generation / environment / update, run dir);
* ``learning.md`` -- per dataset and contender: the first batch against the last ``--last_fraction`` of the batches
  (runnable fraction, average reward, mean AUC of the runnable answers), mean ± std over seeds;
* ``comparison.md`` -- ETPO against each contender (:mod:`etpo.report.compare`): per dataset and over all datasets
  the best reward within N, the last-fraction average reward and mean AUC of runnable answers as mean ± s.e. over
  seeds, then the paired differences ETPO − contender (runs paired by (dataset, seed)) with their s.e. and a 95 %
  paired bootstrap interval (``--n_boot`` resamples, scipy);
* ``settings.md`` -- whether each contender's runs share their settings (:mod:`etpo.report.settings`: every run's
  saved ``config.yaml`` against the contender's first run's, apart from dataset, split, seeds and run location); a
  contender whose runs differ is also named on stderr;
* ``best_within.png`` -- Figure 3: best reward explored within n steps vs. n, one line per contender (mean over
  seeds of the per-seed average over datasets, band = ± one std over seeds, or with ``--band se`` ± one standard
  error); ``best_within_per_dataset.png`` the same curve per dataset;
* ``batch_reward.png`` -- Figure 4: the average reward of each rollout batch during training (non-runnable code
  counts as -1), one panel per dataset plus an "average" panel, mean ± std (or s.e.) over seeds;
  ``batch_runnable.png`` the same for the runnable fraction;
* ``batch_quality.png`` -- the mean reward of each batch's runnable answers (mean validation AUC; a gap where none
  ran), on the data's scale, mean ± s.e. over seeds;
* ``timing.png`` -- per contender the mean seconds per batch of generation / environment / update, stacked (only
  when the summaries record ``batch_timing``).

Older summaries without the per-batch quality / timing series give empty cells and no such figures.

Statistics (numpy throughout):

* **std** is the sample standard deviation over seeds, ``ddof=1`` by default (``--ddof 0`` for the population
  std); a cell with a single seed shows no std;
* **average row**: for every seed, the mean over the table's datasets of that seed's best rewards (the seeds share
  their train/validation splits across contenders, so seed k is one repetition of the whole benchmark); then mean
  ± std over the seeds for which *every* dataset has a result. With no such seed the cell stays empty (``—``);
* **best within N**: with ``--within N`` the best reward of a run at its last rollout batch that ended at most N
  environment steps into the run (batch granularity, from ``best_within``); by default (no ``--within``) the run's
  final ``best_reward``, i.e. within the budget the run was given;
* which runs count: a run is used when it finished, or (with ``--within N``) when it already got N steps in;
  unfinished runs are listed in ``runs.csv`` but left out of the table and plots unless ``--include_unfinished``.

Run identity: a summary at ``.../<contender>/<dataset>/seed<k>/summary.json`` (the layout ``etpo.benchmark``
writes) takes contender, dataset and seed from the path -- so contenders are named as in the benchmark config;
any other summary uses its own ``contender`` / ``dataset`` / ``seed`` fields.

The package: :mod:`etpo.report.runs` loads the run summaries and selects the runs that count,
:mod:`etpo.report.tables` writes the tables (Table 2, the learning table, the CSVs), :mod:`etpo.report.compare` the
comparison with the reference contender and :mod:`etpo.report.plots` draws every figure (a run's
``reward_curve.png`` included); this module re-exports their public API and holds :func:`write_report` and the
CLI (:func:`main`; ``__main__.py`` runs it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from etpo.report.compare import (
    Comparison,
    Estimate,
    PairedDifference,
    comparison,
    comparison_markdown,
    paired_difference,
    run_metrics,
)
from etpo.report.plots import (
    BANDS,
    batch_reward_curves,
    check_band,
    best_within_curves,
    plot_batch_quality,
    plot_batch_rewards,
    plot_batch_runnable,
    plot_best_within,
    plot_best_within_per_dataset,
    plot_run_curve,
    plot_timing,
)
from etpo.report.runs import RunRecord, load_runs
from etpo.report.settings import settings_markdown, settings_mismatches
from etpo.report.tables import (
    LEARNING_COLUMNS,
    PAPER_TABLE2,
    Cell,
    Table,
    build_table,
    learning_markdown,
    learning_table,
    table_markdown,
    write_runs_csv,
    write_table_csv,
)

__all__ = [
    "plot_run_curve",
    "RunRecord", "Cell", "Table", "PAPER_TABLE2", "load_runs", "build_table", "table_markdown", "write_table_csv",
    "write_runs_csv", "plot_best_within", "plot_best_within_per_dataset", "plot_batch_rewards", "write_report",
    "main", "plot_batch_runnable", "best_within_curves", "batch_reward_curves", "LEARNING_COLUMNS", "learning_table",
    "learning_markdown", "plot_batch_quality", "plot_timing", "Comparison", "Estimate", "PairedDifference",
    "comparison", "comparison_markdown", "paired_difference", "run_metrics", "settings_mismatches",
    "settings_markdown",
]


# ----------------------------------------------------------------------------------------------------------------
# everything at once
# ----------------------------------------------------------------------------------------------------------------

def write_report(
    folder: str | Path,
    out: str | Path,
    within: Optional[int] = None,
    ddof: int = 1,
    contenders: Optional[Sequence[str]] = None,
    datasets: Optional[Sequence[str]] = None,
    include_unfinished: bool = False,
    paper: bool = False,
    digits: int = 4,
    runs: Optional[Sequence[RunRecord]] = None,
    last_fraction: float = 0.25,
    n_boot: int = 10000,
    reference: str = "etpo",
    band: str = "std",
) -> dict[str, Path]:
    """Write table.md, table.csv, runs.csv, learning.md (:func:`learning_markdown` over the last ``last_fraction``
    of the batches), comparison.md (:func:`comparison_markdown`: ``reference`` against each contender, ``n_boot``
    bootstrap resamples), settings.md (:func:`settings_markdown`) and the PNGs into ``out`` (their bands over seeds:
    ``band`` "std", the paper's, or "se", the standard error); returns ``{name:
    path}`` of what was written (plots are skipped when no run counts, batch_quality.png / timing.png when no run has
    their series)."""
    check_band(band)  # before any work: a typo must not cost a report half-written
    runs = list(runs) if runs is not None else load_runs(folder)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = build_table(runs, within, ddof, contenders, datasets, include_unfinished)
    written: dict[str, Path] = {}
    md = table_markdown(table, digits=digits, paper=paper)
    (out / "table.md").write_text(md)
    written["table.md"] = out / "table.md"
    write_table_csv(table, out / "table.csv")
    written["table.csv"] = out / "table.csv"
    write_runs_csv(runs, out / "runs.csv", within, last_fraction)
    written["runs.csv"] = out / "runs.csv"
    (out / "learning.md").write_text(learning_markdown(runs, last_fraction, ddof, contenders=contenders,
                                                       datasets=datasets, include_unfinished=include_unfinished))
    written["learning.md"] = out / "learning.md"
    (out / "comparison.md").write_text(comparison_markdown(
        runs, reference, within, last_fraction, n_boot, digits=digits, contenders=contenders, datasets=datasets,
        include_unfinished=include_unfinished))
    written["comparison.md"] = out / "comparison.md"
    chosen = [r for r in runs if (not datasets or r.dataset in datasets)]
    mismatches = settings_mismatches(chosen, contenders)
    (out / "settings.md").write_text(settings_markdown(mismatches))
    written["settings.md"] = out / "settings.md"
    for contender, (_, found) in mismatches.items():
        if found:
            print(f"etpo.report: warning: the runs of {contender} were made with different settings ({len(found)} "
                  f"difference(s), e.g. {found[0]}): see {out / 'settings.md'}", file=sys.stderr)
    kw = dict(ddof=ddof, include_unfinished=include_unfinished, contenders=contenders, band=band)
    for name, fn, extra in (
        ("best_within.png", plot_best_within, {"within": within, "datasets": datasets}),
        ("best_within_per_dataset.png", plot_best_within_per_dataset, {"within": within, "datasets": datasets}),
        ("batch_reward.png", plot_batch_rewards, {"datasets": datasets}),
        ("batch_runnable.png", plot_batch_runnable, {"datasets": datasets}),
    ):
        p = fn(runs, out / name, **kw, **extra)
        if p is not None:
            written[name] = p
    kw = dict(include_unfinished=include_unfinished, contenders=contenders, datasets=datasets)
    for name, fn in (("batch_quality.png", plot_batch_quality), ("timing.png", plot_timing)):
        p = fn(runs, out / name, **kw)
        if p is not None:
            written[name] = p
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m etpo.report", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="folder searched recursively for summary.json files")
    parser.add_argument("--out", default=None, help="output folder (default: <folder>)")
    parser.add_argument("--within", type=int, default=None, help="N: best reward within N env steps "
                        "(default: each run's whole budget)")
    parser.add_argument("--ddof", type=int, default=1, help="std over seeds: 1 = sample std (default), 0 = population")
    parser.add_argument("--band", choices=BANDS, default="std",
                        help="the figures' band over seeds: std (default, the paper's mean ± std) or se (standard "
                        "error, std / sqrt(seeds))")
    parser.add_argument("--contenders", default=None, help="comma-separated column order (default: sorted)")
    parser.add_argument("--datasets", default=None, help="comma-separated row order (default: sorted)")
    parser.add_argument("--include_unfinished", action="store_true", help="also use runs that did not finish")
    parser.add_argument("--paper", action="store_true", help="append the paper's Table 2 columns")
    parser.add_argument("--digits", type=int, default=4)
    parser.add_argument("--last_fraction", type=float, default=0.25,
                        help="learning.md and comparison.md compare the first batch with the last fraction of a "
                        "run's batches")
    parser.add_argument("--n_boot", type=int, default=10000,
                        help="bootstrap resamples of the paired intervals in comparison.md")
    parser.add_argument("--reference", default="etpo",
                        help="the contender comparison.md sets against each other one (reference - contender; "
                        "default etpo; e.g. an ablation's variant against etpo)")
    args = parser.parse_args(argv)
    split = lambda s: [x.strip() for x in s.split(",") if x.strip()] if s else None  # noqa: E731
    try:
        written = write_report(args.folder, args.out or args.folder, args.within, args.ddof, split(args.contenders),
                               split(args.datasets), args.include_unfinished, args.paper, args.digits,
                               last_fraction=args.last_fraction, n_boot=args.n_boot, reference=args.reference,
                               band=args.band)
    except FileNotFoundError as err:
        print(f"etpo.report: error: {err}", file=sys.stderr)
        return 2
    print(Path(written["table.md"]).read_text())
    for name, p in written.items():
        print(f"wrote {p}")
    return 0
