"""etpo.report: Table 2 / Figure 3 / Figure 4, the learning table and the comparison with ETPO (mean ± s.e., paired
differences, scipy's paired bootstrap) from small fake run summaries with known numbers."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import scipy.stats

from etpo import report

CONTENDERS = ["reflection", "etpo"]
DATASETS = ["breast_w", "cmc", "pc1"]
SEEDS = [0, 1, 2]
BATCH = 16        # env steps per rollout batch
BATCHES = 4       # budget 64


def final_best(c: int, d: int, s: int) -> float:
    """A known, distinct number per (contender, dataset, seed)."""
    return round(0.6 + 0.1 * d + 0.03 * c + 0.007 * s + 0.001 * ((c + 2 * d + 3 * s) % 5), 6)


def runnable_of(k: int, seed: int, avg_offset: float) -> float:
    """The fixture's runnable fraction of batch k (0 for batch 0 of reflection seed 0: no answer ran there)."""
    return round(0.1 * k + 0.01 * seed + avg_offset, 6)


def quality_of(k: int, seed: int, q_offset: float) -> float:
    """The fixture's mean reward of the runnable answers of batch k (when any ran): a ramp, noisy over seeds."""
    return round(0.6 + 0.01 * k + 0.003 * ((seed + 2 * k) % 4) + q_offset, 6)


def write_summary(root: Path, contender: str, dataset: str, seed: int, best: float, *, finished: bool = True,
                  batches: int = BATCHES, avg_offset: float = 0.0, q_offset: float = 0.0, new_keys: bool = True,
                  update: bool = True) -> Path:
    """A fake run; ``new_keys=False`` writes an older summary without batch_runnable_reward / batch_max_reward /
    batch_timing, ``update=False`` timing without update_s (a contender that does not learn)."""
    run_dir = root / contender / dataset / f"seed{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    # best-within curve rising to `best`; batch rewards a known ramp
    curve = [[BATCH * (k + 1), round(best - 0.05 * (batches - 1 - k), 6)] for k in range(batches)]
    avg = [round(-1.0 + 0.3 * k + avg_offset, 6) for k in range(batches)]
    runnable = [runnable_of(k, seed, avg_offset) for k in range(batches)]
    summary = {"contender": "ignored-by-layout", "model_class": "x.Y", "dataset": dataset, "seed": seed,
               "env_steps": BATCH * batches, "budget": BATCH * BATCHES, "best_reward": curve[-1][1],
               "best_code": "print(1)", "runnable_fraction": 0.5, "wall_time_s": 1.0, "finished": finished,
               "best_within": curve, "batch_avg_reward": avg, "batch_runnable_fraction": runnable}
    if new_keys:
        summary["batch_runnable_reward"] = [quality_of(k, seed, q_offset) if runnable[k] > 0 else None
                                            for k in range(batches)]
        summary["batch_max_reward"] = [round(best - 0.01, 6)] * batches
        summary["batch_timing"] = [{"generation_s": 10.0 + k, "environment_s": 2.0 + 0.5 * seed,
                                    "generated_tokens": 100, **({"update_s": 3.0} if update else {})}
                                   for k in range(batches)]
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


def q_offset(c: int, d: int) -> float:
    return 0.05 * d + 0.02 * c


@pytest.fixture
def runs_root(tmp_path) -> Path:
    root = tmp_path / "runs"
    for c, contender in enumerate(CONTENDERS):
        for d, dataset in enumerate(DATASETS):
            for s in SEEDS:
                if contender == "etpo" and dataset == "cmc" and s == 2:
                    continue  # one missing run: the cell has n=2 and seed 2 is not complete for etpo
                write_summary(root, contender, dataset, s, final_best(c, d, s), avg_offset=0.1 * c,
                              q_offset=q_offset(c, d), update=contender == "etpo")
    # an unfinished run: left out by default
    write_summary(root, "etpo", "cmc", 2, 0.123, finished=False, batches=2)
    return root


def test_table_means_and_stds_match_numpy(runs_root):
    runs = report.load_runs(runs_root)
    assert len(runs) == 18  # 17 finished + the unfinished etpo/cmc/seed2
    table = report.build_table(runs, ddof=1, contenders=CONTENDERS)
    assert table.contenders == CONTENDERS and table.datasets == sorted(DATASETS)
    for c, contender in enumerate(CONTENDERS):
        for d, dataset in enumerate(DATASETS):
            seeds = [s for s in SEEDS if not (contender == "etpo" and dataset == "cmc" and s == 2)]
            vals = np.array([final_best(c, d, s) for s in seeds])
            cell = table.cells[(dataset, contender)]
            assert cell.seeds == seeds
            assert cell.mean == pytest.approx(np.mean(vals), abs=1e-12)
            assert cell.std == pytest.approx(np.std(vals, ddof=1), abs=1e-12)
    # average row: per seed the mean over datasets (only seeds with every dataset), then mean/std over seeds
    for c, contender in enumerate(CONTENDERS):
        complete = [0, 1] if contender == "etpo" else SEEDS
        per_seed = np.array([np.mean([final_best(c, d, s) for d in range(len(DATASETS))]) for s in complete])
        avg = table.average[contender]
        assert avg.seeds == complete
        assert avg.mean == pytest.approx(np.mean(per_seed), abs=1e-12)
        assert avg.std == pytest.approx(np.std(per_seed, ddof=1), abs=1e-12)

    pop = report.build_table(runs, ddof=0)
    vals = np.array([final_best(0, 0, s) for s in SEEDS])
    assert pop.cells[("breast_w", "reflection")].std == pytest.approx(np.std(vals, ddof=0), abs=1e-12)


