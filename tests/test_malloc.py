"""etpo.malloc: freed CPU tensor memory goes back to the OS instead of staying resident (glibc only)."""

from __future__ import annotations

import ctypes.util
import subprocess
import sys
import textwrap

import pytest

# Allocate 160 blocks of 1 MiB after one 4 MiB block was freed (which, by default, lifts glibc's mmap threshold
# above 1 MiB, so the blocks come from the heap), then free all but the last one: the heap cannot shrink below a
# live block, so by default ~160 MiB stays resident; with the fixed threshold each block was its own mapping.
_PROBE = textwrap.dedent("""
    import sys
    import numpy as np
    from etpo.malloc import release_freed_memory_promptly
    applied = release_freed_memory_promptly() if sys.argv[1] == "fix" else False
    def rss_mib():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    big = np.ones(4 << 20, dtype=np.uint8); del big
    before = rss_mib()
    blocks = [np.ones(1 << 20, dtype=np.uint8) for _ in range(160)]
    del blocks[:-1]
    print(applied, rss_mib() - before)
""")


def _retained_mib(mode: str) -> tuple[bool, float]:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True).stdout
    applied, retained = out.split()
    return applied == "True", float(retained)


@pytest.mark.skipif(not sys.platform.startswith("linux") or ctypes.util.find_library("c") is None,
                    reason="glibc malloc tuning applies to Linux only")
def test_freed_blocks_are_returned_to_the_os():
    applied, retained_fixed = _retained_mib("fix")
    if not applied:
        pytest.skip("this C library has no mallopt (not glibc)")
    _, retained_default = _retained_mib("default")
    assert retained_default > 100, f"glibc defaults kept only {retained_default:.0f} MiB (probe no longer valid)"
    assert retained_fixed < 20, f"{retained_fixed:.0f} MiB stayed resident with the fixed mmap threshold"


def test_only_applied_when_asked_for(monkeypatch):
    from etpo.malloc import OPT_IN_ENV, maybe_release_freed_memory

    monkeypatch.delenv(OPT_IN_ENV, raising=False)
    assert maybe_release_freed_memory() is False
    monkeypatch.setenv(OPT_IN_ENV, "0")
    assert maybe_release_freed_memory() is False


def test_importing_etpo_makes_openmp_threads_wait_passively_unless_told_otherwise():
    """etpo/__init__.py: OMP_WAIT_POLICY=PASSIVE before torch loads OpenMP, and a user's own setting wins."""
    import os

    from conftest import REPO

    code = "import os, etpo, torch; print(os.environ['OMP_WAIT_POLICY'], torch.get_num_threads() >= 1)"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["PASSIVE", "True"]
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**env, "OMP_WAIT_POLICY": "ACTIVE"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["ACTIVE", "True"]
