"""Where a batch's time goes, for several settings side by side: short real runs, their per-phase timing compared.

Each setting is a list of ``python -m etpo.fit`` arguments; the tool runs every setting for ``--batches`` rollout
batches (a real run: the model, the rollout, the sandbox, the update -- nothing mocked), ``--repeats`` times,
interleaved (A B A B ...: these machines are noisy, so a slow spell hits every setting), in fresh processes, and reads
the per-batch timing the runs write to ``history.jsonl`` (``timing``: generation, environment and update seconds,
generated tokens). It prints per setting the median over batches (the first batch of each run left out: it pays
one-off costs such as the sandbox workers' start) and each setting's ratio to the first one::

    python tools/bench_phases.py --batches 3 --repeats 2 \\
        --setting today "--config configs/quickstart.yaml --data.env.init_args.reflection=false ..." \\
        --setting new   "--config configs/quickstart.yaml"

``--json FILE`` writes the numbers; ``--keep DIR`` keeps the run directories (default: a temporary folder).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PHASES = ("generation_s", "environment_s", "update_s")


def run_setting(args: list[str], run_dir: Path, batches: int, num_envs: int | None) -> list[dict]:
    """One short real run; returns the ``timing`` dict of each of its batches."""
    budget_args = [f"--data.budget={batches * (num_envs or 8)}"]
    if num_envs:
        budget_args.append(f"--data.num_envs={num_envs}")
    cmd = [sys.executable, "-m", "etpo.fit", *args, *budget_args, "--run_dir", str(run_dir),
           "--trainer.enable_progress_bar=false"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench_phases: a run failed ({shlex.join(cmd)}):\n{proc.stderr[-2000:]}")
    lines = [json.loads(ln) for ln in (run_dir / "history.jsonl").read_text().splitlines() if ln.strip()]
    return [dict(ln.get("timing") or {}, runnable_fraction=ln.get("runnable_fraction")) for ln in lines]


def summarise(batches: list[dict]) -> dict:
    """Medians over batches of every phase, their sum (the batch), and generated tokens per second."""
    out = {}
    for key in PHASES + ("generated_tokens", "positions_computed", "positions_plain"):
        values = [b[key] for b in batches if b.get(key) is not None]
        out[key] = statistics.median(values) if values else None
    out["batch_s"] = sum(out[k] or 0.0 for k in PHASES)
    gen = [b["generated_tokens"] / b["generation_s"] for b in batches if b.get("generation_s")]
    out["generated_tokens_per_s"] = statistics.median(gen) if gen else None
    out["batches"] = len(batches)
    return out


def table(results: dict[str, dict]) -> str:
    names = list(results)
    first = results[names[0]]
    cols = ("generation_s", "environment_s", "update_s", "batch_s", "generated_tokens_per_s", "positions_computed")
    lines = ["| setting | batches | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for name in names:
        r = results[name]
        cells = []
        for c in cols:
            v = r.get(c)
            if v is None:
                cells.append("")
                continue
            ratio = f" ({v / first[c]:.2f}x)" if name != names[0] and first.get(c) else ""
            cells.append(f"{v:.1f}{ratio}" if isinstance(v, float) else f"{v}{ratio}")
        lines.append(f"| {name} | {r['batches']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", nargs=2, action="append", metavar=("NAME", "ARGS"), required=True,
                   help="a name and the etpo.fit arguments of a setting (repeat for each setting)")
    p.add_argument("--batches", type=int, default=3, help="rollout batches per run (default 3)")
    p.add_argument("--repeats", type=int, default=2, help="runs per setting, interleaved (default 2)")
    p.add_argument("--num_envs", type=int, default=None, help="override data.num_envs (default: the config's)")
    p.add_argument("--keep", default=None, help="keep the run directories here")
    p.add_argument("--json", default=None, help="write the numbers to this file")
    args = p.parse_args(argv)
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_phases_"))
    collected: dict[str, list[dict]] = {name: [] for name, _ in args.setting}
    started = time.time()
    for rep in range(args.repeats):
        for name, fit_args in args.setting:
            run_dir = root / f"{name}_{rep}"
            batches = run_setting(shlex.split(fit_args), run_dir, args.batches, args.num_envs)
            collected[name] += batches[1:] if len(batches) > 1 else batches
            print(f"{name} #{rep}: " + ", ".join(
                f"batch {i + 1}: " + " ".join(f"{k.split('_')[0]} {b.get(k, 0):.1f}" for k in PHASES)
                for i, b in enumerate(batches)), flush=True)
    results = {name: summarise(b) for name, b in collected.items()}
    print(table(results))
    print(f"medians over batches 2..{args.batches} of {args.repeats} runs per setting; "
          f"{time.time() - started:.0f} s in all")
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": dict(args.setting), "batches": args.batches,
                                               "repeats": args.repeats, "results": results,
                                               "per_batch": collected}, indent=1))
    return results


if __name__ == "__main__":
    main()