def test_within_n_and_unfinished_runs(runs_root):
    runs = report.load_runs(runs_root)
    # within 32 steps = the 2nd batch of every curve: best - 0.05 * 2
    t32 = report.build_table(runs, within=32)
    vals = np.array([final_best(1, 1, s) - 0.1 for s in [0, 1]] + [0.123])  # the unfinished run has 32 steps
    cell = t32.cells[("cmc", "etpo")]
    assert cell.n == 3 and cell.mean == pytest.approx(np.mean(vals), abs=1e-9)
    # whole-run table ignores the unfinished run unless asked
    assert report.build_table(runs).cells[("cmc", "etpo")].n == 2
    assert report.build_table(runs, include_unfinished=True).cells[("cmc", "etpo")].n == 3


def test_markdown_csv_and_plots(runs_root, tmp_path):
    out = tmp_path / "report"
    written = report.write_report(runs_root, out, contenders=CONTENDERS, paper=True)
    md = (out / "table.md").read_text()
    table = report.build_table(report.load_runs(runs_root), contenders=CONTENDERS)
    refl = table.cells[("breast_w", "reflection")]
    assert f"{refl.mean:.4f} ± {refl.std:.4f}" in md
    assert "(n=2)" in md and "| **average** |" in md and "paper ETPO" in md and "ddof=1" in md
    assert sum(line.startswith("| ") for line in md.splitlines()) == 1 + len(DATASETS) + 1  # header, rows, average

    with open(out / "table.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["dataset"] for r in rows] == sorted(DATASETS) + ["average"]
    avg = rows[-1]
    assert float(avg["etpo_mean"]) == pytest.approx(table.average["etpo"].mean)
    assert float(avg["etpo_std"]) == pytest.approx(table.average["etpo"].std)
    assert int(avg["etpo_n"]) == 2 and int(avg["reflection_n"]) == 3
    with open(out / "runs.csv") as fh:
        run_rows = list(csv.DictReader(fh))
    assert len(run_rows) == 18
    # each run's own learning values are those the learning table averages
    cells = report.learning_table(report.load_runs(runs_root))
    for (contender, dataset, column), cell in cells.items():
        column = {"best": "best_reward"}.get(column, column)
        got = [float(r[column]) for r in run_rows if r["contender"] == contender and r["dataset"] == dataset
               and r["finished"] == "True" and r[column] != ""]  # the table, like this, leaves the unfinished run
        # out, and a run without a value (no answer of its first batch ran)
        assert np.mean(got) == pytest.approx(cell.mean), (contender, dataset, column)
    assert all((Path.cwd() / r["run_dir"] / "summary.json").is_file() for r in run_rows)
    comparison = written["comparison.md"].read_text()
    assert comparison == report.comparison_markdown(report.load_runs(runs_root), contenders=CONTENDERS)
    assert "### all datasets" in comparison and "| **etpo** |" in comparison

    import matplotlib.image as mpimg

    for name in ("best_within.png", "best_within_per_dataset.png", "batch_reward.png", "batch_quality.png",
                 "timing.png"):
        path = written[name]
        assert path.is_file() and path.stat().st_size > 10_000, name
        img = mpimg.imread(path)
        assert img.shape[0] > 200 and img.shape[1] > 200 and float(img[..., :3].std()) > 0.01, name


def test_runs_csv_names_run_dirs_relative_to_the_working_directory(runs_root, tmp_path, monkeypatch):
    monkeypatch.chdir(runs_root.parent)
    report.write_runs_csv(report.load_runs(runs_root), tmp_path / "runs.csv")
    with open(tmp_path / "runs.csv") as fh:
        shown = [r["run_dir"] for r in csv.DictReader(fh)]
    assert shown and all(not Path(d).is_absolute() and Path(d).parts[0] == runs_root.name for d in shown)
    assert all((runs_root.parent / d / "summary.json").is_file() for d in shown)


def test_curves_match_hand_computation(runs_root):
    runs = report.load_runs(runs_root)
    curves = report.best_within_curves(runs, ddof=1, contenders=CONTENDERS)
    cv = curves["reflection"]
    assert list(cv["n"]) == [16, 32, 48, 64] and not cv["partial"]
    expect = np.array([[np.mean([final_best(0, d, s) - 0.05 * (3 - k) for d in range(3)]) for k in range(4)]
                       for s in SEEDS])
    np.testing.assert_allclose(cv["mean"], expect.mean(0), atol=1e-9)
    np.testing.assert_allclose(cv["std"], expect.std(0, ddof=1), atol=1e-9)

    panels = report.batch_reward_curves(runs, contenders=CONTENDERS)
    assert set(panels) == set(DATASETS) | {"average"}
    np.testing.assert_allclose(panels["average"]["etpo"]["mean"], [-1.0 + 0.3 * k + 0.1 for k in range(4)],
                               atol=1e-9)
    np.testing.assert_allclose(panels["cmc"]["etpo"]["x"], [16, 32, 48, 64])


def test_the_pooled_curve_averages_the_datasets_every_contender_has(runs_root):
    """A sweep under way: etpo's runs on pc1 are not there yet. Averaging each contender over its own datasets would
    set reflection's three-dataset mean against etpo's two; the pooled curve averages the two both have."""
    import shutil

    shutil.rmtree(runs_root / "etpo" / "pc1")
    runs = report.load_runs(runs_root)
    curves = report.best_within_curves(runs, ddof=1, contenders=CONTENDERS)
    assert curves["reflection"]["datasets"] == curves["etpo"]["datasets"] == ["breast_w", "cmc"]
    for c, name in enumerate(CONTENDERS):
        seeds = [0, 1] if name == "etpo" else SEEDS  # etpo's cmc seed 2 is missing (the fixture)
        expect = np.array([[np.mean([final_best(c, d, s) - 0.05 * (3 - k) for d in range(2)]) for k in range(4)]
                           for s in seeds])
        np.testing.assert_allclose(curves[name]["mean"], expect.mean(0), atol=1e-9)
    # with all datasets present, nothing is left out (the hand computation above covers all three)
    assert report.best_within_curves(report.load_runs(runs_root), contenders=["reflection"])["reflection"][
        "datasets"] == DATASETS


def _fill_between_spy(monkeypatch) -> list:
    """Record every band a figure draws: (x, lower, upper) per ``fill_between`` call, in drawing order."""
    import matplotlib.axes

    drawn, original = [], matplotlib.axes.Axes.fill_between

    def spy(self, x, y1, y2=0, **kw):
        drawn.append((np.asarray(x, float), np.asarray(y1, float), np.asarray(y2, float)))
        return original(self, x, y1, y2, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "fill_between", spy)
    return drawn


@pytest.mark.parametrize("band", ["std", "se"])
def test_best_within_band_is_the_std_or_the_standard_error(runs_root, tmp_path, monkeypatch, band):
    """Figure 3's band around the mean over seeds is one sample std, or with ``band="se"`` one standard error
    (std / sqrt(seeds)): checked on what is drawn, against numpy on the fixture's known per-seed curves."""
    drawn = _fill_between_spy(monkeypatch)
    runs = report.load_runs(runs_root)
    assert report.plot_best_within(runs, tmp_path / "f.png", contenders=CONTENDERS, band=band) is not None
    per_seed = np.array([[np.mean([final_best(0, d, s) - 0.05 * (3 - k) for d in range(3)]) for k in range(4)]
                         for s in SEEDS])  # reflection: drawn first
    half = per_seed.std(0, ddof=1) / (np.sqrt(len(SEEDS)) if band == "se" else 1.0)
    x, lower, upper = drawn[0]
    np.testing.assert_allclose(x, [16, 32, 48, 64])
    np.testing.assert_allclose(upper - per_seed.mean(0), half, atol=1e-9)
    np.testing.assert_allclose(per_seed.mean(0) - lower, half, atol=1e-9)

    drawn.clear()  # per dataset and per batch: the same rule, seeds counted where the point has them
    assert report.plot_best_within_per_dataset(runs, tmp_path / "d.png", contenders=CONTENDERS, band=band)
    first = np.array([[final_best(0, 0, s) - 0.05 * (3 - k) for k in range(4)] for s in SEEDS])  # reflection, breast_w
    np.testing.assert_allclose(drawn[0][2] - first.mean(0),
                               first.std(0, ddof=1) / (np.sqrt(len(SEEDS)) if band == "se" else 1.0), atol=1e-9)
    with pytest.raises(ValueError, match="band must be one of"):
        report.plot_batch_rewards(runs, tmp_path / "b.png", band="sem")


def test_a_bad_band_writes_nothing(runs_root, tmp_path):
    with pytest.raises(ValueError, match="band must be one of"):
        report.write_report(runs_root, tmp_path / "out", band="95%")
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):  # argparse names the choices
        report.main([str(runs_root), "--out", str(tmp_path / "out"), "--band", "95%"])


