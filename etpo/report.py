"""Benchmark report from a folder of run summaries: ``python -m etpo.report <folder> --out <dir>``.

Reads every ``summary.json`` below ``<folder>`` (format: docs/architecture.md, "Run directory") and writes into
``<dir>``:

* ``table.md`` / ``table.csv`` -- Table 2 of the paper: one row per dataset plus an ``average`` row, one column per
  contender; a cell is the best reward explored within N environment steps, mean ± std over seeds;
* ``runs.csv`` -- one line per run (contender, dataset, seed, best reward, env steps, finished, run dir);
* ``best_within.png`` -- Figure 3: best reward explored within n steps vs. n, one line per contender (mean over
  seeds of the per-seed average over datasets, band = ± one std over seeds); ``best_within_per_dataset.png``
  the same curve per dataset (mean ± std over seeds);
* ``batch_reward.png`` -- Figure 4: the average reward of each rollout batch during training (non-runnable code
  counts as -1), one panel per dataset plus an "average" panel, mean ± std over seeds.

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
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

__all__ = [
    "plot_run_curve",
    "RunRecord", "Cell", "Table", "PAPER_TABLE2", "load_runs", "build_table", "table_markdown", "write_table_csv",
    "write_runs_csv", "plot_best_within", "plot_best_within_per_dataset", "plot_batch_rewards", "write_report",
    "main",
]

_SEED_DIR = re.compile(r"^seed(-?\d+)$")

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
# runs
# ----------------------------------------------------------------------------------------------------------------

def _finite(x) -> Optional[float]:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


@dataclass
class RunRecord:
    """One run: who (contender, dataset, seed), where (its run dir) and its ``summary.json``."""

    contender: str
    dataset: str
    seed: int
    path: Path
    summary: dict = field(repr=False)

    @property
    def finished(self) -> bool:
        return bool(self.summary.get("finished"))

    @property
    def env_steps(self) -> int:
        return int(self.summary.get("env_steps") or 0)

    @property
    def best_reward(self) -> Optional[float]:
        """The run's final best reward (None when no batch was collected)."""
        return _finite(self.summary.get("best_reward"))

    def curve(self) -> tuple[np.ndarray, np.ndarray]:
        """``(env_steps, best reward so far)`` after every rollout batch (from ``best_within``)."""
        pts = [(int(s), _finite(b)) for s, b in (self.summary.get("best_within") or [])]
        pts = [(s, b) for s, b in pts if b is not None]
        if not pts:
            return np.zeros(0, dtype=float), np.zeros(0, dtype=float)
        steps, best = zip(*pts)
        return np.asarray(steps, dtype=float), np.maximum.accumulate(np.asarray(best, dtype=float))

    def best_within(self, n: Optional[int]) -> Optional[float]:
        """Best reward explored within ``n`` environment steps (None = the whole run); None when undefined."""
        if n is None:
            return self.best_reward
        steps, best = self.curve()
        k = int(np.searchsorted(steps, n, side="right"))  # batches that ended at most n steps in
        return float(best[k - 1]) if k > 0 else None

    def counts_for(self, n: Optional[int], include_unfinished: bool = False) -> bool:
        """Whether this run has a result for "best within n" (finished, or already n steps in)."""
        if include_unfinished or self.finished:
            return True
        return n is not None and self.env_steps >= n

    def batch_rewards(self) -> tuple[np.ndarray, np.ndarray]:
        """``(env_steps at the end of each batch, average reward of the batch)``."""
        return self.batch_series("batch_avg_reward")

    def batch_series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """``(env_steps at the end of each batch, the summary's per-batch series `key`)`` (``batch_avg_reward``,
        ``batch_runnable_fraction``)."""
        rewards = np.asarray([_finite(r) if _finite(r) is not None else np.nan
                              for r in (self.summary.get(key) or [])], dtype=float)
        steps = [int(s) for s, _ in (self.summary.get("best_within") or [])]
        if len(steps) != len(rewards):  # older / foreign summaries: spread the steps evenly
            total = max(self.env_steps, len(rewards))
            steps = list(np.linspace(total / max(len(rewards), 1), total, len(rewards)))
        return np.asarray(steps, dtype=float), rewards


