"""Base rate of a data-science task: how often the *untrained* model's first (and second) attempt runs.

RL can only amplify successes it samples; this tool measures how many there are before any training, with the
sampling the trainer uses. It loads the backbone once, builds :class:`envs.datascience.DataScienceEnv` s for one
dataset and prompt style, samples ``n`` first attempts in generation batches of ``batch_size`` -- through
:meth:`modules.agent.AgentModule.act`, the very call the rollout DataModule makes, from the policy view of an
untrained :class:`modules.reflection.ReflectionModule` (LoRA B = 0: the base model) -- and steps the environments
with them, so the code is extracted, refused or run in the env's sandbox exactly as in a training run. With
``--second-attempt`` every failed first attempt is followed by one sample from the env's reflection prompt.

It prints the runnable rate (status ``ok``) with a 95 % Wilson score interval, the reward distribution, and a
histogram of failure kinds (the env's status plus the exception type; the most common first error lines
below), and writes every sample (prompt length, text, extracted code, status, error, reward) to a JSONL file.
``--summary-jsonl`` appends the summary as one JSON line (docs/results/base_rate.jsonl holds the cited ones), with
the git commit and the task prompt's token count and hash. ``--replay FILE`` steps the first attempts of an earlier
run again instead of sampling new ones (same task prompt, checked): with ``--second-attempt`` it compares
reflection prompts on the same failures.

Reproducible: batch ``b`` samples after ``torch.manual_seed(seed * 100003 + b)`` (second attempts continue that
stream; a replay's second attempts start from ``seed * 100003 + b + REPLAY_STREAM``, never from the stream that drew
the replayed first attempts), so a measurement is a function of its options (and of torch's CPU kernels).

Defaults are the quickstart's (configs/quickstart.yaml): SmolLM2-135M-Instruct from the offline GGUF,
temperature 0.5, top-k 50, 128 new tokens, the stop strings at the next top-level block, 5 validation splits,
20 s per evaluation. Example (about 5-10 min on 2 CPU cores; on a machine shared with other jobs ``--threads 1``
avoids OpenMP spin-waiting, which made single batches 10x slower)::

    python tools/base_rate.py --dataset breast_cancer --prompt-style few_shot --n 64 --second-attempt \\
        --out runs/base_rate/breast_cancer_few_shot.jsonl --summary-jsonl docs/results/base_rate.jsonl
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import re
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))
import etpo  # noqa: E402,F401  (before torch: idle OpenMP threads wait passively, see etpo/__init__.py)

import numpy as np  # noqa: E402

__all__ = ["wilson_interval", "failure_kind", "first_error_line", "measure", "summarize", "format_summary", "main"]

#: the quickstart's stop strings: a new top-level block after the function body (configs/quickstart.yaml)
QUICKSTART_STOP_STRINGS = ["\ndef ", '\n"""', "\nclass ", "\nif __name__"]
#: offset of the random stream of a replay's second attempts (see :func:`measure`)
REPLAY_STREAM = 1_000_000_007
#: the bins of the printed reward distribution (-1 is every failure)
REWARD_BINS = (0.5, 0.8, 0.9, 0.95, 0.99)

