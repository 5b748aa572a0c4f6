"""The reference contender (ETPO) against each other contender, with honest statistics: :func:`comparison` (the
numbers) and :func:`comparison_markdown` (``comparison.md``).

Three metrics per run, so that learning shows in the *quality* of the answers and not only in their runnability:

* **best** -- the best reward explored within N environment steps (the paper's metric; N = ``within``, or the whole
  run, as in :func:`etpo.report.tables.build_table`);
* **last_reward** -- the average reward of the last ``last_fraction`` of the run's batches (failures count -1);
* **last_quality** -- the mean reward of the runnable answers of those batches (their mean validation AUC), pooled
  over the answers;

plus **first_quality**, the first batch's mean reward of runnable answers, for reference (the values of
:func:`etpo.report.runs._learning_values`).

Statistics (numpy; the bootstrap is scipy's):

* per dataset and contender: mean ± s.e. over seeds, s.e. = sample std (ddof=1) / sqrt(n); pooled over datasets
  ("all datasets"): per seed the mean over the datasets, then mean ± s.e. over the seeds that have every dataset
  (the seeds share their train/validation splits across contenders, so seed k is one repetition of the benchmark);
* reference − contender: runs are paired by (dataset, seed), only pairs where both runs have a value; the mean of the
  paired differences, their s.e. (std of the differences, ddof=1, / sqrt(n)), n pairs and a 95 % paired bootstrap
  percentile interval (``scipy.stats.bootstrap``, ``paired=True``, ``n_boot`` resamples, a generator seeded with
  ``seed`` for every interval, so each is reproducible on its own). Pooled over datasets the pairs of every dataset
  count as independent units. With fewer than 2 pairs there is no s.e. and no interval.

Which runs count: as in table.md for **best** (finished, or with ``within`` already N steps in) and as in
learning.md for the others (finished); ``include_unfinished`` uses every run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from etpo.report.runs import RunRecord, _learning_values, _order, _select

__all__ = [
    "ALL_DATASETS", "COMPARED_METRICS", "Estimate", "PairedDifference", "Learning", "Comparison", "mean_se",
    "paired_difference", "run_metrics", "comparison", "comparison_markdown",
]

#: The scope of the rows pooled over every dataset.
ALL_DATASETS = "all datasets"

#: The metrics that are compared (reference − contender), with their column titles; ``first_quality`` is shown
#: beside them for reference only.
COMPARED_METRICS = (
    ("best", "best reward within {n}"),
    ("last_reward", "last {f}: average reward"),
    ("last_quality", "last {f}: mean AUC of runnable"),
)
_SHOWN_METRICS = COMPARED_METRICS + (("first_quality", "first batch: mean AUC of runnable"),)


@dataclass
class Estimate:
    """Mean ± s.e. of one metric of one contender over seeds (``se`` is NaN with fewer than 2 values)."""

    values: list[float]
    seeds: list[int]
    mean: float = math.nan
    se: float = math.nan

    @property
    def n(self) -> int:
        return len(self.values)


@dataclass
class PairedDifference:
    """Reference − contender over the pairs ``(dataset, seed)`` where both have a value: mean, s.e., and the
    bootstrap percentile interval ``[low, high]`` (NaN, like ``se``, with fewer than 2 pairs)."""

    pairs: list[tuple[str, int]]
    reference: list[float]
    other: list[float]
    mean: float = math.nan
    se: float = math.nan
    low: float = math.nan
    high: float = math.nan

    @property
    def n(self) -> int:
        return len(self.pairs)

    @property
    def differences(self) -> np.ndarray:
        return np.asarray(self.reference, dtype=float) - np.asarray(self.other, dtype=float)


@dataclass
class Learning:
    """The reference's first batch against its last fraction (mean AUC of runnable answers) over the runs of a
    scope that have both: how many improved, and the mean ± s.e. of ``last − first``."""

    improved: int
    change: Estimate
    #: runs with runnable answers in their first batch but none in the last fraction: they did not improve either,
    #: and ``change`` (which needs both) leaves them out
    lost: int = 0
    #: runs with no runnable answer in their first batch: there is nothing to exceed, so they are neither counted
    #: nor left out silently (the line names them)
    no_start: int = 0


@dataclass
class Comparison:
    reference: str
    contenders: list[str]
    datasets: list[str]
    within: Optional[int]
    last_fraction: float
    n_boot: int
    seed: int
    estimates: dict[tuple[str, str, str], Estimate] = field(default_factory=dict)  # (scope, contender, metric)
    differences: dict[tuple[str, str, str], PairedDifference] = field(default_factory=dict)  # (scope, other, metric)
    learning: dict[str, Learning] = field(default_factory=dict)  # scope -> the reference's learning

    @property
    def scopes(self) -> list[str]:
        return self.datasets + [ALL_DATASETS]

    @property
    def has_reference(self) -> bool:
        return self.reference in self.contenders


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error (sample std with ddof=1 over sqrt(n)) of ``values``; NaN where undefined."""
    arr = np.asarray(values, dtype=float)
    mean = float(np.mean(arr)) if arr.size else math.nan
    se = float(np.std(arr, ddof=1) / math.sqrt(arr.size)) if arr.size > 1 else math.nan
    return mean, se