def test_cli(runs_root, tmp_path, capsys):
    assert report.main([str(runs_root), "--out", str(tmp_path / "o"), "--within", "48", "--ddof", "0",
                        "--n_boot", "200", "--last_fraction", "0.5", "--band", "se"]) == 0
    text = capsys.readouterr().out
    assert "within 48 environment steps" in text and (tmp_path / "o" / "batch_reward.png").is_file()
    comparison = (tmp_path / "o" / "comparison.md").read_text()
    assert "200 resamples" in comparison and "best reward within 48 steps" in comparison
    assert "last 50%: mean AUC of runnable" in comparison
    assert comparison.startswith("## etpo against each contender")
    assert report.main([str(runs_root), "--out", str(tmp_path / "r"), "--n_boot", "200", "--reference",
                        "reflection"]) == 0  # an ablation's variant against the base, say: reference − contender
    comparison = (tmp_path / "r" / "comparison.md").read_text()
    assert comparison.startswith("## reflection against each contender") and "| reflection − contender |" in comparison
    assert report.main([str(tmp_path / "missing")]) == 2


def test_empty_folder(tmp_path):
    written = report.write_report(tmp_path, tmp_path / "out")
    assert set(written) == {"table.md", "table.csv", "runs.csv", "learning.md", "comparison.md",
                            "settings.md"}  # no plot
    assert "No run counts" in (tmp_path / "out" / "comparison.md").read_text()


