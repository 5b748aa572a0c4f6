"""tools/keep_runs.py: finished runs of a benchmark folder are kept (the report's files, samples gzipped), unfinished
ones are left out and named."""

from __future__ import annotations

import gzip
import importlib.util
import json

import pytest

from conftest import REPO

_spec = importlib.util.spec_from_file_location("_tool_keep_runs", REPO / "tools" / "keep_runs.py")
keep_runs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(keep_runs)


def _run(root, contender, dataset, seed, finished):
    run = root / "runs" / contender / dataset / f"seed{seed}"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"x" * 100)
    (run / "summary.json").write_text(json.dumps({"finished": finished, "best_reward": 0.9}))
    (run / "history.jsonl").write_text('{"batch": 1}\n')
    (run / "config.yaml").write_text("seed_everything: 0\n")
    (run / "samples.jsonl").write_text("".join(json.dumps({"batch": 1, "reward": r}) + "\n" for r in (0.5, -1.0)))
    return run


def test_finished_runs_are_kept_without_checkpoints_and_unfinished_ones_named(tmp_path, capsys):
    src, dst = tmp_path / "bench", tmp_path / "kept"
    done = _run(src, "etpo", "tic_tac_toe", 0, True)
    _run(src, "etpo", "tic_tac_toe", 1, False)
    keep_runs.main([str(src), str(dst)])
    kept = dst / "runs" / "etpo" / "tic_tac_toe" / "seed0"
    assert sorted(p.name for p in kept.iterdir()) == ["config.yaml", "history.jsonl", "samples.jsonl.gz",
                                                     "summary.json"]
    with gzip.open(kept / "samples.jsonl.gz", "rt") as fh:
        assert fh.read() == (done / "samples.jsonl").read_text()
    assert not (dst / "runs" / "etpo" / "tic_tac_toe" / "seed1").exists()
    out = capsys.readouterr()
    assert "kept 1 finished runs" in out.out and "not finished, left out: etpo/tic_tac_toe/seed1" in out.err
    with pytest.raises(SystemExit, match="does not exist"):
        keep_runs.main([str(tmp_path / "nowhere"), str(dst)])


def _config(run_dir: str, data_dir: str = "null") -> str:
    """The parts of a LightningCLI config.yaml that name folders (etpo.fit writes them all)."""
    return (f"# lightning.pytorch==2.6.6\nseed_everything: 0\ntrainer:\n  logger:\n    init_args:\n"
            f"      save_dir: {run_dir}\n  default_root_dir: {run_dir}\nmodel:\n  init_args:\n    backbone:\n"
            f"      gguf_cache_dir: runs/.model_cache\ndata:\n  env:\n    init_args:\n      data_dir: {data_dir}\n"
            f"run_dir: {run_dir}\nckpt_path: {run_dir}/checkpoints/last.ckpt\nnotes: {run_dir}_other\n")


def _machine(project, tmp_path, **kwargs):
    return keep_runs.machine_paths(project, data_dir=tmp_path / "data", **kwargs)