def _estimate(by_seed: dict[int, float]) -> Estimate:
    seeds = sorted(by_seed)
    values = [float(by_seed[s]) for s in seeds]
    mean, se = mean_se(values)
    return Estimate(values, seeds, mean, se)


def _mean_difference(reference: np.ndarray, other: np.ndarray, axis: int = -1) -> np.ndarray:
    """The bootstrap statistic: the mean of the paired differences along ``axis`` (vectorised over resamples)."""
    return np.mean(reference - other, axis=axis)


def paired_difference(reference: Sequence[float], other: Sequence[float],
                      pairs: Optional[Sequence[tuple[str, int]]] = None, n_boot: int = 10000, seed: int = 0,
                      confidence: float = 0.95) -> PairedDifference:
    """``reference[i] − other[i]`` over paired values: mean, s.e. (ddof=1) and the paired bootstrap percentile
    interval of the mean difference (``scipy.stats.bootstrap`` with ``n_boot`` resamples and
    ``numpy.random.default_rng(seed)``); no s.e. / interval with fewer than 2 pairs."""
    ref = np.asarray(reference, dtype=float)
    oth = np.asarray(other, dtype=float)
    if ref.shape != oth.shape or ref.ndim != 1:
        raise ValueError("paired values need two 1-d sequences of the same length")
    pairs = list(pairs) if pairs is not None else [("", i) for i in range(ref.size)]
    mean, se = mean_se(ref - oth)
    out = PairedDifference(pairs, list(map(float, ref)), list(map(float, oth)), mean, se)
    if ref.size >= 2:
        from scipy.stats import bootstrap

        res = bootstrap((ref, oth), _mean_difference, n_resamples=n_boot, vectorized=True, paired=True,
                        confidence_level=confidence, method="percentile",
                        random_state=np.random.default_rng(seed))
        out.low, out.high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return out


def run_metrics(runs: Sequence[RunRecord], within: Optional[int] = None, last_fraction: float = 0.25,
                include_unfinished: bool = False) -> dict[str, dict[tuple[str, str, int], float]]:
    """Per metric (``best``, ``last_reward``, ``last_quality``, ``first_quality``) the value of every run that has
    one: ``{metric: {(contender, dataset, seed): value}}``. ``best`` is the best reward within ``within`` over the
    runs table.md uses; the others are :func:`etpo.report.runs._learning_values` over the runs learning.md uses."""
    if not 0.0 < last_fraction <= 1.0:
        raise ValueError("last_fraction must be in (0, 1]")
    out: dict[str, dict[tuple[str, str, int], float]] = {m: {} for m, _ in _SHOWN_METRICS}
    for r in _select(runs, within, include_unfinished):
        v = r.best_within(within)
        if v is not None:
            out["best"][(r.contender, r.dataset, r.seed)] = v
    for r in _select(runs, None, include_unfinished):
        learned = _learning_values(r, last_fraction)
        for m in ("last_reward", "last_quality", "first_quality"):
            if learned[m] is not None:
                out[m][(r.contender, r.dataset, r.seed)] = learned[m]
    return out


