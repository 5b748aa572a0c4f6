"""etpo.report: Table 2 / Figure 3 / Figure 4 from small fake run summaries with known numbers."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from etpo import report

CONTENDERS = ["reflection", "etpo"]
DATASETS = ["breast_w", "cmc", "pc1"]
SEEDS = [0, 1, 2]
BATCH = 16        # env steps per rollout batch
BATCHES = 4       # budget 64


def final_best(c: int, d: int, s: int) -> float:
    """A known, distinct number per (contender, dataset, seed)."""
    return round(0.6 + 0.1 * d + 0.03 * c + 0.007 * s + 0.001 * ((c + 2 * d + 3 * s) % 5), 6)


def write_summary(root: Path, contender: str, dataset: str, seed: int, best: float, *, finished: bool = True,
                  batches: int = BATCHES, avg_offset: float = 0.0) -> Path:
    run_dir = root / contender / dataset / f"seed{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    # best-within curve rising to `best`; batch rewards a known ramp
    curve = [[BATCH * (k + 1), round(best - 0.05 * (batches - 1 - k), 6)] for k in range(batches)]
    avg = [round(-1.0 + 0.3 * k + avg_offset, 6) for k in range(batches)]
    runnable = [round(0.1 * k + 0.01 * seed + avg_offset, 6) for k in range(batches)]
    summary = {"contender": "ignored-by-layout", "model_class": "x.Y", "dataset": dataset, "seed": seed,
               "env_steps": BATCH * batches, "budget": BATCH * BATCHES, "best_reward": curve[-1][1],
               "best_code": "print(1)", "runnable_fraction": 0.5, "wall_time_s": 1.0, "finished": finished,
               "best_within": curve, "batch_avg_reward": avg, "batch_runnable_fraction": runnable}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


@pytest.fixture
def runs_root(tmp_path) -> Path:
    root = tmp_path / "runs"
    for c, contender in enumerate(CONTENDERS):
        for d, dataset in enumerate(DATASETS):
            for s in SEEDS:
                if contender == "etpo" and dataset == "cmc" and s == 2:
                    continue  # one missing run: the cell has n=2 and seed 2 is not complete for etpo
                write_summary(root, contender, dataset, s, final_best(c, d, s), avg_offset=0.1 * c)
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
               and r["finished"] == "True"]  # the table, like this, leaves the unfinished run out
        assert np.mean(got) == pytest.approx(cell.mean), (contender, dataset, column)
    assert all((Path.cwd() / r["run_dir"] / "summary.json").is_file() for r in run_rows)

    import matplotlib.image as mpimg

    for name in ("best_within.png", "best_within_per_dataset.png", "batch_reward.png"):
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


def test_cli(runs_root, tmp_path, capsys):
    assert report.main([str(runs_root), "--out", str(tmp_path / "o"), "--within", "48", "--ddof", "0"]) == 0
    text = capsys.readouterr().out
    assert "within 48 environment steps" in text and (tmp_path / "o" / "batch_reward.png").is_file()
    assert report.main([str(tmp_path / "missing")]) == 2


def test_empty_folder(tmp_path):
    written = report.write_report(tmp_path, tmp_path / "out")
    assert set(written) == {"table.md", "table.csv", "runs.csv", "learning.md"}  # no plot without runs


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
