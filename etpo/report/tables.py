"""Table-2 style tables from run summaries: :func:`build_table` (best reward within N steps, mean ± std over seeds,
plus the ``average`` row), its markdown (:func:`table_markdown`, optionally beside the paper's Table 2) and CSV
(:func:`write_table_csv`), the per-run ``runs.csv`` (:func:`write_runs_csv`) and the learning table
(:func:`learning_table`, :func:`learning_markdown`). Statistics: see :mod:`etpo.report`.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from etpo.report.runs import TIMING_PHASES, RunRecord, _learning_values, _mean_timing, _order, _select

__all__ = [
    "Cell", "Table", "PAPER_TABLE2", "LEARNING_COLUMNS", "build_table", "table_markdown", "write_table_csv",
    "write_runs_csv", "learning_table", "learning_markdown",
]

#: Table 2 of the paper (best ROC AUC within 500 steps, mean of 5), for side-by-side comparison (``--paper``).
PAPER_TABLE2: dict[str, dict[str, float]] = {
    "paper GPT-4 Reflection": {
        "pharyngitis": 0.6902, "kidney_stone": 0.7833, "health_insurance": 0.5826, "spaceship_titanic": 0.8532,
        "airlines": 0.6495, "balance_scale": 0.8833, "breast_w": 0.9944, "cmc": 0.6940, "credit_g": 0.7883,
        "diabetes": 0.8327, "eucalyptus": 0.8960, "jungle_chess": 0.9100, "pc1": 0.8489, "tic_tac_toe": 0.7560,
        "average": 0.7973},
    "paper CodeLlama-7B Reflection": {
        "pharyngitis": 0.7129, "kidney_stone": 0.7825, "health_insurance": 0.5725, "spaceship_titanic": 0.8524,
        "airlines": 0.6476, "balance_scale": 0.8833, "breast_w": 0.9941, "cmc": 0.7158, "credit_g": 0.7799,
        "diabetes": 0.8321, "eucalyptus": 0.8961, "jungle_chess": 0.9097, "pc1": 0.8414, "tic_tac_toe": 0.7304,
        "average": 0.7965},
    "paper PPO-KL": {
        "pharyngitis": 0.7134, "kidney_stone": 0.7840, "health_insurance": 0.5849, "spaceship_titanic": 0.8575,
        "airlines": 0.6549, "balance_scale": 0.8833, "breast_w": 0.9948, "cmc": 0.7278, "credit_g": 0.7850,
        "diabetes": 0.8322, "eucalyptus": 0.8961, "jungle_chess": 0.9107, "pc1": 0.8470, "tic_tac_toe": 0.7356,
        "average": 0.8005},
    "paper ETPO": {
        "pharyngitis": 0.7317, "kidney_stone": 0.7881, "health_insurance": 0.5995, "spaceship_titanic": 0.8578,
        "airlines": 0.6580, "balance_scale": 0.9289, "breast_w": 0.9948, "cmc": 0.7306, "credit_g": 0.7875,
        "diabetes": 0.8329, "eucalyptus": 0.8973, "jungle_chess": 0.9216, "pc1": 0.8492, "tic_tac_toe": 0.7483,
        "average": 0.8090},
}


# ----------------------------------------------------------------------------------------------------------------
# the table
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class Cell:
    values: list[float]            # one per seed (in seed order)
    seeds: list[int]
    mean: float = math.nan
    std: float = math.nan          # nan when fewer than ddof + 1 values

    @property
    def n(self) -> int:
        return len(self.values)


def _cell(values: Sequence[float], seeds: Sequence[int], ddof: int) -> Cell:
    arr = np.asarray(values, dtype=float)
    mean = float(np.mean(arr)) if arr.size else math.nan
    std = float(np.std(arr, ddof=ddof)) if arr.size > ddof else math.nan
    return Cell(list(map(float, values)), list(seeds), mean, std)


@dataclass
class Table:
    datasets: list[str]
    contenders: list[str]
    cells: dict[tuple[str, str], Cell]       # (dataset, contender) -> cell
    average: dict[str, Cell]                 # contender -> average-row cell (values = per-seed dataset means)
    within: Optional[int]
    ddof: int
    max_seeds: int

    def to_rows(self) -> list[dict]:
        """One dict per row (datasets, then ``average``) with ``<c>_mean``, ``<c>_std``, ``<c>_n`` columns."""
        rows = []
        for name in self.datasets + ["average"]:
            row: dict = {"dataset": name}
            for c in self.contenders:
                cell = self.average.get(c) if name == "average" else self.cells.get((name, c))
                row[f"{c}_mean"] = cell.mean if cell else math.nan
                row[f"{c}_std"] = cell.std if cell else math.nan
                row[f"{c}_n"] = cell.n if cell else 0
            rows.append(row)
        return rows


def build_table(
    runs: Sequence[RunRecord],
    within: Optional[int] = None,
    ddof: int = 1,
    contenders: Optional[Sequence[str]] = None,
    datasets: Optional[Sequence[str]] = None,
    include_unfinished: bool = False,
) -> Table:
    """Table 2: best reward within ``within`` steps (None = whole run), mean ± std (``ddof``) over seeds."""
    used = _select(runs, within, include_unfinished)
    contenders = _order((r.contender for r in used), contenders)
    datasets = _order((r.dataset for r in used), datasets)
    values: dict[tuple[str, str], dict[int, float]] = {}
    for r in used:
        v = r.best_within(within)
        if v is not None:
            values.setdefault((r.dataset, r.contender), {})[r.seed] = v
    cells = {}
    for key, by_seed in values.items():
        seeds = sorted(by_seed)
        cells[key] = _cell([by_seed[s] for s in seeds], seeds, ddof)
    average = {}
    for c in contenders:
        seeds = sorted(set().union(*[values.get((d, c), {}).keys() for d in datasets]) if datasets else set())
        complete = [s for s in seeds if all(s in values.get((d, c), {}) for d in datasets)]
        per_seed = [float(np.mean([values[(d, c)][s] for d in datasets])) for s in complete]
        average[c] = _cell(per_seed, complete, ddof)
    max_seeds = max((cell.n for cell in cells.values()), default=0)
    return Table(list(datasets), list(contenders), cells, average, within, ddof, max_seeds)


def _fmt(cell: Optional[Cell], digits: int, max_seeds: int) -> str:
    if cell is None or cell.n == 0:
        return "—"
    text = f"{cell.mean:.{digits}f}"
    if not math.isnan(cell.std):
        text += f" ± {cell.std:.{digits}f}"
    if cell.n != max_seeds:
        text += f" (n={cell.n})"
    return text


def table_markdown(table: Table, digits: int = 4, paper: bool = False, title: Optional[str] = None) -> str:
    """The table as GitHub markdown; the best mean of every row is bold. ``paper`` appends the paper's columns."""
    paper_cols = [p for p in PAPER_TABLE2 if any(d in PAPER_TABLE2[p] for d in table.datasets)] if paper else []
    header = ["dataset"] + table.contenders + paper_cols
    lines = []
    if title:
        lines += [f"### {title}", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in table.datasets + ["average"]:
        cells = [table.average.get(c) if name == "average" else table.cells.get((name, c)) for c in table.contenders]
        means = [c.mean for c in cells if c is not None and c.n]
        best = max(means) if means else None
        texts = []
        for cell in cells:
            t = _fmt(cell, digits, table.max_seeds)
            if best is not None and cell is not None and cell.n and cell.mean == best and len(means) > 1:
                t = f"**{t}**"
            texts.append(t)
        for p in paper_cols:
            v = PAPER_TABLE2[p].get(name)
            texts.append(f"{v:.4f}" if v is not None else "—")
        label = f"**{name}**" if name == "average" else name
        lines.append("| " + " | ".join([label] + texts) + " |")
    within = (f"within {table.within} environment steps (at batch granularity)" if table.within is not None
              else "within each run's budget")
    std = "sample std (ddof=1)" if table.ddof == 1 else f"std with ddof={table.ddof}"
    lines += [
        "",
        f"Best reward explored {within}; mean ± {std} over seeds (numpy); `(n=k)` marks a cell with a different "
        f"number of seeds than the others ({table.max_seeds}). Reward = validation ROC AUC, -1 = never runnable. "
        "Average row: per seed the mean over the datasets, then mean ± std over the seeds that have every dataset; "
        "bold = best mean of the row.",
    ]
    if paper_cols:
        lines.append("Paper columns: Table 2 of the paper (500 steps, mean of 5; CodeLlama-7B policy).")
    return "\n".join(lines) + "\n"


def write_table_csv(table: Table, path: str | Path) -> None:
    rows = table.to_rows()
    fields = ["dataset"] + [f"{c}_{k}" for c in table.contenders for k in ("mean", "std", "n")]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})