def load_runs(folder: str | Path) -> list[RunRecord]:
    """Every ``summary.json`` below ``folder`` (sorted by path); unreadable files are skipped with a warning."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"no such folder: {folder}")
    runs = []
    for path in sorted(folder.rglob("summary.json")):
        try:
            summary = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            print(f"etpo.report: warning: skipping unreadable {path}: {err}", file=sys.stderr)
            continue
        run_dir = path.parent.resolve()
        m = _SEED_DIR.match(run_dir.name)
        if m and len(run_dir.parts) >= 3:
            contender, dataset, seed = run_dir.parent.parent.name, run_dir.parent.name, int(m.group(1))
        else:
            contender = str(summary.get("contender") or "unknown")
            dataset = str(summary.get("dataset") or "unknown")
            seed = int(summary.get("seed") if summary.get("seed") is not None else 0)
        runs.append(RunRecord(contender, dataset, seed, run_dir, summary))
    return runs


def _order(values: Iterable[str], preferred: Optional[Sequence[str]]) -> list[str]:
    """``preferred`` when given (it selects and orders), else the values present, sorted."""
    return list(preferred) if preferred else sorted(set(values))


def _select(runs: Sequence[RunRecord], within: Optional[int], include_unfinished: bool) -> list[RunRecord]:
    """Runs that count, one per (contender, dataset, seed) (a duplicate keeps the later path, with a warning)."""
    chosen: dict[tuple, RunRecord] = {}
    for r in runs:
        if not r.counts_for(within, include_unfinished):
            continue
        key = (r.contender, r.dataset, r.seed)
        if key in chosen:
            print(f"etpo.report: warning: two runs for {key}: using {r.path}, ignoring {chosen[key].path}",
                  file=sys.stderr)
        chosen[key] = r
    return list(chosen.values())


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
    """One row per run; ``first_runnable`` / ``last_runnable`` / ``last_reward`` are the run's own values behind
    :func:`learning_table` (the first batch's runnable fraction, the mean runnable fraction and average reward over
    the last ``last_fraction`` of its batches)."""
    fields = ["contender", "dataset", "seed", "finished", "env_steps", "budget", "best_reward", "best_within",
              "runnable_fraction", "first_runnable", "last_runnable", "last_reward", "wall_time_s", "run_dir"]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for r in sorted(runs, key=lambda r: (r.contender, r.dataset, r.seed)):
            bw = r.best_within(within)
            learned = _learning_values(r, last_fraction)
            writer.writerow({
                "contender": r.contender, "dataset": r.dataset, "seed": r.seed, "finished": r.finished,
                "env_steps": r.env_steps, "budget": r.summary.get("budget"),
                "best_reward": "" if r.best_reward is None else r.best_reward,
                "best_within": "" if bw is None else bw,
                "runnable_fraction": r.summary.get("runnable_fraction"),
                **{k: "" if learned[k] is None else learned[k] for k in ("first_runnable", "last_runnable", "last_reward")},
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
# plots
# ----------------------------------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _colours(contenders: Sequence[str]) -> dict[str, str]:
    return {c: f"C{i % 10}" for i, c in enumerate(contenders)}


def _step_values(run: RunRecord, grid: np.ndarray) -> np.ndarray:
    """Best-within-n of ``run`` at every n of ``grid`` (forward fill between batches; NaN before the first batch
    and, for an unfinished run, after its last one)."""
    steps, best = run.curve()
    out = np.full(grid.shape, np.nan)
    if steps.size == 0:
        return out
    k = np.searchsorted(steps, grid, side="right")
    ok = k > 0
    out[ok] = best[k[ok] - 1]
    if not run.finished:
        out[grid > steps[-1]] = np.nan
    return out


def _mean_std(mat: np.ndarray, ddof: int) -> tuple[np.ndarray, np.ndarray]:
    """Column-wise mean and std (``ddof``) over the rows that are not NaN; the std is 0 where a column has too few
    values (the band then collapses onto the mean)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns -> NaN mean, silently
        mean = np.nanmean(mat, axis=0)
        count = np.sum(~np.isnan(mat), axis=0)
        std = np.where(count > ddof, np.nanstd(mat, axis=0, ddof=ddof), 0.0)
    return mean, np.nan_to_num(std)


