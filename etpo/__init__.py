"""etpo: entropy-regularised, token-level policy optimisation for LLM agents (docs/method.md).

Importing the package sets one process-wide default before torch loads its OpenMP runtime: ``OMP_WAIT_POLICY``
``PASSIVE`` (unless already set). OpenMP's default lets idle threads spin; on a 2-core machine that also runs
something else, the spinning threads fight the other process for the cores. ``tools/bench_etpo_update.py
--thread_study`` (SmolLM2-135M, the quickstart's update) measured, alone -> next to one busy process: 2 threads
spinning 57.6 s -> 147.6 s (2.56x), 2 threads passive 57.0 s -> 125.0 s (2.19x, about the 2x that losing one
of two cores costs), 1 thread 123.1 s -> 110.8 s. Passive waiting costs nothing alone and degrades in proportion
to the load; torch keeps its default thread count (the cores). It takes effect only where ``etpo`` is imported
before torch, as in ``python -m etpo.fit`` and ``python -m etpo.benchmark``.
"""

import os as _os

_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
