"""Run summaries of a benchmark folder, for the report's tables and plots (:mod:`etpo.report`).

:class:`RunRecord` is one run (contender, dataset, seed, run dir, its ``summary.json``: format in
docs/architecture.md, "Run directory"); :func:`load_runs` finds every ``summary.json`` below a folder and reads the
run's identity off the path (``<contender>/<dataset>/seed<k>/``, the layout ``etpo.benchmark`` writes) or, for any
other summary, off its fields. The selection helpers decide which runs count (finished, or with ``--within N``
already N steps in; one per (contender, dataset, seed)) and in which order; :func:`_learning_values` gives one run's
values behind the learning table, the comparison and ``runs.csv``, :func:`_mean_timing` its mean seconds per batch.
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

__all__ = ["RunRecord", "load_runs"]

_SEED_DIR = re.compile(r"^seed(-?\d+)$")


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
    """Every ``summary.json`` below ``folder`` (sorted by path); unreadable files are skipped with a warning, and so
    are runs that etpo.benchmark set aside as stale (a ``stale.json`` beside them: made with settings since
    changed)."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"no such folder: {folder}")
    runs, stale = [], 0
    for path in sorted(folder.rglob("summary.json")):
        if (path.parent / "stale.json").exists():
            stale += 1
            continue
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
    if stale:
        print(f"etpo.report: not counting {stale} run(s) set aside as stale (stale.json beside them)", file=sys.stderr)
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


def _by(runs: Sequence[RunRecord]) -> dict[str, dict[str, dict[int, RunRecord]]]:
    out: dict[str, dict[str, dict[int, RunRecord]]] = {}
    for r in runs:
        out.setdefault(r.contender, {}).setdefault(r.dataset, {})[r.seed] = r
    return out


# ----------------------------------------------------------------------------------------------------------------
# learning: how the batches of the end of a run compare with its start
# ----------------------------------------------------------------------------------------------------------------

def _tail_mean(series: np.ndarray, fraction: float) -> Optional[float]:
    series = series[~np.isnan(series)]
    if series.size == 0:
        return None
    k = max(1, int(math.ceil(fraction * series.size)))
    return float(np.mean(series[-k:]))


def _quality_values(run: RunRecord, last_fraction: float) -> tuple[Optional[float], Optional[float]]:
    """``(first, last)`` quality of a run's answers apart from runnability, from ``batch_runnable_reward`` (the mean
    reward of a batch's runnable answers: their mean validation AUC) weighted by ``batch_runnable_fraction``.

    ``first``: the first batch's value (None when none of its answers ran). ``last``: the pooled mean reward of the
    runnable answers of the last ``last_fraction`` of the batches (at least one batch; the same window as
    ``last_runnable``). Every batch of a run has the same number of answers, so pooling the answers is
    ``sum_b(q_b * f_b) / sum_b(f_b)`` over the window's batches with ``f_b > 0`` (a batch whose answers all failed
    has no mean to weigh); None when no answer of the window ran, or when the summary predates the series."""
    quality = run.batch_series("batch_runnable_reward")[1]
    runnable = run.batch_series("batch_runnable_fraction")[1]
    n = min(quality.size, runnable.size)
    if n == 0:
        return None, None
    quality, runnable = quality[:n], runnable[:n]
    ran = ~np.isnan(quality) & ~np.isnan(runnable) & (runnable > 0)
    first = float(quality[0]) if ran[0] else None
    k = max(1, int(math.ceil(last_fraction * n)))
    q, f = quality[-k:][ran[-k:]], runnable[-k:][ran[-k:]]
    last = float(np.sum(q * f) / np.sum(f)) if f.size else None
    return first, last


def _learning_values(run: RunRecord, last_fraction: float) -> dict[str, Optional[float]]:
    """One run's values behind the learning table: the first batch's runnable fraction, the runnable fraction and
    average reward over the last ``last_fraction`` of its batches, the mean reward of the runnable answers of the
    first batch and of the last ``last_fraction`` (:func:`_quality_values`), its best reward (None where it has
    none)."""
    runnable = run.batch_series("batch_runnable_fraction")[1]
    reward = run.batch_series("batch_avg_reward")[1]
    first_quality, last_quality = _quality_values(run, last_fraction)
    return {"first_runnable": float(runnable[0]) if runnable.size and not np.isnan(runnable[0]) else None,
            "last_runnable": _tail_mean(runnable, last_fraction),
            "last_reward": _tail_mean(reward, last_fraction),
            "first_quality": first_quality, "last_quality": last_quality, "best": run.best_reward}


#: The phases of a rollout batch's time in ``batch_timing`` (seconds): generating the answers, running them in the
#: environments, learning from the batch.
TIMING_PHASES = ("generation_s", "environment_s", "update_s")


def _mean_timing(run: RunRecord) -> dict[str, Optional[float]]:
    """A run's mean seconds per batch of every phase of :data:`TIMING_PHASES`, over the batches of ``batch_timing``
    that recorded it (None when none did: an older summary, or a contender that never updates)."""
    timing = [t for t in (run.summary.get("batch_timing") or []) if isinstance(t, dict)]
    out: dict[str, Optional[float]] = {}
    for phase in TIMING_PHASES:
        values = [v for v in (_finite(t.get(phase)) for t in timing) if v is not None]
        out[phase] = float(np.mean(values)) if values else None
    return out
