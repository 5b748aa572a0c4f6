"""Every figure of the report (matplotlib, Agg backend, imported only when a figure is drawn): Figure 3
(:func:`plot_best_within`, :func:`plot_best_within_per_dataset`: best reward explored within n steps), Figure 4
(:func:`plot_batch_rewards`, :func:`plot_batch_runnable`: per rollout batch), the quality of the runnable answers
per batch (:func:`plot_batch_quality`), where a batch's time goes (:func:`plot_timing`), their data
(:func:`best_within_curves`, :func:`batch_reward_curves`) and one run's ``reward_curve.png`` (:func:`plot_run_curve`,
drawn by ``etpo.fit``).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from etpo.report.runs import TIMING_PHASES, RunRecord, _by, _mean_timing, _order, _select

__all__ = [
    "best_within_curves", "plot_best_within", "plot_best_within_per_dataset", "batch_reward_curves",
    "plot_batch_rewards", "plot_batch_runnable", "plot_batch_quality", "plot_timing", "plot_run_curve", "BANDS",
    "check_band",
]

def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _colours(contenders: Sequence[str]) -> dict[str, str]:
    return {c: f"C{i % 10}" for i, c in enumerate(contenders)}


_DASHES = ("-", "--", ":", "-.")


def _line_styles(contenders: Sequence[str], width: float) -> dict[str, dict]:
    """Per contender a line style, width and drawing order for curves that often lie on one another (best within
    n is a step function that two contenders finding the same answer share to the last digit): each later
    contender is drawn narrower and dashed on top of the earlier ones, so a curve hidden under another's still
    shows at its edges."""
    n = max(1, len(contenders))
    return {c: {"ls": _DASHES[i % len(_DASHES)], "lw": width * (1.0 + 1.2 * (n - 1 - i) / n), "zorder": 2 + i}
            for i, c in enumerate(contenders)}


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


#: The bands a figure can draw around its mean over seeds.
BANDS = ("std", "se")


def check_band(band: str) -> None:
    """Refuse a band other than :data:`BANDS`' (before any figure is drawn)."""
    if band not in BANDS:
        raise ValueError(f"band must be one of {BANDS} (the std over seeds or the standard error), got {band!r}")


def _band_width(std: np.ndarray, count: np.ndarray, band: str) -> np.ndarray:
    """Half-width of the band: the std over seeds (``band="std"``, the paper's protocol: mean ± std over 5
    repetitions) or the standard error of the mean, std / sqrt(seeds) (``"se"``), where ``count`` seeds have a value
    (the std is 0 where fewer than ddof + 1 do, and so is the band)."""
    check_band(band)
    return std if band == "std" else std / np.sqrt(np.maximum(count, 1))


def _band_label(band: str, ddof: int) -> str:
    if band == "std":
        return f"mean ± std over seeds (ddof={ddof})"
    return "mean ± s.e. over seeds" + ("" if ddof == 1 else f" (std ddof={ddof} / √seeds)")


def best_within_curves(
    runs: Sequence[RunRecord], ddof: int = 1, within: Optional[int] = None, include_unfinished: bool = False,
    contenders: Optional[Sequence[str]] = None, datasets: Optional[Sequence[str]] = None,
) -> dict[str, dict]:
    """Figure-3 data per contender: ``{"n": grid, "mean", "std", "count" (seeds behind each point), "seeds":
    per-seed curves [S, len(grid)], "partial": bool, "datasets": the datasets averaged}``. Per seed the curve is the
    mean over datasets (only where every dataset of the contender has that seed covering n; when no seed is complete
    anywhere the per-seed mean over the available datasets is used and the curve is marked partial). The datasets
    are those every drawn contender has runs on, when they share any: a contender run on an easier dataset too would
    otherwise average higher for that alone (a sweep under way: one contender's second dataset done, another's not)."""
    used = _select(runs, within, include_unfinished)
    grouped = _by(used)
    datasets = _order((r.dataset for r in used), datasets)
    drawn = [c for c in _order(grouped, contenders) if any(d in datasets for d in grouped.get(c, {}))]
    shared = [d for d in datasets if all(d in grouped[c] for c in drawn)]
    if shared:
        datasets = shared
    out = {}
    for c in drawn:
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
        out[c] = {"n": grid, "mean": mean, "std": std, "count": np.sum(~np.isnan(per_seed_curves), axis=0),
                  "seeds": per_seed_curves, "partial": partial, "datasets": sorted(by_ds)}
    return out