def comparison(
    runs: Sequence[RunRecord],
    reference: str = "etpo",
    within: Optional[int] = None,
    last_fraction: float = 0.25,
    n_boot: int = 10000,
    seed: int = 0,
    contenders: Optional[Sequence[str]] = None,
    datasets: Optional[Sequence[str]] = None,
    include_unfinished: bool = False,
) -> Comparison:
    """Every contender's mean ± s.e. per dataset and over all datasets, and ``reference`` − each other contender
    paired by (dataset, seed) with a bootstrap interval (statistics: see the module)."""
    values = run_metrics(runs, within, last_fraction, include_unfinished)
    keys = [k for per_run in values.values() for k in per_run]
    contenders = _order((c for c, _, _ in keys), contenders)
    datasets = _order((d for _, d, _ in keys), datasets)
    comp = Comparison(reference, list(contenders), list(datasets), within, last_fraction, n_boot, seed)
    for metric, per_run in values.items():
        for c in contenders:
            by_ds = {d: {s: v for (c2, d2, s), v in per_run.items() if c2 == c and d2 == d} for d in datasets}
            for d in datasets:
                if by_ds[d]:
                    comp.estimates[(d, c, metric)] = _estimate(by_ds[d])
            complete = sorted(set.intersection(*[set(v) for v in by_ds.values()])) if datasets else []
            if complete:
                comp.estimates[(ALL_DATASETS, c, metric)] = _estimate(
                    {s: float(np.mean([by_ds[d][s] for d in datasets])) for s in complete})
    if not comp.has_reference:
        return comp
    for metric, _ in COMPARED_METRICS:
        per_run = values[metric]
        for c in contenders:
            if c == reference:
                continue
            pooled: list[tuple[str, int]] = []
            for d in datasets:
                pairs = sorted(s for (c2, d2, s) in per_run if c2 == c and d2 == d and (reference, d, s) in per_run)
                pooled += [(d, s) for s in pairs]
                if pairs:
                    comp.differences[(d, c, metric)] = _paired(per_run, reference, c, [(d, s) for s in pairs],
                                                               n_boot, seed)
            if pooled:
                comp.differences[(ALL_DATASETS, c, metric)] = _paired(per_run, reference, c, pooled, n_boot, seed)
    first, last = values["first_quality"], values["last_quality"]
    # runs whose first batch ran nothing (not older summaries without the quality series: those say nothing)
    unstarted = [(r.dataset, r.seed) for r in _select(runs, None, include_unfinished)
                 if r.contender == reference and r.dataset in datasets
                 and _learning_values(r, last_fraction)["first_runnable"] == 0.0]
    for scope in comp.scopes:
        started = [(d, s) for (c, d, s) in first if c == reference and (scope == ALL_DATASETS or d == scope)
                   and d in datasets]
        both = sorted((p for p in started if (reference, *p) in last), key=lambda p: (datasets.index(p[0]), p[1]))
        lost = len(started) - len(both)
        no_start = sum(1 for d, s in unstarted if scope == ALL_DATASETS or d == scope)
        if both:
            change = [last[(reference, d, s)] - first[(reference, d, s)] for d, s in both]
            mean, se = mean_se(change)
            comp.learning[scope] = Learning(sum(x > 0 for x in change),
                                            Estimate(change, [s for _, s in both], mean, se), lost, no_start)
        elif lost or no_start:
            comp.learning[scope] = Learning(0, Estimate([], [], math.nan, math.nan), lost, no_start)
    return comp


def _paired(per_run: dict, reference: str, other: str, pairs: list[tuple[str, int]], n_boot: int,
            seed: int) -> PairedDifference:
    return paired_difference([per_run[(reference, d, s)] for d, s in pairs],
                             [per_run[(other, d, s)] for d, s in pairs], pairs, n_boot, seed)


def _num(x: float, digits: int, sign: bool = False) -> str:
    if x is None or math.isnan(x):
        return "—"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def _fmt_estimate(est: Optional[Estimate], digits: int, max_n: int) -> str:
    if est is None or est.n == 0:
        return "—"
    text = _num(est.mean, digits)
    if not math.isnan(est.se):
        text += f" ± {_num(est.se, digits)}"
    if est.n != max_n:
        text += f" (n={est.n})"
    return text