def test_learning_table_matches_numpy(runs_root, tmp_path):
    """First-batch runnable fraction, last-quarter runnable fraction and reward (at least one batch), best reward:
    mean and sample std over seeds, against numpy on the fixture's known series."""
    runs = report.load_runs(runs_root)
    cells = report.learning_table(runs, last_fraction=0.25, ddof=1)
    for c, contender in enumerate(CONTENDERS):
        for d, dataset in enumerate(DATASETS):
            seeds = [s for s in SEEDS if not (contender == "etpo" and dataset == "cmc" and s == 2)]
            off = 0.1 * c
            first = [0.01 * s + off for s in seeds]
            last_run = [0.1 * (BATCHES - 1) + 0.01 * s + off for s in seeds]  # 25 % of 4 batches = the last one
            last_rew = [-1.0 + 0.3 * (BATCHES - 1) + off for _ in seeds]
            for column, want in (("first_runnable", first), ("last_runnable", last_run), ("last_reward", last_rew)):
                cell = cells[(contender, dataset, column)]
                assert cell.seeds == seeds
                assert cell.mean == pytest.approx(np.mean(want), abs=1e-9)
                assert cell.std == pytest.approx(np.std(want, ddof=1), abs=1e-9)
    half = report.learning_table(runs, last_fraction=0.5)[("reflection", "pc1", "last_runnable")]
    assert half.mean == pytest.approx(np.mean([np.mean([0.2 + 0.01 * s, 0.3 + 0.01 * s]) for s in SEEDS]))
    md = report.learning_markdown(runs, 0.25)
    assert "last 25%: runnable" in md and md.count("| breast_w |") == 2
    written = report.write_report(runs_root, tmp_path / "out", runs=runs)
    assert {"learning.md", "batch_runnable.png"} <= set(written)
    with pytest.raises(ValueError, match="last_fraction"):
        report.learning_table(runs, last_fraction=0.0)


# ----------------------------------------------------------------------------------------------------------------
# the quality of the runnable answers, the comparison with ETPO, timing
# ----------------------------------------------------------------------------------------------------------------

def _rows(path: Path) -> list[dict]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_quality_pools_the_runnable_answers_of_the_last_batches(tmp_path):
    """first_quality / last_quality against a plain hand computation: batches whose answers all failed (runnable
    fraction 0, a null mean) have no mean to weigh; the others are weighed by their runnable answers."""
    root = tmp_path / "runs"
    series = {0: ([0.0, 0.5, 0.25, 0.0, 1.0, 0.75], [None, 0.7, 0.9, None, 0.6, 0.8]),
              1: ([0.5, 0.25, 0.0, 0.0], [0.65, 0.7, None, None])}  # seed 1: nothing ran in its last half
    for seed, (runnable, quality) in series.items():
        run_dir = write_summary(root, "etpo", "cmc", seed, 0.8, batches=len(runnable))
        summary = json.loads((run_dir / "summary.json").read_text())
        summary.update(batch_runnable_fraction=runnable, batch_runnable_reward=quality)
        (run_dir / "summary.json").write_text(json.dumps(summary))
    runs = report.load_runs(root)
    report.write_runs_csv(runs, tmp_path / "runs.csv", last_fraction=0.5)
    rows = {int(r["seed"]): r for r in _rows(tmp_path / "runs.csv")}
    # seed 0: the last half = batches 3, 4, 5; batch 3 ran nothing
    want = (0.6 * 1.0 + 0.8 * 0.75) / (1.0 + 0.75)
    assert float(rows[0]["last_quality"]) == pytest.approx(want, abs=1e-12)
    assert abs(want - (0.6 + 0.8) / 2) > 0.01  # pooling differs from the plain mean of the batch means
    assert rows[0]["first_quality"] == ""  # nothing of the first batch ran
    assert rows[1]["last_quality"] == "" and float(rows[1]["first_quality"]) == pytest.approx(0.65)
    # the whole run: every batch that ran, weighed
    whole = {0: (0.7 * 0.5 + 0.9 * 0.25 + 0.6 * 1.0 + 0.8 * 0.75) / (0.5 + 0.25 + 1.0 + 0.75),
             1: (0.65 * 0.5 + 0.7 * 0.25) / (0.5 + 0.25)}
    cell = report.learning_table(runs, last_fraction=1.0)[("etpo", "cmc", "last_quality")]
    assert cell.seeds == [0, 1] and cell.mean == pytest.approx(np.mean(list(whole.values())), abs=1e-12)
    half = report.learning_table(runs, last_fraction=0.5)
    assert half[("etpo", "cmc", "last_quality")].seeds == [0]
    assert half[("etpo", "cmc", "first_quality")].seeds == [1]
    md = report.learning_markdown(runs, 0.5)
    assert "first batch: mean AUC of runnable" in md and "last 50%: mean AUC of runnable" in md