def _by(runs: Sequence[RunRecord]) -> dict[str, dict[str, dict[int, RunRecord]]]:
    out: dict[str, dict[str, dict[int, RunRecord]]] = {}
    for r in runs:
        out.setdefault(r.contender, {}).setdefault(r.dataset, {})[r.seed] = r
    return out


def best_within_curves(
    runs: Sequence[RunRecord], ddof: int = 1, within: Optional[int] = None, include_unfinished: bool = False,
    contenders: Optional[Sequence[str]] = None, datasets: Optional[Sequence[str]] = None,
) -> dict[str, dict]:
    """Figure-3 data per contender: ``{"n": grid, "mean", "std", "seeds": per-seed curves [S, len(grid)],
    "partial": bool}``. Per seed the curve is the mean over datasets (only where every dataset of the contender
    has that seed covering n; when no seed is complete anywhere the per-seed mean over the available datasets is
    used and the curve is marked partial)."""
    used = _select(runs, within, include_unfinished)
    grouped = _by(used)
    datasets = _order((r.dataset for r in used), datasets)
    out = {}
    for c in _order(grouped, contenders):
        by_ds = {d: v for d, v in grouped.get(c, {}).items() if d in datasets}
        if not by_ds:
            continue
        all_steps = sorted({s for d in by_ds.values() for r in d.values() for s in r.curve()[0]})
        grid = np.asarray([s for s in all_steps if within is None or s <= within], dtype=float)
        if grid.size == 0:
            continue
        seeds = sorted({s for d in by_ds.values() for s in d})
        cube = np.full((len(by_ds), len(seeds), grid.size), np.nan)
        for i, (_, per_seed) in enumerate(sorted(by_ds.items())):
            for j, s in enumerate(seeds):
                if s in per_seed:
                    cube[i, j] = _step_values(per_seed[s], grid)
        complete = np.all(~np.isnan(cube), axis=0)  # [S, n]
        per_seed_curves = np.where(complete, np.mean(np.nan_to_num(cube), axis=0), np.nan)
        partial = bool(np.all(np.isnan(per_seed_curves)))
        if partial:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                per_seed_curves = np.nanmean(cube, axis=0)
        mean, std = _mean_std(per_seed_curves, ddof)
        out[c] = {"n": grid, "mean": mean, "std": std, "seeds": per_seed_curves, "partial": partial}
    return out


def plot_best_within(
    runs: Sequence[RunRecord], path: str | Path, ddof: int = 1, within: Optional[int] = None,
    include_unfinished: bool = False, contenders: Optional[Sequence[str]] = None,
    datasets: Optional[Sequence[str]] = None,
) -> Optional[Path]:
    """Figure 3: best reward explored within n steps vs. n; mean over seeds of the dataset average, ± std band."""
    curves = best_within_curves(runs, ddof, within, include_unfinished, contenders, datasets)
    if not curves:
        return None
    plt = _pyplot()
    colours = _colours(_order(_by(runs), contenders))
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for c, cv in curves.items():
        ok = ~np.isnan(cv["mean"])
        label = c + (" (partial)" if cv["partial"] else "")
        ax.step(cv["n"][ok], cv["mean"][ok], where="post", color=colours.get(c), label=label, lw=1.8, marker="o",
                ms=2.5)
        ax.fill_between(cv["n"][ok], (cv["mean"] - cv["std"])[ok], (cv["mean"] + cv["std"])[ok], step="post",
                        color=colours.get(c), alpha=0.2, lw=0)
    ax.set_xlabel("environment steps n")
    ax.set_ylabel("best reward within n (mean over datasets)")
    ax.set_title(f"Best reward explored within n steps (mean ± std over seeds, ddof={ddof})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def _grid_axes(plt, n_panels: int, width: float = 3.2, height: float = 2.4):
    cols = min(4, max(1, n_panels))
    rows = math.ceil(n_panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), dpi=110, squeeze=False)
    flat = list(axes.ravel())
    for ax in flat[n_panels:]:
        ax.set_visible(False)
    return fig, flat[:n_panels]