def comparison_markdown(
    runs: Sequence[RunRecord],
    reference: str = "etpo",
    within: Optional[int] = None,
    last_fraction: float = 0.25,
    n_boot: int = 10000,
    seed: int = 0,
    digits: int = 4,
    contenders: Optional[Sequence[str]] = None,
    datasets: Optional[Sequence[str]] = None,
    include_unfinished: bool = False,
) -> str:
    """:func:`comparison` as markdown (``comparison.md``): per dataset and for all datasets a table of mean ± s.e.
    per contender, then ``reference`` − each contender (mean difference, s.e., n pairs, 95 % bootstrap interval)
    and a line on the reference's learning (mean AUC of runnable answers, first batch against the last fraction)."""
    comp = comparison(runs, reference, within, last_fraction, n_boot, seed, contenders, datasets, include_unfinished)
    frac = f"{last_fraction:.0%}" if last_fraction < 1 else "all"
    title = {m: t.format(n=f"{within} steps", f=frac) for m, t in _SHOWN_METRICS}
    if within is None:
        title["best"] = "best reward (whole run)"
    lines = [f"## {reference} against each contender" if reference in comp.contenders else "## Contenders", ""]
    if not comp.contenders:
        return "\n".join(lines + ["No run counts.", ""])
    max_n = max((e.n for e in comp.estimates.values()), default=0)
    for scope in comp.scopes:
        header = ["contender"] + [title[m] for m, _ in _SHOWN_METRICS]
        lines += [f"### {scope}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for c in comp.contenders:
            cells = [_fmt_estimate(comp.estimates.get((scope, c, m)), digits, max_n) for m, _ in _SHOWN_METRICS]
            if any(x != "—" for x in cells):
                label = f"**{c}**" if c == reference else c
                lines.append("| " + " | ".join([label] + cells) + " |")
        lines.append("")
        diffs = [(c, m) for c in comp.contenders for m, _ in COMPARED_METRICS if (scope, c, m) in comp.differences]
        if diffs:
            header = [f"{reference} − contender", "metric", "mean difference", "s.e.", "n pairs", "95% bootstrap CI"]
            lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            for c, m in diffs:
                diff = comp.differences[(scope, c, m)]
                ci = (f"[{_num(diff.low, digits, True)}, {_num(diff.high, digits, True)}]"
                      if not math.isnan(diff.low) else "—")
                lines.append(f"| {c} | {title[m]} | {_num(diff.mean, digits, True)} | {_num(diff.se, digits)} | "
                             f"{diff.n} | {ci} |")
            lines.append("")
        learned = comp.learning.get(scope)
        if learned is not None:
            unit = "runs" if scope == ALL_DATASETS else "seeds"
            change = learned.change
            se = f" ± {_num(change.se, digits)}" if not math.isnan(change.se) else ""
            lost = (f" ({learned.lost} with no runnable answer in the last {frac})" if learned.lost else "")
            mean = (f"; mean (last − first) over the {change.n} with runnable answers in both = "
                    f"{_num(change.mean, digits, True)}{se}" if change.n else "")
            counted = change.n + learned.lost
            one = unit[:-1]
            unstarted = (f"{learned.no_start} {'more ' if counted else ''}{unit if learned.no_start > 1 else one} "
                         f"had no runnable answer in the first batch, so nothing to compare with."
                         if learned.no_start else "")
            line = f"Learning ({reference}): "
            if counted:
                line += (f"the last {frac} mean AUC of runnable answers exceeds the first batch's in "
                         f"{learned.improved} of {counted} {unit}{lost}{mean}." + (" " + unstarted if unstarted else ""))
            else:
                line += unstarted
            lines += [line, ""]
    if not comp.has_reference:
        lines += [f"No runs of the reference `{reference}`: no paired differences.", ""]
    best = (f"within {within} environment steps (at batch granularity)" if within is not None
            else "within each run's budget")
    lines += [
        f"Metrics per run: best reward explored {best} (the paper's metric; reward = validation ROC AUC, -1 = never "
        f"runnable); the average reward of the last {frac} of the batches (failures count -1); the mean reward of "
        f"the runnable answers (their mean validation AUC) of the last {frac} of the batches, pooled over the "
        "answers, and of the first batch (for reference).",
        f"Mean ± s.e. over seeds (s.e. = sample std, ddof=1, / √n); `(n=k)` marks a cell with fewer or more seeds "
        f"than the most ({max_n}); all datasets: per seed the mean over the datasets, then mean ± s.e. over the seeds "
        "that have every dataset.",
    ]
    if comp.has_reference:
        lines.append(
            f"{reference} − contender: runs paired by (dataset, seed) (the seeds share their train/validation "
            "splits), only pairs where both have a value; s.e. = std of the paired differences (ddof=1) / √n; 95% "
            f"CI = paired bootstrap percentile interval of the mean difference (scipy.stats.bootstrap, {n_boot} "
            f"resamples, seed {seed}); all datasets pools the pairs of every dataset as independent units; — = fewer "
            f"than 2 pairs. A positive difference favours {reference}.")
    return "\n".join(lines) + "\n"