LAST = 0.5  # the comparison tests use the last half: two batches of four, so the pooling counts


def seeds_of(contender: str, dataset: str) -> list[int]:
    """The fixture's finished runs (etpo/cmc/seed2 did not finish)."""
    return [s for s in SEEDS if not (contender == "etpo" and dataset == "cmc" and s == 2)]


def hand_values(c: int, d: int, s: int) -> dict:
    """The fixture run's metrics by hand: best reward, average reward and pooled mean AUC of the runnable answers of
    the last half of the batches, mean AUC of the runnable answers of the first batch (None when none ran)."""
    avg_offset, qo = 0.1 * c, q_offset(c, d)
    tail = range(BATCHES - int(LAST * BATCHES), BATCHES)
    num = sum(quality_of(k, s, qo) * runnable_of(k, s, avg_offset) for k in tail if runnable_of(k, s, avg_offset) > 0)
    den = sum(runnable_of(k, s, avg_offset) for k in tail if runnable_of(k, s, avg_offset) > 0)
    return {"best": final_best(c, d, s),
            "last_reward": sum(-1.0 + 0.3 * k + avg_offset for k in tail) / len(tail),
            "last_quality": num / den if den else None,
            "first_quality": quality_of(0, s, qo) if runnable_of(0, s, avg_offset) > 0 else None}


def test_comparison_mean_and_standard_error_match_numpy(runs_root):
    runs = report.load_runs(runs_root)
    comp = report.comparison(runs, last_fraction=LAST, n_boot=200, contenders=CONTENDERS)
    assert comp.contenders == CONTENDERS and comp.datasets == sorted(DATASETS)
    for c, contender in enumerate(CONTENDERS):
        per_seed: dict[str, dict[int, list]] = {}
        for d, dataset in enumerate(DATASETS):
            for metric in ("best", "last_reward", "last_quality", "first_quality"):
                got = {s: hand_values(c, d, s)[metric] for s in seeds_of(contender, dataset)}
                got = {s: v for s, v in got.items() if v is not None}
                est = comp.estimates[(dataset, contender, metric)]
                vals = np.array([got[s] for s in sorted(got)])
                assert est.seeds == sorted(got), (contender, dataset, metric)
                assert est.mean == pytest.approx(vals.mean(), abs=1e-12)
                assert est.se == pytest.approx(vals.std(ddof=1) / np.sqrt(vals.size), abs=1e-12)
                for s, v in got.items():
                    per_seed.setdefault(metric, {}).setdefault(s, []).append(v)
        # all datasets: per seed the mean over the datasets, over the seeds that have every dataset
        for metric, by_seed in per_seed.items():
            complete = sorted(s for s, v in by_seed.items() if len(v) == len(DATASETS))
            vals = np.array([np.mean(by_seed[s]) for s in complete])
            est = comp.estimates[("all datasets", contender, metric)]
            assert est.seeds == complete, (contender, metric)
            assert est.mean == pytest.approx(vals.mean(), abs=1e-12)
            assert est.se == pytest.approx(vals.std(ddof=1) / np.sqrt(vals.size), abs=1e-12)
    assert comp.estimates[("all datasets", "etpo", "best")].seeds == [0, 1]
    assert comp.estimates[("all datasets", "reflection", "first_quality")].seeds == [1, 2]  # seed 0: none ran
    md = report.comparison_markdown(runs, last_fraction=LAST, n_boot=200, contenders=CONTENDERS)
    est = comp.estimates[("pc1", "reflection", "last_quality")]
    assert f"{est.mean:.4f} ± {est.se:.4f}" in md
    est = comp.estimates[("cmc", "etpo", "last_reward")]
    assert f"{est.mean:.4f} ± {est.se:.4f} (n=2)" in md
    assert md.count("### ") == len(DATASETS) + 1


def _bootstrap(ref: np.ndarray, other: np.ndarray, n_boot: int, seed: int):
    return scipy.stats.bootstrap((ref, other), lambda x, y, axis: np.mean(x - y, axis=axis), paired=True,
                                 vectorized=True, method="percentile", n_resamples=n_boot,
                                 random_state=np.random.default_rng(seed)).confidence_interval


