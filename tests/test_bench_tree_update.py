"""tools/bench_tree_update.py: its peak-memory reading (the process's resident high-water mark, reset before each
timed update) and its refusal of a bad --chunk_positions."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO

_spec = importlib.util.spec_from_file_location("_tool_bench_tree_update", REPO / "tools" / "bench_tree_update.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="the high-water mark reset is Linux's")
def test_the_peak_is_reset_and_then_sees_a_new_allocation():
    held = np.ones(300 * 2 ** 20 // 8)  # 300 MiB, touched
    del held
    assert bench._reset_peak()
    low = bench._peak_gb()
    held = np.ones(300 * 2 ** 20 // 8)
    high = bench._peak_gb()
    assert high - low > 0.25, (low, high)  # what the reset forgot, the new array brought back
    assert float(held[-1]) == 1.0


def test_a_bad_chunk_positions_is_one_line():
    with pytest.raises(SystemExit, match="--chunk_positions must be >= 1, got 0"):
        bench.main(["--chunk_positions", "0"])
