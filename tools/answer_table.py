"""What a set of sampled answers holds: per samples file, how many ran, their classes, the best, and every answer
configuration that scored above the most common runnable one.

Reads the samples JSONL that ``tools/base_rate.py`` writes (plain or gzipped). Made for the question "would another
sampler find the better answer?" (docs/results/soft_optimal.md, section 10): the untrained model's first attempts at
several temperatures, side by side::

    python tools/base_rate.py --dataset balance_scale --n 256 --temperature 1.0 --max-new-tokens 96 \\
        --out runs/sampler/balance_scale_t1.0.jsonl
    python tools/answer_table.py runs/sampler/balance_scale_t*.jsonl

An answer's configuration is its estimator's class with the constructor's arguments
(:func:`envs.datascience.extract.answer_configuration`); "above the most common" compares AUCs, so a configuration
that scores the common answer's value (the same forest under another spelling) is not listed.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from envs.datascience.extract import answer_class, answer_configuration, extract_function  # noqa: E402


def read_samples(path: Path) -> list[dict]:
    """The samples of one file; a clear error when it is missing or not a samples JSONL."""
    if not path.exists():
        raise SystemExit(f"answer_table: no samples file {path} (write one with tools/base_rate.py --out)")
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise SystemExit(f"answer_table: {path}, line {number} is not JSON ({err.msg}); "
                                 "pass the samples JSONL that tools/base_rate.py wrote") from None
            if not {"status", "text", "reward"} <= row.keys():
                raise SystemExit(f"answer_table: {path}, line {number} has no status/text/reward: "
                                 "not a samples file of tools/base_rate.py")
            rows.append(row)
    return rows


def summarise(rows: list[dict], digits: int = 4) -> dict:
    """Attempts, runnable answers, class counts, the best AUC, the most common runnable configuration and its AUC,
    and the configurations scoring above it: ``[(configuration, auc, count), ...]``, best first."""
    runnable = [r for r in rows if r["status"] == "ok"]
    codes = [extract_function(r["text"]).code for r in runnable]
    classes = Counter(answer_class(c) for c in codes)
    scored = Counter((answer_configuration(c), round(float(r["reward"]), digits)) for c, r in zip(codes, runnable))
    common, common_auc = scored.most_common(1)[0][0] if scored else (None, None)
    above = sorted(((cfg, auc, n) for (cfg, auc), n in scored.items() if common_auc is not None and auc > common_auc),
                   key=lambda item: (-item[1], item[0]))
    return {"attempts": len(rows), "runnable": len(runnable), "classes": dict(classes.most_common()),
            "best": max((float(r["reward"]) for r in runnable), default=None), "common": common,
            "common_auc": common_auc, "above": above}


def markdown(named: list[tuple[str, dict]]) -> str:
    lines = ["| samples | attempts | runnable | classes that ran | best | most common runnable (AUC) | "
             "scoring above it (AUC x count) |", "|---|---|---|---|---|---|---|"]
    for name, s in named:
        classes = ", ".join(f"{c} {n}" for c, n in s["classes"].items()) or "-"
        best = f"{s['best']:.4f}" if s["best"] is not None else "-"
        common = f"`{s['common']}` ({s['common_auc']:.4f})" if s["common"] is not None else "-"
        above = "; ".join(f"`{cfg}` {auc:.4f} x {n}" for cfg, auc, n in s["above"]) or "none"
        lines.append(f"| {name} | {s['attempts']} | {s['runnable']} | {classes} | {best} | {common} | {above} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("samples", nargs="+", type=Path, help="samples JSONL files of tools/base_rate.py")
    args = parser.parse_args(argv)
    named = []
    for path in args.samples:
        name = path.name.removesuffix(".gz").removesuffix(".jsonl")
        named.append((name, summarise(read_samples(path))))
    print(markdown(named))


if __name__ == "__main__":
    main()
