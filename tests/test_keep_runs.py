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
