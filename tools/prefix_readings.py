"""What a trained run's views say where two given answers part (soft_optimal.md, section 9: tic_tac_toe's argument).

The answer-class probe (etpo/probe.py) reads the token where two *classes* part; where the better answer is an
argument of the common class (tic_tac_toe's ``RandomForestClassifier(max_samples=1000)`` against
``RandomForestClassifier()``) it tracks one of them only. This tool takes an answer the run wrote at the task prompt
(the first in its samples that contains ``--match``), makes the other by one textual replacement (``--replace OLD
NEW``), and reads both with the probe's own readout from the run's last checkpoint: at the token where they part,
each side's pi_theta, pi_bar, pi* = pi_bar exp(Q / beta) / Z and the critic's soft Q of its next token, and each
answer's log-probabilities summed over its tokens. Read-only.

    python tools/prefix_readings.py runs/benchmark/learning_v3_long/runs/etpo/tic_tac_toe/seed0 \\
        --match "max_samples=1000" --replace "RandomForestClassifier(max_samples=1000)" "RandomForestClassifier()"

Both answers are tokenized from their text (as a fresh encode: a sampled answer's own tokens can split differently,
a reading of the string, not of that sample). Runs kept under docs/results hold no checkpoints: give the directory
etpo.fit wrote.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))
import etpo  # noqa: E402,F401  (before torch: idle OpenMP threads wait passively)

__all__ = ["read_pair", "task_prompt_answer", "main"]


def read_pair(module, task_prompt: list[int], answers: dict[str, list[int]], batch_number: int = 0) -> dict:
    """The probe's readout (``AnswerClassProbe._read``) for exactly these answers (name -> tokens) written for
    ``task_prompt``: ``classes`` (per answer, the summed log-probabilities) and ``choices`` (each token where they
    part, with every side's ``pi``, ``pi_ref``, ``pi_optimal`` and ``q``)."""
    from etpo.probe import AnswerClassProbe

    probe = AnswerClassProbe(max_classes=len(answers))
    probe.task_prompt = list(task_prompt)
    probe.exemplars = {name: {"tokens": list(tokens), "reward": 0.0, "runnable": True, "batch": batch_number}
                       for name, tokens in answers.items()}
    probe._batch_classes = Counter({name: len(answers) - i for i, name in enumerate(answers)})  # the first: frequent
    out = probe._read(None, module, batch_number)
    if out is None or not out["choices"]:
        raise ValueError("the answers never part (one is a prefix of the other)")
    return out


def task_prompt_answer(run_dir: Path, match: str) -> dict:
    """The first sample of the run written at the task prompt (an episode's first attempt) whose text holds
    ``match``."""
    from etpo.report.classes import run_samples

    samples = run_samples(run_dir)
    if not samples:
        raise SystemExit(f"{run_dir}: no samples.jsonl(.gz)")
    for sample in samples:
        if sample.get("episode_step", 1) == 1 and match in sample.get("text", ""):
            return sample
    raise SystemExit(f"{run_dir}: no answer at the task prompt contains {match!r}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--match", required=True, help="a string the run's answer must contain")
    parser.add_argument("--replace", nargs=2, metavar=("OLD", "NEW"), required=True,
                        help="the other answer: the first with OLD replaced by NEW")
    parser.add_argument("--json", type=Path, default=None, help="also write the readings here")
    args = parser.parse_args(argv)

    from tools.policy_attribution import load_run

    sample = task_prompt_answer(args.run_dir, args.match)
    old, new = args.replace
    if old not in sample["text"]:
        raise SystemExit(f"the answer found (batch {sample.get('batch')}) does not contain {old!r}")
    texts = {old: sample["text"], new: sample["text"].replace(old, new)}
    module, ckpt, _, probe_state = load_run(args.run_dir)
    module.eval()
    tok = module.model.tokenizer
    answers = {name: tok.encode(text, add_special_tokens=False) for name, text in texts.items()}
    step = int(ckpt.get("global_step", 0))
    out = read_pair(module, probe_state["task_prompt"], {new: answers[new], old: answers[old]}, step)
    print(f"{args.run_dir} at its last checkpoint (global step {step}); the answer of batch {sample.get('batch')} "
          f"(reward {sample.get('reward'):.4f}) against the same with {old!r} -> {new!r}")
    for name, entry in out["classes"].items():
        print(f"  {name}: log pi {entry['logp_policy']:.2f}, log pi_ref {entry['logp_reference']:.2f}, "
              f"log pi* {entry.get('logp_optimal', float('nan')):.2f} over {entry['tokens']} tokens")
    for choice in out["choices"]:
        print(f"  token {choice['position']} after {choice['context'][-40:]!r}:")
        for name, o in choice["options"].items():
            print(f"    {o['token']!r:>14} ({name}): pi {o['pi']:.4f}  pi_ref {o['pi_ref']:.4f}  "
                  f"pi* {o.get('pi_optimal', float('nan')):.4f}  Q {o.get('q', float('nan')):+.4f}")
    if args.json:
        args.json.write_text(json.dumps({"run_dir": str(args.run_dir), "global_step": step, "texts": texts,
                                         **out}, indent=2))


if __name__ == "__main__":
    main()