def write_runs_csv(runs: Sequence[RunRecord], path: str | Path, within: Optional[int] = None,
                   last_fraction: float = 0.25) -> None:
    """One row per run; ``first_runnable`` / ``last_runnable`` / ``last_reward`` / ``first_quality`` /
    ``last_quality`` are the run's own values behind :func:`learning_table` (the first batch's runnable fraction,
    the mean runnable fraction and average reward over the last ``last_fraction`` of its batches, the mean reward of
    the runnable answers of the first batch and, pooled, of the last ``last_fraction``); ``generation_s`` /
    ``environment_s`` / ``update_s`` its mean seconds per batch of each phase (empty where not recorded)."""
    learned_fields = ["first_runnable", "last_runnable", "last_reward", "first_quality", "last_quality"]
    fields = (["contender", "dataset", "seed", "finished", "env_steps", "budget", "best_reward", "best_within",
               "runnable_fraction"] + learned_fields + list(TIMING_PHASES) + ["wall_time_s", "run_dir"])
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for r in sorted(runs, key=lambda r: (r.contender, r.dataset, r.seed)):
            bw = r.best_within(within)
            learned = _learning_values(r, last_fraction)
            timing = _mean_timing(r)
            writer.writerow({
                "contender": r.contender, "dataset": r.dataset, "seed": r.seed, "finished": r.finished,
                "env_steps": r.env_steps, "budget": r.summary.get("budget"),
                "best_reward": "" if r.best_reward is None else r.best_reward,
                "best_within": "" if bw is None else bw,
                "runnable_fraction": r.summary.get("runnable_fraction"),
                **{k: "" if learned[k] is None else learned[k] for k in learned_fields},
                **{k: "" if timing[k] is None else timing[k] for k in TIMING_PHASES},
                "wall_time_s": r.summary.get("wall_time_s"),
                "run_dir": _shown_path(r.path),
            })