def plot_best_within_per_dataset(
    runs: Sequence[RunRecord], path: str | Path, ddof: int = 1, within: Optional[int] = None,
    include_unfinished: bool = False, contenders: Optional[Sequence[str]] = None,
    datasets: Optional[Sequence[str]] = None,
) -> Optional[Path]:
    """Figure 3 per dataset: one panel per dataset, mean ± std over seeds of best-within-n."""
    used = _select(runs, within, include_unfinished)
    if not used:
        return None
    grouped = _by(used)
    contenders = _order(grouped, contenders)
    datasets = _order((r.dataset for r in used), datasets)
    plt = _pyplot()
    colours = _colours(_order(_by(runs), contenders))
    fig, axes = _grid_axes(plt, len(datasets))
    for ax, d in zip(axes, datasets):
        for c in contenders:
            per_seed = grouped.get(c, {}).get(d)
            if not per_seed:
                continue
            steps = sorted({s for r in per_seed.values() for s in r.curve()[0]})
            grid = np.asarray([s for s in steps if within is None or s <= within], dtype=float)
            if grid.size == 0:
                continue
            mat = np.stack([_step_values(r, grid) for _, r in sorted(per_seed.items())])
            mean, std = _mean_std(mat, ddof)
            ok = ~np.isnan(mean)
            ax.step(grid[ok], mean[ok], where="post", color=colours.get(c), label=c, lw=1.5)
            ax.fill_between(grid[ok], (mean - std)[ok], (mean + std)[ok], step="post", color=colours.get(c),
                            alpha=0.2, lw=0)
        ax.set_title(d, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    return _save_panels(fig, axes, "environment steps n", "best reward within n",
                        f"Best reward explored within n steps per dataset; mean ± std over seeds (ddof={ddof})", path)


def _save_panels(fig, axes, xlabel: str, ylabel: str, title: str, path) -> Path:
    """Shared legend, axis labels and title of a multi-panel figure; write it to ``path``."""
    import matplotlib.pyplot as plt

    axes[0].legend(fontsize=7)
    fig.supxlabel(xlabel, fontsize=9)
    fig.supylabel(ylabel, fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def batch_reward_curves(
    runs: Sequence[RunRecord], ddof: int = 1, include_unfinished: bool = False,
    contenders: Optional[Sequence[str]] = None, datasets: Optional[Sequence[str]] = None,
    key: str = "batch_avg_reward",
) -> dict[str, dict[str, dict]]:
    """Figure-4 data: ``{panel: {contender: {"x", "mean", "std"}}}`` with panels = datasets + ``average``.

    Runs of one contender are aligned by batch index (they share the batch schedule); x = the median env steps at
    the end of that batch. The average panel averages over datasets per seed (where every dataset has that batch)
    and then takes mean ± std over seeds."""
    used = _select(runs, None, include_unfinished)
    grouped = _by(used)
    datasets = _order((r.dataset for r in used), datasets)
    panels: dict[str, dict[str, dict]] = {d: {} for d in datasets}
    panels["average"] = {}
    for c in _order(grouped, contenders):
        by_ds = {d: v for d, v in grouped.get(c, {}).items() if d in datasets}
        if not by_ds:
            continue
        seeds = sorted({s for d in by_ds.values() for s in d})
        length = max(len(r.batch_series(key)[1]) for d in by_ds.values() for r in d.values())
        if length == 0:
            continue
        ds_names = [d for d in datasets if d in by_ds]
        cube = np.full((len(ds_names), len(seeds), length), np.nan)
        xs = np.full((len(ds_names), len(seeds), length), np.nan)
        for i, d in enumerate(ds_names):
            for j, s in enumerate(seeds):
                r = by_ds[d].get(s)
                if r is None:
                    continue
                x, y = r.batch_series(key)
                cube[i, j, : len(y)] = y
                xs[i, j, : len(x)] = x
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            for i, d in enumerate(ds_names):
                mean, std = _mean_std(cube[i], ddof)
                panels[d][c] = {"x": np.nanmedian(xs[i], axis=0), "mean": mean, "std": std}
            complete = np.all(~np.isnan(cube), axis=0)
            per_seed = np.where(complete, np.mean(np.nan_to_num(cube), axis=0), np.nan)
            if np.all(np.isnan(per_seed)):
                per_seed = np.nanmean(cube, axis=0)
            mean, std = _mean_std(per_seed, ddof)
            panels["average"][c] = {"x": np.nanmedian(xs.reshape(-1, length), axis=0), "mean": mean, "std": std}
    return panels


def plot_batch_rewards(
    runs: Sequence[RunRecord], path: str | Path, ddof: int = 1, include_unfinished: bool = False,
    contenders: Optional[Sequence[str]] = None, datasets: Optional[Sequence[str]] = None,
    key: str = "batch_avg_reward",
) -> Optional[Path]:
    """Figure 4: the average reward (or, with ``key="batch_runnable_fraction"``, the runnable fraction) of every
    rollout batch during training, one panel per dataset plus the average; mean ± std over seeds as a band."""
    panels = batch_reward_curves(runs, ddof, include_unfinished, contenders, datasets, key)
    if not panels["average"]:
        return None
    plt = _pyplot()
    colours = _colours(_order(_by(runs), contenders))
    names = ["average"] + [p for p in panels if p != "average"]
    fig, axes = _grid_axes(plt, len(names))
    for ax, name in zip(axes, names):
        for c, cv in panels[name].items():
            ok = ~np.isnan(cv["mean"]) & ~np.isnan(cv["x"])
            ax.plot(cv["x"][ok], cv["mean"][ok], color=colours.get(c), label=c, lw=1.3)
            ax.fill_between(cv["x"][ok], (cv["mean"] - cv["std"])[ok], (cv["mean"] + cv["std"])[ok],
                            color=colours.get(c), alpha=0.2, lw=0)
        ax.set_title("average over datasets" if name == "average" else name, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    if key == "batch_runnable_fraction":
        ylabel, title = "runnable fraction of the batch", "Runnable fraction per rollout batch"
    else:
        ylabel, title = "average reward of the batch", "Average reward per rollout batch (-1 = not runnable)"
    return _save_panels(fig, axes, "environment steps", ylabel, f"{title}; mean ± std over seeds (ddof={ddof})", path)


def plot_batch_runnable(runs: Sequence[RunRecord], path: str | Path, **kw) -> Optional[Path]:
    """:func:`plot_batch_rewards` of the runnable fraction."""
    return plot_batch_rewards(runs, path, key="batch_runnable_fraction", **kw)


# ----------------------------------------------------------------------------------------------------------------
# learning: how the batches of the end of a run compare with its start
# ----------------------------------------------------------------------------------------------------------------

def _tail_mean(series: np.ndarray, fraction: float) -> Optional[float]:
    series = series[~np.isnan(series)]
    if series.size == 0:
        return None
    k = max(1, int(math.ceil(fraction * series.size)))
    return float(np.mean(series[-k:]))


def _learning_values(run: RunRecord, last_fraction: float) -> dict[str, Optional[float]]:
    """One run's values behind the learning table: the first batch's runnable fraction, the runnable fraction and
    average reward over the last ``last_fraction`` of its batches, its best reward (None where it has none)."""
    runnable = run.batch_series("batch_runnable_fraction")[1]
    reward = run.batch_series("batch_avg_reward")[1]
    return {"first_runnable": float(runnable[0]) if runnable.size and not np.isnan(runnable[0]) else None,
            "last_runnable": _tail_mean(runnable, last_fraction),
            "last_reward": _tail_mean(reward, last_fraction), "best": run.best_reward}


LEARNING_COLUMNS = (
    ("first batch: runnable", "first_runnable"),
    ("last {f}: runnable", "last_runnable"),
    ("last {f}: average reward", "last_reward"),
    ("best reward", "best"),
)


def learning_table(runs: Sequence[RunRecord], last_fraction: float = 0.25, ddof: int = 1,
                   contenders: Optional[Sequence[str]] = None, datasets: Optional[Sequence[str]] = None,
                   include_unfinished: bool = False) -> dict[tuple[str, str, str], Cell]:
    """Per (contender, dataset, column) the mean ± std over seeds of: the first batch's runnable fraction, the
    runnable fraction and the average reward over the last ``last_fraction`` of the batches (at least one batch),
    and the best reward of the run."""
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


def plot_run_curve(summary: dict, path: str | Path) -> Optional[Path]:
    """One run's learning curve (``reward_curve.png`` of every run directory): the average reward and the runnable
    fraction of each rollout batch against environment steps, with the best reward found so far."""
    rewards = list(summary.get("batch_avg_reward") or [])
    if not rewards:
        return None
    runnable = list(summary.get("batch_runnable_fraction") or [])
    steps = [int(x[0]) for x in summary.get("best_within") or []][: len(rewards)] or list(range(1, len(rewards) + 1))
    best = [float(x[1]) if x[1] is not None and math.isfinite(float(x[1])) else float("nan")
            for x in summary.get("best_within") or []][: len(rewards)]
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.0, 5.0), sharex=True)
    top.plot(steps, rewards, marker="o", lw=1.5, label="average reward of the batch")
    if best:
        top.plot(steps, best, ls="--", lw=1.2, label="best reward so far")
    top.set_ylabel("reward (-1 = not runnable)")
    top.legend(fontsize=8)
    top.grid(alpha=0.3)
    if runnable:
        bottom.plot(steps[: len(runnable)], runnable, marker="o", lw=1.5, color="tab:green")
    bottom.set_ylim(-0.05, 1.05)
    bottom.set_ylabel("runnable fraction")
    bottom.set_xlabel("environment steps")
    bottom.grid(alpha=0.3)
    name = " ".join(str(summary.get(k)) for k in ("contender", "dataset") if summary.get(k))
    fig.suptitle(f"{name}: one point per rollout batch", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


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
) -> dict[str, Path]:
    """Write table.md, table.csv, runs.csv, learning.md (:func:`learning_markdown` over the last ``last_fraction``
    of the batches) and the four PNGs into ``out``; returns ``{name: path}`` of what was written (plots are skipped
    when no run counts)."""
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
    kw = dict(ddof=ddof, include_unfinished=include_unfinished, contenders=contenders)
    for name, fn, extra in (
        ("best_within.png", plot_best_within, {"within": within, "datasets": datasets}),
        ("best_within_per_dataset.png", plot_best_within_per_dataset, {"within": within, "datasets": datasets}),
        ("batch_reward.png", plot_batch_rewards, {"datasets": datasets}),
        ("batch_runnable.png", plot_batch_runnable, {"datasets": datasets}),
    ):
        p = fn(runs, out / name, **kw, **extra)
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
    parser.add_argument("--contenders", default=None, help="comma-separated column order (default: sorted)")
    parser.add_argument("--datasets", default=None, help="comma-separated row order (default: sorted)")
    parser.add_argument("--include_unfinished", action="store_true", help="also use runs that did not finish")
    parser.add_argument("--paper", action="store_true", help="append the paper's Table 2 columns")
    parser.add_argument("--digits", type=int, default=4)
    parser.add_argument("--last_fraction", type=float, default=0.25,
                        help="learning.md compares the first batch with the last fraction of a run's batches")
    args = parser.parse_args(argv)
    split = lambda s: [x.strip() for x in s.split(",") if x.strip()] if s else None  # noqa: E731
    try:
        written = write_report(args.folder, args.out or args.folder, args.within, args.ddof, split(args.contenders),
                               split(args.datasets), args.include_unfinished, args.paper, args.digits,
                               last_fraction=args.last_fraction)
    except FileNotFoundError as err:
        print(f"etpo.report: error: {err}", file=sys.stderr)
        return 2
    print(Path(written["table.md"]).read_text())
    for name, p in written.items():
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