def test_kept_runs_name_the_folder_they_are_kept_in_and_no_machine_path(tmp_path):
    project = tmp_path / "clone"
    src, dst = project / "runs" / "benchmark" / "v2", project / "docs" / "results" / "v2"
    run = _run(src, "etpo_baseline", "balance_scale", 0, True)
    (run / "config.yaml").write_text(_config("runs/benchmark/v2/runs/etpo_baseline/balance_scale/seed0",
                                             data_dir=str(tmp_path / "data")))
    venv_error = (f"ImportError: cannot import name 'LassoClassifier' from 'sklearn.linear_model' "
                  f"({project}/.venv/lib/python3.11/site-packages/sklearn/linear_model/__init__.py)")
    samples = [{"batch": 1, "reward": -1.0, "status": "error", "error": venv_error, "text": "x = 0.5"},
               {"batch": 1, "reward": 0.8125, "status": "ok", "error": None, "text": "RandomForestClassifier()"}]
    (run / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    summary = {"finished": True, "best_reward": 0.8125, "curve": [0.1, 1e-05],
               "data": f"{tmp_path / 'data'}/balance_scale/balance_scale.csv", "log": f"{project}/runs/fit.log"}
    (run / "summary.json").write_text(json.dumps(summary, indent=2))
    (run / "best_code.py").write_text(f"# from {project}/tools\nmodel = RandomForestClassifier()\n")
    (src / "runs" / "etpo_baseline").rename(src / "runs" / "etpo")  # the contender was renamed before keeping

    keep_runs.keep_runs(src, dst, _machine(project, tmp_path), project_root=project)
    kept = dst / "runs" / "etpo" / "balance_scale" / "seed0"
    config = (kept / "config.yaml").read_text()
    location = "docs/results/v2/runs/etpo/balance_scale/seed0"
    for key in ("save_dir", "default_root_dir", "run_dir"):
        assert f"{key}: {location}\n" in config
    assert f"ckpt_path: {location}/checkpoints/last.ckpt\n" in config
    assert "gguf_cache_dir: runs/.model_cache\n" in config and "data_dir: <data dir>\n" in config
    assert "notes: runs/benchmark/v2/runs/etpo_baseline/balance_scale/seed0_other\n" in config  # not below the folder
    with gzip.open(kept / "samples.jsonl.gz", "rt") as fh:
        kept_samples = [json.loads(line) for line in fh]
    assert kept_samples[0]["error"].endswith("'sklearn.linear_model' (site-packages/sklearn/linear_model/__init__.py)")
    assert kept_samples[1] == samples[1] and kept_samples[0]["reward"] == -1.0
    assert json.loads((kept / "summary.json").read_text()) == {
        **summary, "data": "<data dir>/balance_scale/balance_scale.csv", "log": "runs/fit.log"}
    assert (kept / "summary.json").read_text().startswith('{\n  "finished"')  # the layout it had (indent 2)
    assert (kept / "best_code.py").read_text() == "# from tools\nmodel = RandomForestClassifier()\n"
    for path in kept.iterdir():
        text = (gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()).decode()
        assert str(tmp_path) not in text, path.name


def test_fix_paths_rewrites_runs_kept_before_once_and_leaves_the_rest(tmp_path, capsys):
    project, other_clone = tmp_path / "clone", tmp_path / "wt-baserate"
    kept = project / "docs" / "results" / "cpu"
    probe = kept / "probes" / "4_beta0.2"
    probe.mkdir(parents=True)
    (probe / "config.yaml").write_text(_config("/tmp/qs/probeB"))
    run = kept / "runs" / "etpo" / "breast_w" / "seed0"
    run.mkdir(parents=True)
    error = f"ImportError: ... ({other_clone}/.venv/lib/python3.11/site-packages/sklearn/svm/__init__.py)"
    with gzip.open(run / "samples.jsonl.gz", "wt") as fh:
        fh.write(json.dumps({"batch": 1, "reward": -1.0, "error": error}) + "\n")
    made_in = project / "runs" / "benchmark" / "cpu" / "runs" / "etpo" / "breast_w"
    (kept / "runs.csv").write_text("contender,dataset,seed,best_reward,run_dir\n"
                                   f"etpo,breast_w,0,0.9903153153153154,{made_in}/seed0\n"
                                   f"etpo,breast_w,1,-1.0,{made_in}/seed1\n")
    summaries = project / "docs" / "results" / "base_rate.jsonl"
    summaries.write_text(json.dumps({"options": {"gguf_cache_dir": f"{other_clone}/runs/.model_cache",
                                                 "data_dir": str(tmp_path / "data"), "n": 64}}) + "\n")
    (kept / "figure.png").write_bytes(b"\x89PNG /tmp/qs/probeB")
    machine = _machine(project, tmp_path, checkouts=[other_clone])

    changed = keep_runs.fix_paths([kept, summaries], machine, project_root=project)
    assert sorted(p.name for p in changed) == ["base_rate.jsonl", "config.yaml", "runs.csv", "samples.jsonl.gz"]
    assert "run_dir: docs/results/cpu/probes/4_beta0.2\n" in (probe / "config.yaml").read_text()
    with gzip.open(run / "samples.jsonl.gz", "rt") as fh:
        assert json.loads(fh.read())["error"] == "ImportError: ... (site-packages/sklearn/svm/__init__.py)"
    # the kept copy where there is one; the rest relative to the project
    assert (kept / "runs.csv").read_text().splitlines()[1:] == [
        "etpo,breast_w,0,0.9903153153153154,docs/results/cpu/runs/etpo/breast_w/seed0",
        "etpo,breast_w,1,-1.0,runs/benchmark/cpu/runs/etpo/breast_w/seed1"]
    assert json.loads(summaries.read_text()) == {"options": {"gguf_cache_dir": "runs/.model_cache",
                                                             "data_dir": "<data dir>", "n": 64}}
    assert (kept / "figure.png").read_bytes() == b"\x89PNG /tmp/qs/probeB"
    assert keep_runs.fix_paths([kept, summaries], machine, project_root=project) == []  # nothing left to do

    (kept / "odd.json").write_text(json.dumps({"log": f"{project}/x"}, indent=3))
    with pytest.raises(SystemExit, match="odd.json is not in a layout json.dumps writes"):
        keep_runs.fix_paths([kept], machine, project_root=project)
    (kept / "odd.json").unlink()
    (run / "history.jsonl").write_text(f'{{"batch": 1}}\n{{"batch": 2, "log": "{project}/x')  # torn by a kill
    with pytest.raises(SystemExit, match="history.jsonl:2 is not JSON"):
        keep_runs.fix_paths([kept], machine, project_root=project)
    with pytest.raises(SystemExit, match="nowhere does not exist"):
        keep_runs.main(["--fix-paths", str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit):
        keep_runs.main([])
    assert "give SRC DST" in capsys.readouterr().err


def test_a_config_without_a_run_folder_is_only_cut():
    text = "seed_everything: 0\nrun_dir: null\nsave_dir: runs/x\n"
    assert keep_runs.relocated_config(text, "docs/results/x/runs/etpo/d/seed0") == text
    quoted = "run_dir: 'runs/b/seed0'\nsave_dir: \"runs/b/seed0\"\nlist:\n- runs/b/seed0/tb\n"
    assert keep_runs.relocated_config(quoted, "docs/kept/seed0") == (
        "run_dir: 'docs/kept/seed0'\nsave_dir: \"docs/kept/seed0\"\nlist:\n- docs/kept/seed0/tb\n")