def test_paired_differences_and_bootstrap_interval(runs_root):
    """etpo − reflection paired by (dataset, seed): the unpaired reflection/cmc/seed2 is dropped; mean and s.e. of
    the paired differences against numpy; the interval equals scipy's paired percentile bootstrap called here on
    pairs built independently, and contains the mean difference."""
    n_boot, seed = 2000, 7
    runs = report.load_runs(runs_root)
    comp = report.comparison(runs, last_fraction=LAST, n_boot=n_boot, seed=seed, contenders=CONTENDERS)
    assert comp.estimates[("cmc", "reflection", "best")].n == 3  # reflection has seed 2 of cmc; etpo does not
    for metric in ("best", "last_reward", "last_quality"):
        pooled_ref, pooled_other, pooled_pairs = [], [], []
        for d, dataset in enumerate(DATASETS):
            pairs = [s for s in seeds_of("etpo", dataset)
                     if hand_values(1, d, s)[metric] is not None and hand_values(0, d, s)[metric] is not None]
            ref = np.array([hand_values(1, d, s)[metric] for s in pairs])
            other = np.array([hand_values(0, d, s)[metric] for s in pairs])
            diff = comp.differences[(dataset, "reflection", metric)]
            assert diff.pairs == [(dataset, s) for s in pairs], (dataset, metric)
            assert diff.mean == pytest.approx(np.mean(ref - other), abs=1e-12)
            assert diff.se == pytest.approx(np.std(ref - other, ddof=1) / np.sqrt(len(pairs)), abs=1e-12)
            ci = _bootstrap(ref, other, n_boot, seed)
            assert (diff.low, diff.high) == (pytest.approx(ci.low, abs=1e-12), pytest.approx(ci.high, abs=1e-12))
            assert diff.low <= diff.mean <= diff.high
            pooled_ref += list(ref)
            pooled_other += list(other)
            pooled_pairs += [(dataset, s) for s in pairs]
        diff = comp.differences[("all datasets", "reflection", metric)]
        ref, other = np.array(pooled_ref), np.array(pooled_other)
        assert diff.pairs == pooled_pairs and diff.n == 8  # 9 reflection runs, 8 with an etpo partner
        assert diff.mean == pytest.approx(np.mean(ref - other), abs=1e-12)
        assert diff.se == pytest.approx(np.std(ref - other, ddof=1) / np.sqrt(diff.n), abs=1e-12)
        ci = _bootstrap(ref, other, n_boot, seed)
        assert (diff.low, diff.high) == (pytest.approx(ci.low, abs=1e-12), pytest.approx(ci.high, abs=1e-12))
        assert diff.low <= diff.mean <= diff.high < np.max(ref - other) + 1e-12
    assert comp.differences[("cmc", "reflection", "best")].pairs == [("cmc", 0), ("cmc", 1)]
    # on continuous values (the fixture's few distinct differences give the same percentiles under any seed), the
    # interval is scipy's with this generator seed exactly, and not an unpaired one nor another seed's
    rng = np.random.default_rng(1)
    ref, other = rng.normal(0.80, 0.05, 12), rng.normal(0.78, 0.05, 12)
    diff = report.paired_difference(ref, other, n_boot=n_boot, seed=seed)
    ci = _bootstrap(ref, other, n_boot, seed)
    assert (diff.low, diff.high) == (pytest.approx(ci.low, abs=1e-12), pytest.approx(ci.high, abs=1e-12))
    assert diff.low <= diff.mean <= diff.high
    other_seed = report.paired_difference(ref, other, n_boot=n_boot, seed=seed + 1)
    assert abs(other_seed.low - diff.low) > 1e-9
    unpaired = scipy.stats.bootstrap((ref, other), lambda x, y, axis: np.mean(x, axis=axis) - np.mean(y, axis=axis),
                                     vectorized=True, method="percentile", n_resamples=n_boot,
                                     random_state=np.random.default_rng(seed)).confidence_interval
    assert abs(unpaired.low - diff.low) > 1e-9
    # the markdown shows the same numbers, signed
    md = report.comparison_markdown(runs, last_fraction=LAST, n_boot=n_boot, seed=seed, contenders=CONTENDERS)
    diff = comp.differences[("all datasets", "reflection", "last_quality")]
    assert (f"| reflection | last 50%: mean AUC of runnable | {diff.mean:+.4f} | {diff.se:.4f} | 8 | "
            f"[{diff.low:+.4f}, {diff.high:+.4f}] |") in md
    # learning of the reference: last half against the first batch, per dataset
    change = [hand_values(1, 0, s)["last_quality"] - hand_values(1, 0, s)["first_quality"] for s in SEEDS]
    learned = comp.learning["breast_w"]
    assert learned.improved == sum(x > 0 for x in change) and learned.change.mean == pytest.approx(np.mean(change))
    assert learned.lost == 0
    assert (f"exceeds the first batch's in {learned.improved} of 3 seeds; mean (last − first) over the 3 with "
            f"runnable answers in both = {np.mean(change):+.4f}") in md


def test_a_run_with_no_runnable_answer_at_the_end_counts_as_not_improved(tmp_path):
    """A run whose last batches have no runnable answer has no last-quarter AUC: the learning line counts it among
    the runs that did not improve (and names it) instead of leaving it out of the count."""
    import json as _json
    root = tmp_path / "runs"
    for s in (0, 1, 2):
        path = write_summary(root, "etpo", "cmc", s, 0.8) / "summary.json"
        summary = _json.loads(path.read_text())
        summary["batch_runnable_fraction"][0], summary["batch_runnable_reward"][0] = 0.5, 0.7  # all start runnable
        if s == 2:  # ... and the last one ends with none
            summary["batch_runnable_fraction"][-2:] = [0.0, 0.0]
            summary["batch_runnable_reward"][-2:] = [None, None]
            collapsed = path
        path.write_text(_json.dumps(summary))
    runs = report.load_runs(root)
    learned = report.comparison(runs, n_boot=100).learning["cmc"]
    assert learned.lost == 1 and learned.change.n == 2
    md = report.comparison_markdown(runs, n_boot=100)
    assert (f"exceeds the first batch's in {learned.improved} of 3 seeds (1 with no runnable answer in the last "
            "25%); mean (last − first) over the 2 with runnable answers in both") in md
    # only collapsed runs: still a learning line, 0 of 1
    only = tmp_path / "only"
    (only / "etpo" / "cmc" / "seed2").mkdir(parents=True)
    (only / "etpo" / "cmc" / "seed2" / "summary.json").write_text(collapsed.read_text())
    md = report.comparison_markdown(report.load_runs(only), n_boot=100)
    assert "exceeds the first batch's in 0 of 1 seeds (1 with no runnable answer in the last 25%).\n" in md