def _shown_path(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it (so a committed ``runs.csv`` names no
    machine's checkout), else absolute."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


# ----------------------------------------------------------------------------------------------------------------
# learning: how the batches of the end of a run compare with its start
# ----------------------------------------------------------------------------------------------------------------

LEARNING_COLUMNS = (
    ("first batch: runnable", "first_runnable"),
    ("last {f}: runnable", "last_runnable"),
    ("last {f}: average reward", "last_reward"),
    ("first batch: mean AUC of runnable", "first_quality"),
    ("last {f}: mean AUC of runnable", "last_quality"),
    ("best reward", "best"),
)


def learning_table(runs: Sequence[RunRecord], last_fraction: float = 0.25, ddof: int = 1,
                   contenders: Optional[Sequence[str]] = None, datasets: Optional[Sequence[str]] = None,
                   include_unfinished: bool = False) -> dict[tuple[str, str, str], Cell]:
    """Per (contender, dataset, column) the mean ± std over seeds of: the first batch's runnable fraction, the
    runnable fraction and the average reward over the last ``last_fraction`` of the batches (at least one batch),
    the mean reward of the runnable answers (their mean validation AUC) of the first batch and, pooled over the
    answers, of the last ``last_fraction``, and the best reward of the run. A seed without a value (no answer ran
    there, an older summary) is left out of that cell."""
    if not 0.0 < last_fraction <= 1.0:
        raise ValueError("last_fraction must be in (0, 1]")
    used = _select(runs, None, include_unfinished)
    values: dict[tuple[str, str, str], dict[int, float]] = {}
    for r in used:
        for column, v in _learning_values(r, last_fraction).items():
            if v is not None:
                values.setdefault((r.contender, r.dataset, column), {})[r.seed] = v
    return {key: _cell([by_seed[s] for s in sorted(by_seed)], sorted(by_seed), ddof)
            for key, by_seed in values.items()}


def learning_markdown(runs: Sequence[RunRecord], last_fraction: float = 0.25, ddof: int = 1, digits: int = 3,
                      contenders: Optional[Sequence[str]] = None, datasets: Optional[Sequence[str]] = None,
                      include_unfinished: bool = False) -> str:
    """:func:`learning_table` as markdown: one row per (dataset, contender)."""
    cells = learning_table(runs, last_fraction, ddof, contenders, datasets, include_unfinished)
    used = _select(runs, None, include_unfinished)
    contenders = _order((r.contender for r in used), contenders)
    datasets = _order((r.dataset for r in used), datasets)
    label = f"{last_fraction:.0%}" if last_fraction < 1 else "all"
    header = ["dataset", "contender"] + [name.format(f=label) for name, _ in LEARNING_COLUMNS]
    max_seeds = max((c.n for c in cells.values()), default=0)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for d in datasets:
        for c in contenders:
            row = [_fmt(cells.get((c, d, col)), digits, max_seeds) for _, col in LEARNING_COLUMNS]
            if all(x == "—" for x in row):
                continue
            lines.append("| " + " | ".join([d, c] + row) + " |")
    return "\n".join(lines) + f"\n\nmean ± std over seeds (ddof={ddof}); last {label} = the last {label} of a run's batches\n"