_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Warning|Interrupt))\b(:\s*(.*))?$")


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ``k / n`` (scipy's ``binomtest(...).proportion_ci``)."""
    if n <= 0:
        raise ValueError(f"the interval needs at least one attempt, got n={n}")
    from scipy.stats import binomtest

    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def first_error_line(error: str | None) -> str:
    """The line that names what went wrong: the last exception line of a traceback, else the first line."""
    if not error:
        return ""
    lines = [line.strip() for line in error.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        if _EXCEPTION_LINE.match(line):
            return line
    return lines[0] if lines else ""


def failure_kind(status: str, error: str | None) -> str:
    """Coarse failure category: ``ok``, or the env's status with the exception type (``error: TypeError``).

    ``invalid-output`` / ``refused`` / ``timeout`` carry the env's own fixed messages; they are kept whole for
    ``invalid-output`` (there are only a handful, see ``envs.datascience.extract``)."""
    if status == "ok":
        return "ok"
    line = first_error_line(error)
    match = _EXCEPTION_LINE.match(line)
    if match:
        return f"{status}: {match.group(1)}"
    if status == "invalid-output" and line:
        return f"{status}: {line}"
    return status


def _normalise_message(line: str, max_chars: int = 140) -> str:
    # group messages that differ only in numbers (shapes, sizes) or addresses
    line = re.sub(r"0x[0-9a-fA-F]+", "0x..", line)
    line = re.sub(r"\d+(\.\d+)?", "N", line)
    return line if len(line) <= max_chars else line[: max_chars - 3] + "..."


# ------------------------------------------------------------------------------------------------------------------
# measurement
# ------------------------------------------------------------------------------------------------------------------

def measure(
    act: Callable,
    make_env: Callable[[], object],
    generation,
    n: int,
    batch_size: int = 8,
    seed: int = 0,
    second_attempt: bool = False,
    on_record: Callable[[dict], None] | None = None,
    progress: Callable[[str], None] | None = None,
    replay: Sequence[dict] | None = None,
) -> list[dict]:
    """Sample ``n`` first attempts (and optionally one reflection-prompted second attempt per failure).

    ``act(prompts, generation)`` returns a :class:`modules.shared_base.Generation` (``AgentModule.act``);
    ``make_env()`` builds one environment (reset before every attempt). Returns one record per attempt, in order:
    first attempts of batch 0, its second attempts, first attempts of batch 1, ...

    ``replay``: first-attempt records of an earlier measurement (same task prompt, checked by hash) to step
    again instead of sampling new ones -- for comparing reflection prompts on the same failures; ``n`` is then
    ``len(replay)`` at most.
    """
    import torch

    from envs.base import TextVectorEnv

    if replay is not None:
        replay = [r for r in replay if r["attempt"] == 1][:n]
        n = len(replay)
    if n < 1 or batch_size < 1:
        raise ValueError(f"n and batch_size must be >= 1, got n={n}, batch_size={batch_size}")
    envs = [make_env() for _ in range(min(batch_size, n))]
    if second_attempt and any(getattr(e, "max_steps", 2) < 2 or not getattr(e, "reflection", True) for e in envs):
        raise ValueError("--second-attempt needs environments with max_steps >= 2 and reflection=True")
    if replay is not None:
        task = prompt_digest(envs[0].reset()[0])
        if any(r.get("prompt_sha256") != task for r in replay):
            raise ValueError("the replayed first attempts were sampled from another task prompt "
                             "(dataset, prompt style or prompt text differ)")
    vec = TextVectorEnv(envs)
    records: list[dict] = []
    try:
        for batch, start in enumerate(range(0, n, batch_size)):
            size = min(batch_size, n - start)
            idx = list(range(size))
            # A replay draws its second attempts from a stream of their own: with the first attempts' seed the
            # same random draws would pick nearly the same tokens again, repeating the very samples that failed.
            torch.manual_seed(seed * 100003 + batch + (REPLAY_STREAM if replay is not None else 0))
            prompts, _ = vec.reset(indices=idx)
            t0 = time.monotonic()
            if replay is None:
                gen = _generated(act(prompts, generation))
            else:
                rows = replay[start : start + size]
                gen = {"texts": [r["text"] for r in rows], "prompt_tokens": [r["prompt_tokens"] for r in rows],
                       "action_tokens": [r["action_tokens"] for r in rows], "finished": [r["finished"] for r in rows]}
            t_gen = time.monotonic() - t0
            obs, rewards, terminated, truncated, infos = vec.step(gen["texts"], indices=idx)
            batch_records = _records(gen, prompts, infos, rewards, batch, [start + i for i in idx], attempt=1)
            retry = [i for i in idx if not terminated[i] and not truncated[i]] if second_attempt else []
            if retry:
                retry_prompts = [obs[i] for i in retry]
                gen2 = _generated(act(retry_prompts, generation))
                _, rewards2, _, _, infos2 = vec.step(gen2["texts"], indices=retry)
                batch_records += _records(gen2, retry_prompts, infos2, rewards2, batch, [start + i for i in retry],
                                          attempt=2)
            for rec in batch_records:
                if on_record is not None:
                    on_record(rec)
            records += batch_records
            if progress is not None:
                firsts = [r for r in records if r["attempt"] == 1]
                ok = sum(r["status"] == "ok" for r in firsts)
                msg = f"batch {batch}: {start + size}/{n} first attempts, {ok} ran (generation {t_gen:.0f} s)"
                if second_attempt:
                    seconds = [r for r in records if r["attempt"] == 2]
                    msg += f"; second attempts {sum(r['status'] == 'ok' for r in seconds)}/{len(seconds)} ran"
                progress(msg)
    finally:
        vec.close()
    return records


def prompt_digest(prompt: str) -> str:
    """Short SHA-256 of a prompt (records say which prompt they were sampled from)."""
    return hashlib.sha256(prompt.encode()).hexdigest()[:16]


def _generated(gen) -> dict:
    return {"texts": list(gen.texts), "prompt_tokens": gen.prompt_mask.sum(1).tolist(),
            "action_tokens": gen.action_mask.sum(1).tolist(), "finished": gen.finished.tolist()}


def _records(gen: dict, prompts, infos, rewards, batch: int, sample_ids: Sequence[int], attempt: int) -> list[dict]:
    out = []
    for j, (text, info, reward) in enumerate(zip(gen["texts"], infos, rewards)):
        out.append({
            "sample": int(sample_ids[j]),
            "batch": batch,
            "attempt": attempt,
            "prompt_sha256": prompt_digest(prompts[j]),
            "prompt_tokens": int(gen["prompt_tokens"][j]),
            "action_tokens": int(gen["action_tokens"][j]),
            "finished": bool(gen["finished"][j]),  # EOS or a stop string, not cut at max_new_tokens
            "status": info["status"],
            "kind": failure_kind(info["status"], info.get("error")),
            "reward": float(reward),
            "auc": info.get("auc"),
            "error": info.get("error"),
            "text": text,
            "code": info.get("code"),
        })
    return out


def summarize(records: Sequence[dict], attempt: int = 1, top_messages: int = 8) -> dict:
    """Counts of one attempt's records: runnable rate and Wilson interval, rewards, failure kinds, first lines."""
    rows = [r for r in records if r["attempt"] == attempt]
    n = len(rows)
    ok = sum(r["status"] == "ok" for r in rows)
    rewards = np.array([r["reward"] for r in rows], dtype=float)
    aucs = rewards[rewards > -1.0]
    low, high = wilson_interval(ok, n) if n else (float("nan"), float("nan"))
    edges = (-np.inf, 0.0) + REWARD_BINS + (np.inf,)
    labels = ["-1 (failed)"] + [f"[{a:g}, {b:g})" if np.isfinite(b) else f">= {a:g}"
                                for a, b in zip(edges[1:-1], edges[2:])]
    counts = np.histogram(rewards, bins=np.array(edges, dtype=float))[0].tolist() if n else [0] * len(labels)
    messages = collections.Counter(_normalise_message(first_error_line(r["error"])) for r in rows if r["status"] != "ok")
    return {
        "attempt": attempt,
        "n": n,
        "runnable": ok,
        "rate": ok / n if n else float("nan"),
        "wilson95": [low, high],
        "statuses": dict(collections.Counter(r["status"] for r in rows).most_common()),
        "kinds": dict(collections.Counter(r["kind"] for r in rows).most_common()),
        "top_errors": [[message, count] for message, count in messages.most_common(top_messages)],
        "reward_hist": dict(zip(labels, counts)),
        "auc_mean": float(aucs.mean()) if len(aucs) else None,
        "auc_max": float(aucs.max()) if len(aucs) else None,
        "mean_reward": float(rewards.mean()) if n else None,
        "mean_action_tokens": float(np.mean([r["action_tokens"] for r in rows])) if n else None,
        "cut_at_max_tokens": sum(not r["finished"] for r in rows),
        "prompt_tokens": [min(r["prompt_tokens"] for r in rows), max(r["prompt_tokens"] for r in rows)] if n else None,
    }


def format_summary(summary: dict, title: str = "") -> str:
    """Human-readable block of :func:`summarize`'s output."""
    s = summary
    lines = [title] if title else []
    if not s["n"]:
        return "\n".join(lines + ["  no attempts"])
    lo, hi = s["wilson95"]
    lines.append(f"  runnable: {s['runnable']}/{s['n']} = {s['rate']:.1%}   95% Wilson [{lo:.1%}, {hi:.1%}]")
    if s["auc_mean"] is not None:
        lines.append(f"  AUC of runnable: mean {s['auc_mean']:.4f}, max {s['auc_max']:.4f}")
    lines.append(f"  mean reward {s['mean_reward']:.4f}; action tokens mean {s['mean_action_tokens']:.1f}, "
                 f"{s['cut_at_max_tokens']} cut at max_new_tokens; prompt tokens {s['prompt_tokens'][0]}-{s['prompt_tokens'][1]}")
    lines.append("  rewards:  " + ", ".join(f"{k}: {v}" for k, v in s["reward_hist"].items()))
    lines.append("  kinds:")
    lines += [f"    {v:4d}  {k}" for k, v in s["kinds"].items()]
    if s["top_errors"]:
        lines.append("  most common first error lines:")
        lines += [f"    {v:4d}  {k}" for k, v in s["top_errors"]]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------------------------

def _git_commit() -> str | None:
    """The checkout's commit (with ``+dirty`` when tracked files differ from it), or None outside git."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="breast_cancer", help="a load_dataset name (default: breast_cancer)")
    p.add_argument("--data-dir", default=None, help="where benchmark tables live (default: ETPO_DATA_DIR / ../shared)")
    p.add_argument("--prompt-style", default="few_shot", help="envs.datascience.prompts style (default: few_shot)")
    p.add_argument("--n-few-shot", type=int, default=2, help="worked examples of the few-shot styles (default: 2)")
    p.add_argument("--n", type=int, default=64, help="first attempts to sample (default: 64)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generation batch (default: 8)")
    p.add_argument("--second-attempt", action="store_true",
                   help="after each failed first attempt, sample once from the env's reflection prompt")
    p.add_argument("--reflection-layout", default="task_first", help="task_first (default) or feedback_first")
    p.add_argument("--continue-after-success", action="store_true",
                   help="episodes go on after code that runs (stop_on_success=False): with --second-attempt every "
                        "first attempt gets a second one, after an error or after its AUC")
    p.add_argument("--replay", default=None,
                   help="a samples JSONL of an earlier run: step its first attempts again (same task prompt) "
                        "instead of sampling; with --second-attempt, compares reflection prompts on the same failures")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.5)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--no-stop-strings", action="store_true", help="stop at EOS / max_new_tokens only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-splits", type=int, default=5, help="validation splits of the reward (default: 5)")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=20.0, help="seconds per evaluation (default: 20)")
    p.add_argument("--source", default="smollm2", help="BackboneConfig.source (default: smollm2; tests: tiny)")
    p.add_argument("--name-or-path", default=None, help="BackboneConfig.name_or_path (source hf / gguf)")
    p.add_argument("--gguf-cache-dir", default=str(REPO / "runs" / ".model_cache"),
                   help="safetensors copy of the GGUF model (default: <repo>/runs/.model_cache)")
    p.add_argument("--device", default="cpu", help="torch device of the model (default: cpu, as the quickstart)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="JSONL file for the samples (default: runs/base_rate/<label>.jsonl)")
    p.add_argument("--summary-jsonl", default=None, help="append the summary as one JSON line to this file")
    p.add_argument("--label", default=None, help="name of this measurement (default: <dataset>_<style>_s<seed>)")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: Sequence[str] | None = None, backbone=None) -> dict:
    """Run one measurement; returns the summary (``backbone`` overrides the one built from the options)."""
    args = build_parser().parse_args(argv)
    import torch

    from datamodules.rollout import GenerationConfig
    from envs.datascience import DataScienceEnv
    from envs.datascience.datasets import data_directories
    from envs.machine_paths import MachinePaths
    from modules.reflection import ReflectionModule
    from modules.shared_base import BackboneConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    say = (lambda msg: None) if args.quiet else (lambda msg: print(msg, flush=True))
    label = args.label or f"{args.dataset}_{args.prompt_style}_s{args.seed}"
    commit = _git_commit()  # now: the code that runs (the tree may change while it does)
    env_kwargs = dict(
        dataset=args.dataset, prompt_style=args.prompt_style, n_few_shot=args.n_few_shot, data_dir=args.data_dir,
        max_steps=2 if args.second_attempt else 1, reflection=True, n_splits=args.n_splits,
        split_seed=args.split_seed, timeout=args.timeout, reflection_layout=args.reflection_layout,
        stop_on_success=not args.continue_after_success,
    )
    probe = DataScienceEnv(**env_kwargs)  # fail on a bad dataset / style before the model loads
    generation = GenerationConfig(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        stop_strings=[] if args.no_stop_strings else list(QUICKSTART_STOP_STRINGS),
    )
    if backbone is None:
        backbone = BackboneConfig(source=args.source, name_or_path=args.name_or_path, device=args.device,
                                  dtype=args.dtype, gguf_cache_dir=args.gguf_cache_dir)
    t0 = time.monotonic()
    agent = ReflectionModule(backbone)  # the untrained contender: its policy view is the base model
    agent.configure_model()
    prompt_tokens = len(agent.encode_prompts([probe.prompt])[0])
    say(f"{label}: model {backbone.source} loaded in {time.monotonic() - t0:.1f} s; task prompt {prompt_tokens} tokens")

    replay = None
    if args.replay:
        if not Path(args.replay).is_file():
            raise SystemExit(f"--replay: no samples file {args.replay!r} (a JSONL written by an earlier run's --out)")
        replay = [json.loads(line) for line in Path(args.replay).read_text().splitlines() if line.strip()]
    out = Path(args.out) if args.out else REPO / "runs" / "base_rate" / f"{label}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with open(out, "w") as fh:
        def write(rec: dict) -> None:
            fh.write(json.dumps(rec) + "\n")
            fh.flush()

        records = measure(agent.act, lambda: DataScienceEnv(**env_kwargs), generation, args.n, args.batch_size,
                          args.seed, args.second_attempt, on_record=write, progress=say, replay=replay)
    wall = time.monotonic() - t0
    machine = MachinePaths(checkouts=(REPO,), data_dirs=data_directories(args.data_dir))  # the summary names none
    summary = {
        "label": label,
        "options": machine.portable_value(
            {k: v for k, v in vars(args).items() if k not in ("out", "summary_jsonl", "quiet", "label")}),
        "generation": {"max_new_tokens": generation.max_new_tokens, "temperature": generation.temperature,
                       "top_k": generation.top_k, "top_p": generation.top_p, "stop_strings": generation.stop_strings},
        "commit": commit,
        "task_prompt_tokens": prompt_tokens,
        "task_prompt_sha256": prompt_digest(probe.prompt),
        "first": summarize(records, 1),
        "wall_s": round(wall, 1),
        "samples": machine.portable_text(str(out.resolve())),
    }
    if args.second_attempt:
        second = summarize(records, 2)
        firsts = summary["first"]
        ran_within_two = firsts["runnable"] + second["runnable"]
        summary["second"] = second
        summary["within_two"] = {"runnable": ran_within_two, "n": firsts["n"], "rate": ran_within_two / firsts["n"],
                                 "wilson95": list(wilson_interval(ran_within_two, firsts["n"]))}
    say(format_summary(summary["first"], f"{label}: first attempts"))
    if args.second_attempt:
        say(format_summary(summary["second"], f"{label}: second attempts (after the reflection prompt)"))
        w = summary["within_two"]
        say(f"  runnable within two attempts: {w['runnable']}/{w['n']} = {w['rate']:.1%}   "
            f"95% Wilson [{w['wilson95'][0]:.1%}, {w['wilson95'][1]:.1%}]")
    say(f"samples: {out}  ({wall:.0f} s)")
    if args.summary_jsonl:
        path = Path(args.summary_jsonl)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as fh:
            fh.write(json.dumps(summary) + "\n")
    return summary


if __name__ == "__main__":
    main()