def plot_best_within(
    runs: Sequence[RunRecord], path: str | Path, ddof: int = 1, within: Optional[int] = None,
    include_unfinished: bool = False, contenders: Optional[Sequence[str]] = None,
    datasets: Optional[Sequence[str]] = None, band: str = "std",
) -> Optional[Path]:
    """Figure 3: best reward explored within n steps vs. n; mean over seeds of the dataset average, with a band of
    ± one std over seeds (``band="std"``) or ± one standard error (``"se"``)."""
    check_band(band)
    curves = best_within_curves(runs, ddof, within, include_unfinished, contenders, datasets)
    if not curves:
        return None
    plt = _pyplot()
    drawn = _order(_by(runs), contenders)
    colours, styles = _colours(drawn), _line_styles(drawn, 1.5)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for c, cv in curves.items():
        ok = ~np.isnan(cv["mean"])
        label = c + (" (partial)" if cv["partial"] else "")
        ax.step(cv["n"][ok], cv["mean"][ok], where="post", color=colours.get(c), label=label, marker="o", ms=2.5,
                **styles[c])
        width = _band_width(cv["std"], cv["count"], band)
        ax.fill_between(cv["n"][ok], (cv["mean"] - width)[ok], (cv["mean"] + width)[ok], step="post",
                        color=colours.get(c), alpha=0.2, lw=0)
    ax.set_xlabel("environment steps n")
    averaged = sorted({d for cv in curves.values() for d in cv["datasets"]})
    left_out = sorted({r.dataset for r in runs if datasets is None or r.dataset in datasets} - set(averaged))
    ax.set_ylabel("best reward within n (mean over datasets)" if len(averaged) > 1 else
                  f"best reward within n ({averaged[0]})")
    if left_out:  # runs of a dataset not every contender has: in the per-dataset figure only
        ax.text(0.99, 0.01, f"averaged: {', '.join(averaged)} (every contender's); not: {', '.join(left_out)}",
                transform=ax.transAxes, ha="right", va="bottom", fontsize=6, color="0.4")
    ax.set_title(f"Best reward explored within n steps ({_band_label(band, ddof)})", fontsize=9)
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
    datasets: Optional[Sequence[str]] = None, band: str = "std",
) -> Optional[Path]:
    """Figure 3 per dataset: one panel per dataset, best-within-n's mean over seeds ± one std (``band="std"``) or
    one standard error (``"se"``)."""
    check_band(band)
    used = _select(runs, within, include_unfinished)
    if not used:
        return None
    grouped = _by(used)
    contenders = _order(grouped, contenders)
    datasets = _order((r.dataset for r in used), datasets)
    plt = _pyplot()
    drawn = _order(_by(runs), contenders)
    colours, styles = _colours(drawn), _line_styles(drawn, 1.3)
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
            width = _band_width(std, np.sum(~np.isnan(mat), axis=0), band)
            ok = ~np.isnan(mean)
            ax.step(grid[ok], mean[ok], where="post", color=colours.get(c), label=c, **styles[c])
            ax.fill_between(grid[ok], (mean - width)[ok], (mean + width)[ok], step="post", color=colours.get(c),
                            alpha=0.2, lw=0)
        ax.set_title(d, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    return _save_panels(fig, axes, "environment steps n", "best reward within n",
                        f"Best reward within n steps, per dataset; {_band_label(band, ddof)}", path)


def _save_panels(fig, axes, xlabel: str, ylabel: str, title: str, path) -> Path:
    """Shared legend (below the panels, where it hides no curve), axis labels and title of a multi-panel figure;
    write it to ``path``."""
    import matplotlib.pyplot as plt

    labels: dict[str, object] = {}  # every contender once, in the order the panels drew them
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            labels.setdefault(label, handle)
    rows = -(-len(labels) // 4) if labels else 0
    below = 0.2 * rows + 0.05 if labels else 0.0  # inches under the panels for the legend: ~0.2 a row at 7 pt
    height = fig.get_figheight() + below + 0.25  # the figure grows by the legend and the x label, not the panels
    fig.set_figheight(height)
    legend = below / height
    if labels:
        fig.legend(list(labels.values()), list(labels), loc="lower center", ncol=min(4, len(labels)), fontsize=7,
                   frameon=False)
    fig.supxlabel(xlabel, fontsize=9, y=legend, va="bottom")
    fig.supylabel(ylabel, fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, legend + 0.25 / height, 1, 1))
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def batch_reward_curves(
    runs: Sequence[RunRecord], ddof: int = 1, include_unfinished: bool = False,
    contenders: Optional[Sequence[str]] = None, datasets: Optional[Sequence[str]] = None,
    key: str = "batch_avg_reward",
) -> dict[str, dict[str, dict]]:
    """Figure-4 data: ``{panel: {contender: {"x", "mean", "std", "n"}}}`` with panels = datasets + ``average``
    (``n``: the number of seeds behind each point, for a standard error).

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
                panels[d][c] = {"x": np.nanmedian(xs[i], axis=0), "mean": mean, "std": std,
                                "n": np.sum(~np.isnan(cube[i]), axis=0)}
            complete = np.all(~np.isnan(cube), axis=0)
            per_seed = np.where(complete, np.mean(np.nan_to_num(cube), axis=0), np.nan)
            if np.all(np.isnan(per_seed)):
                per_seed = np.nanmean(cube, axis=0)
            mean, std = _mean_std(per_seed, ddof)
            panels["average"][c] = {"x": np.nanmedian(xs.reshape(-1, length), axis=0), "mean": mean, "std": std,
                                    "n": np.sum(~np.isnan(per_seed), axis=0)}
    return panels


def plot_batch_rewards(
    runs: Sequence[RunRecord], path: str | Path, ddof: int = 1, include_unfinished: bool = False,
    contenders: Optional[Sequence[str]] = None, datasets: Optional[Sequence[str]] = None,
    key: str = "batch_avg_reward", band: str = "std",
) -> Optional[Path]:
    """Figure 4: the average reward (or, with ``key="batch_runnable_fraction"``, the runnable fraction) of every
    rollout batch during training, one panel per dataset plus the average; mean over seeds with a band of ± one std
    (``band="std"``) or one standard error (``"se"``)."""
    check_band(band)
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
            width = _band_width(cv["std"], cv["n"], band)
            ax.fill_between(cv["x"][ok], (cv["mean"] - width)[ok], (cv["mean"] + width)[ok],
                            color=colours.get(c), alpha=0.2, lw=0)
        ax.set_title("average over datasets" if name == "average" else name, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    if key == "batch_runnable_fraction":
        ylabel, title = "runnable fraction of the batch", "Runnable fraction per rollout batch"
    else:
        ylabel, title = "average reward of the batch", "Average reward per rollout batch (-1 = not runnable)"
    return _save_panels(fig, axes, "environment steps", ylabel, f"{title}; {_band_label(band, ddof)}", path)


def plot_batch_runnable(runs: Sequence[RunRecord], path: str | Path, **kw) -> Optional[Path]:
    """:func:`plot_batch_rewards` of the runnable fraction."""
    return plot_batch_rewards(runs, path, key="batch_runnable_fraction", **kw)


def plot_batch_quality(
    runs: Sequence[RunRecord], path: str | Path, include_unfinished: bool = False,
    contenders: Optional[Sequence[str]] = None, datasets: Optional[Sequence[str]] = None,
) -> Optional[Path]:
    """The quality of the answers apart from runnability: the mean reward of every rollout batch's runnable answers
    (``batch_runnable_reward``: their mean validation AUC), one panel per dataset plus the average, mean over seeds
    ± one standard error (sample std, ddof=1, / sqrt(seeds)). A batch in which no answer ran has no value: the line
    has a gap there. The y-axis follows the data (no -1 of failed answers). None when no run has the series."""
    panels = batch_reward_curves(runs, 1, include_unfinished, contenders, datasets, "batch_runnable_reward")
    if not any(np.any(~np.isnan(cv["mean"])) for panel in panels.values() for cv in panel.values()):
        return None
    plt = _pyplot()
    colours = _colours(_order(_by(runs), contenders))
    names = ["average"] + [p for p in panels if p != "average"]
    fig, axes = _grid_axes(plt, len(names))
    for ax, name in zip(axes, names):
        for c, cv in panels[name].items():
            ok = ~np.isnan(cv["mean"]) & ~np.isnan(cv["x"])
            if not np.any(ok):
                continue
            se = _band_width(cv["std"], cv["n"], "se")  # std is 0 where a single seed has the batch
            mean = np.where(ok, cv["mean"], np.nan)
            ax.plot(cv["x"], mean, color=colours.get(c), label=c, lw=1.3, marker="o", ms=2)  # NaN = a gap
            ax.fill_between(cv["x"], mean - se, mean + se, where=ok, color=colours.get(c), alpha=0.2, lw=0)
        ax.set_title("average over datasets" if name == "average" else name, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    return _save_panels(fig, axes, "environment steps", "mean reward of runnable answers",
                        "Mean reward of runnable answers per rollout batch (validation AUC; gap = none ran); "
                        "mean ± s.e. over seeds", path)


def plot_timing(
    runs: Sequence[RunRecord], path: str | Path, include_unfinished: bool = False,
    contenders: Optional[Sequence[str]] = None, datasets: Optional[Sequence[str]] = None,
) -> Optional[Path]:
    """Where a rollout batch's time goes, per contender: the mean seconds per batch of generation, environment and
    update (``batch_timing``) as stacked bars, each the mean over the contender's runs of their per-batch means (a
    phase a run did not record counts for none of its runs). None when no run has ``batch_timing``."""
    used = [r for r in _select(runs, None, include_unfinished) if not datasets or r.dataset in datasets]
    grouped = _by(used)
    means: dict[str, dict[str, float]] = {}
    for c in _order(grouped, contenders):
        timings = [_mean_timing(r) for per_seed in grouped.get(c, {}).values() for r in per_seed.values()]
        phases = {p: [t[p] for t in timings if t[p] is not None] for p in TIMING_PHASES}
        if any(phases.values()):
            means[c] = {p: float(np.mean(v)) if v else 0.0 for p, v in phases.items()}
    if not means:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 1.3 * len(means) + 2.0), 4.0), dpi=120)
    names = list(means)
    bottom = np.zeros(len(names))
    for i, phase in enumerate(TIMING_PHASES):
        height = np.asarray([means[c][phase] for c in names])
        ax.bar(names, height, bottom=bottom, color=f"C{i}", label=phase.removesuffix("_s"))
        bottom += height
    for k, total in enumerate(bottom):
        ax.text(k, total, f"{total:.1f} s", ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, 1.2 * max(float(bottom.max()), 1e-9))  # room for the totals and the legend
    ax.set_ylabel("seconds per rollout batch")
    ax.set_title("Mean seconds per rollout batch by phase (mean over runs)", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_run_curve(summary: dict, path: str | Path) -> Optional[Path]:
    """One run's learning curve (``reward_curve.png`` of every run directory), one point per rollout batch against
    environment steps: on top the *quality* of the answers that ran -- their mean reward (for the data-science env,
    the mean validation AUC of runnable code), the batch's best and the best so far, on the reward's own scale --
    then the average reward (failures count -1) and the runnable fraction."""
    rewards = list(summary.get("batch_avg_reward") or [])
    if not rewards:
        return None
    runnable = list(summary.get("batch_runnable_fraction") or [])
    steps = [int(x[0]) for x in summary.get("best_within") or []][: len(rewards)] or list(range(1, len(rewards) + 1))
    finite = lambda x: float(x) if x is not None and math.isfinite(float(x)) else float("nan")  # noqa: E731
    best = [finite(x[1]) for x in summary.get("best_within") or []][: len(rewards)]
    quality = [finite(x) for x in summary.get("batch_runnable_reward") or []][: len(rewards)]
    batch_best = [finite(x) for x in summary.get("batch_max_reward") or []][: len(rewards)]
    plt = _pyplot()
    fig, (top, middle, bottom) = plt.subplots(3, 1, figsize=(6.0, 7.0), sharex=True,
                                              gridspec_kw={"height_ratios": [1.3, 1.0, 0.8]})
    if quality:
        top.plot(steps[: len(quality)], quality, marker="o", lw=1.5, color="tab:purple",
                 label="mean reward of the runnable answers")
    if batch_best:
        top.plot(steps[: len(batch_best)], batch_best, marker=".", lw=0.8, color="tab:gray", label="best of the batch")
    if best:
        top.plot(steps, best, ls="--", lw=1.2, color="tab:orange", label="best so far")
    shown = [v for v in quality + batch_best + best if math.isfinite(v) and v > -1.0]
    if shown:  # the quality scale: the rewards of answers that ran, not the -1 of those that did not
        low, high = min(shown), max(shown)
        pad = max(0.005, 0.1 * (high - low))
        top.set_ylim(low - pad, high + pad)
    top.set_ylabel("reward of runnable answers")
    top.legend(fontsize=8)
    top.grid(alpha=0.3)
    middle.plot(steps, rewards, marker="o", lw=1.5, label="average reward of the batch")
    middle.set_ylabel("average reward\n(-1 = not runnable)")
    middle.grid(alpha=0.3)
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