def test_a_run_with_no_runnable_first_batch_is_named_not_dropped(tmp_path):
    """A run whose first batch has no runnable answer has nothing its last quarter could exceed: the learning line
    says how many such runs there were instead of leaving them out of the count without a word."""
    import json as _json
    root = tmp_path / "runs"
    for s in (0, 1, 2):
        path = write_summary(root, "etpo", "cmc", s, 0.8) / "summary.json"
        summary = _json.loads(path.read_text())
        summary["batch_runnable_fraction"][0], summary["batch_runnable_reward"][0] = 0.5, 0.7
        if s == 2:  # this one starts with nothing runnable (and learns to run later)
            summary["batch_runnable_fraction"][0], summary["batch_runnable_reward"][0] = 0.0, None
        path.write_text(_json.dumps(summary))
    runs = report.load_runs(root)
    learned = report.comparison(runs, n_boot=100).learning["cmc"]
    assert learned.no_start == 1 and learned.change.n == 2 and learned.lost == 0
    md = report.comparison_markdown(runs, n_boot=100)
    assert (f"exceeds the first batch's in {learned.improved} of 2 seeds; mean (last − first) over the 2 with "
            "runnable answers in both") in md
    assert "1 more seed had no runnable answer in the first batch, so nothing to compare with." in md
    # only such runs: the line says so, with no "0 of 0"
    only = tmp_path / "only"
    (only / "etpo" / "cmc" / "seed2").mkdir(parents=True)
    (only / "etpo" / "cmc" / "seed2" / "summary.json").write_text(path.read_text())
    md = report.comparison_markdown(report.load_runs(only), n_boot=100)
    assert "Learning (etpo): 1 seed had no runnable answer in the first batch, so nothing to compare with." in md
    assert "0 of 0" not in md


def test_a_single_pair_has_no_standard_error_nor_interval(tmp_path):
    root = tmp_path / "runs"
    for s in (0, 1):
        write_summary(root, "etpo", "cmc", s, 0.8 + 0.01 * s)
    write_summary(root, "grpo", "cmc", 0, 0.75)
    runs = report.load_runs(root)
    diff = report.comparison(runs, n_boot=100).differences[("cmc", "grpo", "best")]
    assert diff.n == 1 and diff.mean == pytest.approx(0.05) and np.isnan(diff.se) and np.isnan(diff.low)
    md = report.comparison_markdown(runs, n_boot=100)
    assert "| grpo | best reward (whole run) | +0.0500 | — | 1 | — |" in md
    other = report.comparison_markdown(runs, reference="ppo_kl", n_boot=100)
    assert "No runs of the reference `ppo_kl`" in other and "mean difference" not in other


def test_old_summaries_without_the_new_series(tmp_path):
    """Summaries written before batch_runnable_reward / batch_max_reward / batch_timing: every file but the quality
    and timing figures, empty cells where the series would be."""
    root = tmp_path / "runs"
    for c, contender in enumerate(CONTENDERS):
        for s in SEEDS:
            write_summary(root, contender, "cmc", s, final_best(c, 1, s), avg_offset=0.1 * c, new_keys=False)
    written = report.write_report(root, tmp_path / "out", n_boot=200)
    assert set(written) == {"table.md", "table.csv", "runs.csv", "learning.md", "comparison.md", "settings.md",
                            "best_within.png", "best_within_per_dataset.png", "batch_reward.png", "batch_runnable.png"}
    rows = _rows(tmp_path / "out" / "runs.csv")
    assert len(rows) == 6
    assert all(r[k] == "" for r in rows for k in ("first_quality", "last_quality", "generation_s",
                                                  "environment_s", "update_s"))
    comp = report.comparison(report.load_runs(root), n_boot=200)
    assert ("cmc", "reflection", "best") in comp.differences
    assert ("cmc", "reflection", "last_quality") not in comp.differences and not comp.learning
    md = written["comparison.md"].read_text()
    assert "| reflection | last 25%: average reward |" in md and "| reflection | last 25%: mean AUC" not in md


def test_runs_csv_timing_and_quality_curves(runs_root, tmp_path):
    runs = report.load_runs(runs_root)
    report.write_runs_csv(runs, tmp_path / "runs.csv")
    rows = _rows(tmp_path / "runs.csv")
    header = list(rows[0])
    assert header[header.index("last_reward") + 1: header.index("last_reward") + 6] == [
        "first_quality", "last_quality", "generation_s", "environment_s", "update_s"]
    for r in rows:
        batches = BATCHES if r["finished"] == "True" else 2
        assert float(r["generation_s"]) == pytest.approx(np.mean([10.0 + k for k in range(batches)]))
        assert float(r["environment_s"]) == pytest.approx(2.0 + 0.5 * int(r["seed"]))
        assert r["update_s"] == ("3.0" if r["contender"] == "etpo" else "")  # reflection does not update
    # per batch: reflection seed 0 ran nothing in its first batch, so that point has two seeds
    panels = report.batch_reward_curves(runs, contenders=CONTENDERS, key="batch_runnable_reward")
    cv = panels["breast_w"]["reflection"]
    assert list(cv["n"]) == [2, 3, 3, 3]
    want = np.array([[np.nan if runnable_of(k, s, 0.0) <= 0 else quality_of(k, s, q_offset(0, 0))
                      for k in range(BATCHES)] for s in SEEDS])
    np.testing.assert_allclose(cv["mean"], np.nanmean(want, axis=0), atol=1e-12)
    assert report.plot_batch_quality(runs, tmp_path / "q.png", contenders=CONTENDERS) == tmp_path / "q.png"
    assert report.plot_timing(runs, tmp_path / "t.png") == tmp_path / "t.png"


# ----------------------------------------------------------------------------- settings.md


def _write_config(root: Path, contender: str, dataset: str, seed: int, **model_args) -> None:
    """A run's config.yaml as etpo.fit saves it (only the keys that matter here), the varying ones set per run."""
    import yaml

    run_dir = root / contender / dataset / f"seed{seed}"
    config = {"seed_everything": seed, "run_dir": str(run_dir),
              "trainer": {"logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                     "init_args": {"save_dir": str(run_dir)}}},
              "model": {"class_path": "modules.etpo.ETPOModule", "init_args": {"beta": 0.05, **model_args}},
              "data": {"seed": seed, "budget": 64,
                       "env": {"class_path": "envs.datascience.DataScienceEnv",
                               "init_args": {"dataset": dataset, "split_seed": seed, "max_steps": 5}}}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))


def test_settings_md_names_the_runs_of_a_contender_made_with_other_settings(tmp_path, capsys):
    root = tmp_path / "runs"
    for c, contender in enumerate(["same", "mixed", "older", "bare"]):
        for d, dataset in enumerate(["breast_w", "cmc"]):
            for seed in (0, 1):
                write_summary(root, contender, dataset, seed, final_best(c, d, seed))
                if contender == "same":  # only dataset, split, seeds and location vary
                    _write_config(root, contender, dataset, seed, reward_baseline=None)
                elif contender == "mixed":  # one run with another beta
                    _write_config(root, contender, dataset, seed,
                                  **({"beta": 0.2} if (dataset, seed) == ("cmc", 1) else {}))
                elif contender == "older":  # the first run predates reward_baseline; the others ask it
                    _write_config(root, contender, dataset, seed,
                                  **({} if (dataset, seed) == ("breast_w", 0) else {"reward_baseline": "running"}))
    found = report.settings_mismatches(report.load_runs(root))
    assert found["same"] == (4, []) and found["bare"] == (0, [])
    assert found["mixed"] == (4, ["model.init_args.beta: cmc/seed1 has 0.2, breast_w/seed0 has 0.05"])
    n, lines = found["older"]
    assert n == 4 and len(lines) == 3 and all(
        line.startswith("model.init_args.reward_baseline: breast_w/seed0 has no such key") and "'running'" in line
        for line in lines)
    # a run that lacks a key it would have had at its default is not a difference
    _write_config(root, "older", "breast_w", 0, reward_baseline=None)
    _write_config(root, "same", "cmc", 1)  # reward_baseline left out: the class default (None) == null
    found = report.settings_mismatches(report.load_runs(root))
    assert len(found["older"][1]) == 3 and found["same"] == (4, [])

    written = report.write_report(root, tmp_path / "out")
    md = written["settings.md"].read_text()
    assert "| same | 4 | the same |" in md and "| bare | 0 | — (no config.yaml) |" in md
    assert "| mixed | 4 | **differ**: model.init_args.beta: cmc/seed1 has 0.2, breast_w/seed0 has 0.05 |" in md
    err = capsys.readouterr().err
    assert "warning: the runs of mixed were made with different settings" in err and "runs of same" not in err


def test_curves_that_coincide_stay_visible():
    """Best within n is often the same step function for two contenders (both found the same answer): each later
    contender is drawn narrower, in another dash, above the earlier ones, so the one underneath shows at its edges."""
    from etpo.report.plots import _line_styles

    styles = _line_styles(["etpo", "ppo_kl", "reflection", "grpo"], 1.5)
    assert len({s["ls"] for s in styles.values()}) == 4
    widths = [styles[c]["lw"] for c in ("etpo", "ppo_kl", "reflection", "grpo")]
    orders = [styles[c]["zorder"] for c in ("etpo", "ppo_kl", "reflection", "grpo")]
    assert widths == sorted(widths, reverse=True) and len(set(widths)) == 4 and widths[-1] == pytest.approx(1.5)
    assert orders == sorted(orders) and len(set(orders)) == 4
