"""What each answer string costs in KL, and what the soft-optimal policy makes of it (docs/results/soft_optimal.md, 7).

ETPO's objective for one attempt, E[R] - beta KL(pi || pi_bar), is maximised by

    pi*(s) = pi_bar(s) exp(R(s) / beta) / Z                       (docs/method.md, section 6, at the answer level)

so an answer *string* is worth its reward less beta times its price -log pi_bar(s) (the reference at temperature 1,
summed over its tokens). The answer trees (method.md 4a, ``unwritten_value: zero``) hold the strings written so far:
their pi* restricted to those strings is this formula, the strings never written sharing what is left. This tool
reads a run's attempts at the task prompt (``samples.jsonl[.gz]``: every episode's first, and every one after a failure where the
environment shows the task prompt again), scores every
distinct string under the reference -- its ``log pi_bar`` and its ``log mu`` under the sampling distribution of the
run (temperature, top-k, top-p: the run's config.yaml) -- and prints

* per answer class: how many strings, how many distinct, the most frequent string's ``log pi_bar`` and reward;
* per batch k and beta: the share that pi* over the distinct strings written in batches 1..k gives each class
  (``sum_s pi_bar(s) exp(R(s) / beta)`` per class, normalised over the classes shown), i.e. the trees' choice
  between the classes for one attempt at the task prompt, next-state values left out;
* with ``--untrained`` (every sample drawn from the base model, e.g. Reflection's runs): the classes' mass under the
  reference itself, estimated by importance weighting the samples, ``pi_bar(c) ~ mean_i 1[c_i = c] pi_bar(s_i) /
  mu(s_i)`` with its effective sample size, and the class-level pi* of the untrained answers at each beta.

Token ids are the decoded texts tokenised again (``encode_actions`` without EOS), which is how the sampler's ids read
back in almost every case; a string's price is therefore that of its canonical tokenisation.

    python tools/string_prices.py docs/results/learning_v3/runs/etpo_trees/balance_scale/seed0
    python tools/string_prices.py docs/results/learning_v3/runs/reflection/balance_scale/seed{0,1,2,3,4} --untrained
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import math
import sys
from pathlib import Path
from typing import Iterable, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))
import etpo  # noqa: E402,F401  (before torch: idle OpenMP threads wait passively)

import torch  # noqa: E402

__all__ = ["read_first_attempts", "class_shares", "importance_class_mass", "main"]


def read_first_attempts(run_dir: Path, after_failure: bool = True) -> list[dict]:
    """The run's attempts at the task prompt: every episode's first, and (``after_failure``: an env without
    reflection shows the task prompt again after a failure) every attempt that follows a failed one in its
    environment. Batch, text, reward, answer class, as written."""
    path = run_dir / "samples.jsonl"
    if not path.exists():
        path = run_dir / "samples.jsonl.gz"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir}: no samples.jsonl or samples.jsonl.gz (a run directory of etpo.fit?)")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        samples = [json.loads(line) for line in f if line.strip()]
    previous: dict[int, dict] = {}  # env_index -> its attempt of the batch before
    rows = []
    for s in sorted(samples, key=lambda s: (int(s["batch"]), int(s.get("env_index", 0)))):
        env = int(s.get("env_index", 0))
        before = previous.get(env)
        fresh = s.get("episode_step", 1) == 1 or (
            after_failure and before is not None and int(before["batch"]) == int(s["batch"]) - 1
            and before.get("status") != "ok")
        previous[env] = s
        if fresh and s.get("text") is not None:
            rows.append({"batch": int(s["batch"]), "text": s["text"], "reward": float(s["reward"]),
                         "cls": s.get("answer_class") or "(none)"})
    return rows


def class_shares(strings: Iterable[tuple[str, float, float]], beta: float) -> dict[str, float]:
    """pi* over distinct strings ``(class, log pi_bar, reward)``, summed per class: ``{class: share}`` (sums to 1).
    Computed in log space: rewards over beta reach e^100 at beta 0.01."""
    by_class: dict[str, list[float]] = collections.defaultdict(list)
    for cls, log_ref, reward in strings:
        by_class[cls].append(log_ref + reward / beta)
    log_mass = {c: torch.logsumexp(torch.tensor(v, dtype=torch.float64), 0).item() for c, v in by_class.items()}
    total = torch.logsumexp(torch.tensor(list(log_mass.values()), dtype=torch.float64), 0).item()
    return {c: math.exp(m - total) for c, m in log_mass.items()}


def importance_class_mass(samples: Sequence[tuple[str, float, float]]) -> tuple[dict[str, float], dict[str, float]]:
    """``pi_bar(c)`` per class from samples ``(class, log pi_bar, log mu)`` drawn from mu: the self-normalised
    importance-sampling estimate, and per class (and ``"all"``) the effective sample size ``(sum w)^2 / sum w^2`` of
    its weights -- near 1 when one string carries the estimate, which then says little."""
    samples = [x for x in samples if math.isfinite(x[2])]  # log mu = -inf: not a string the sampler could draw
    log_w = torch.tensor([lr - lm for _, lr, lm in samples], dtype=torch.float64)
    w = torch.softmax(log_w, 0)
    mass: dict[str, float] = collections.defaultdict(float)
    squares: dict[str, float] = collections.defaultdict(float)
    for (cls, _, _), wi in zip(samples, w.tolist()):
        mass[cls] += wi
        squares[cls] += wi * wi
    ess = {c: mass[c] ** 2 / squares[c] for c in mass if squares[c] > 0}
    ess["all"] = float(1.0 / (w ** 2).sum())
    return dict(mass), ess


def _settings(run_dir: Path) -> tuple[dict, dict, dict]:
    """The run's env init_args, generation settings and backbone (its config.yaml)."""
    import yaml

    path = run_dir / "config.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir}: no config.yaml (a run directory of etpo.fit?)")
    cfg = yaml.safe_load(path.read_text())
    return (dict(cfg["data"]["env"]["init_args"]), dict(cfg["data"]["generation"]),
            dict(cfg["model"]["init_args"]["backbone"]))


@torch.no_grad()
def _score(module, prompt: str, texts: list[str], generation: dict, rows_per_forward: int = 8):
    """``(log pi_bar(s), log mu(s))`` of every text after ``prompt``: the reference view (adapters off), mu its
    sampling distribution at the run's temperature / top-k / top-p."""
    from modules.losses.etpo import behaviour_log_probs

    m = module.model
    prompt_ids, prompt_mask = m.encode_prompts([prompt])
    out = []
    for start in range(0, len(texts), rows_per_forward):
        chunk = texts[start: start + rows_per_forward]
        action_ids, action_mask = m.encode_actions(chunk, append_eos=False)
        n = len(chunk)
        plan = m.plan(prompt_ids.expand(n, -1), prompt_mask.expand(n, -1), action_ids, action_mask)
        hidden, _ = m.plan_hidden("reference", plan)
        logits = m.head(hidden).float()
        log_ref = torch.log_softmax(logits, -1).gather(-1, action_ids.unsqueeze(-1)).squeeze(-1)
        log_mu = behaviour_log_probs(logits, action_ids, generation.get("temperature", 1.0),
                                     generation.get("top_k", 0) or 0, generation.get("top_p", 1.0))
        mask = action_mask.bool()
        for i in range(n):
            out.append((float(log_ref[i][mask[i]].sum()), float(log_mu[i][mask[i]].sum()), int(mask[i].sum())))
    return out


def _load_module(backbone: dict):
    """An untrained ETPO module of the runs' backbone: its reference view is the base model."""
    from modules.etpo import ETPOModule
    from modules.shared_base import BackboneConfig

    module = ETPOModule(backbone=BackboneConfig.from_dict(backbone))
    module.configure_model()
    module.model.eval()
    return module


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (samples.jsonl[.gz] and config.yaml)")
    parser.add_argument("--betas", default="0.05,0.02,0.01")
    parser.add_argument("--classes", default="LogisticRegression,RandomForestClassifier",
                        help="the classes compared (the rest are summed as 'other'; failures are left out)")
    parser.add_argument("--untrained", action="store_true",
                        help="the samples were drawn from the base model: estimate the classes' mass under it")
    args = parser.parse_args(argv)
    betas = [float(b) for b in args.betas.split(",")]
    shown = args.classes.split(",")

    from envs.datascience import DataScienceEnv

    backbones = {json.dumps(_settings(r)[2], sort_keys=True) for r in args.runs}
    if len(backbones) > 1:
        raise SystemExit("string_prices: the runs were made with different base models (config.yaml "
                         "model.init_args.backbone); price each base model's runs separately")
    module = _load_module(json.loads(backbones.pop()))
    pooled: list[tuple[str, float, float]] = []       # (class, log pi_bar, log mu) of every sample, untrained
    pooled_reward: dict[str, list[float]] = collections.defaultdict(list)
    for run_dir in args.runs:
        env_args, generation, _ = _settings(run_dir)
        env_args.pop("pool", None)
        env = DataScienceEnv(**env_args)
        prompt, _ = env.reset(seed=0)
        env.close()
        rows = read_first_attempts(run_dir, after_failure=not env_args.get("reflection", True))
        texts = sorted({r["text"] for r in rows})
        scored = dict(zip(texts, _score(module, prompt, texts, generation)))
        print(f"\n== {run_dir}: {len(rows)} first attempts, {len(texts)} distinct strings")
        counts = collections.Counter((r["cls"], r["text"]) for r in rows)
        runnable = {r["text"] for r in rows if r["reward"] > -1}
        for cls in shown:
            mine = [(n, t) for (c, t), n in counts.items() if c == cls and t in runnable]
            if not mine:
                print(f"  {cls}: none that ran")
                continue
            n, top = max(mine)
            reward = max(r["reward"] for r in rows if r["text"] == top)
            lr, lm, k = scored[top]
            cheapest = max(scored[t][0] for _, t in mine)
            print(f"  {cls}: {sum(x for x, _ in mine)} ran, {len(mine)} distinct; the most frequent ({n}x, "
                  f"{k} tokens): log pi_bar {lr:.1f}, log mu {lm:.1f}, reward {reward:.3f}; the cheapest: log pi_bar "
                  f"{cheapest:.1f}")
        batches = sorted({r["batch"] for r in rows})
        print("  pi* over the distinct runnable strings written in batches 1..k, per class (" +
              ", ".join(shown) + ", other):")
        for beta in betas:
            line = []
            for k in batches:
                seen = {(r["cls"], r["text"]): r["reward"] for r in rows if r["batch"] <= k and r["reward"] > -1}
                strings = [(c if c in shown else "other", scored[t][0], rew) for (c, t), rew in seen.items()]
                shares = class_shares(strings, beta) if strings else {}
                line.append("/".join(f"{shares.get(c, 0.0):.2f}" for c in shown + ["other"]))
            print(f"    beta {beta:<5}: " + "  ".join(f"b{k} {s}" for k, s in zip(batches, line)))
        if args.untrained:
            for r in rows:
                lr, lm, _ = scored[r["text"]]
                cls = r["cls"] if r["reward"] > -1 else "(failed)"
                pooled.append((cls if cls in shown or cls == "(failed)" else "other", lr, lm))
                if r["reward"] > -1:
                    pooled_reward[r["cls"]].append(r["reward"])
    if args.untrained and pooled:
        drawable = sum(math.isfinite(lm) for _, _, lm in pooled)
        mass, ess = importance_class_mass(pooled)
        sampled = collections.Counter(c for c, _, _ in pooled)
        print(f"\n== untrained answers, pooled: {len(pooled)} first attempts; the reference's own class mass "
              f"(importance-weighted from the sampling distribution, {drawable} whose tokenisation the sampler "
              f"could draw; effective sample size {ess['all']:.1f}):")
        for cls in shown + ["other", "(failed)"]:
            print(f"  {cls:<24} sampled {sampled.get(cls, 0) / len(pooled):6.1%}   under pi_bar ~ {mass.get(cls, 0):6.1%}"
                  f"   (effective sample size within the class {ess.get(cls, 0):.1f})")
        rewards = {c: sum(v) / len(v) for c, v in pooled_reward.items() if c in shown}
        weak = [c for c in shown if ess.get(c, 0) < 10]
        if weak:
            print(f"  class-level pi* not shown: too few effective samples for {', '.join(weak)} (< 10; the sampler's "
                  "temperature puts its strings far from the reference's)")
        elif len(rewards) == len(shown):
            print("  class-level pi* between them (mass under pi_bar x exp(mean reward / beta)):")
            for beta in betas:
                logs = {c: math.log(max(mass.get(c, 0), 1e-300)) + rewards[c] / beta for c in shown}
                top = max(logs.values())
                z = sum(math.exp(v - top) for v in logs.values())
                print(f"    beta {beta:<5}: " + "  ".join(f"{c} {math.exp(logs[c] - top) / z:.2f}" for c in shown))


if __name__ == "__main__":
    try:
        main()
    except FileNotFoundError as err:  # a folder that is not a run directory: one line, no traceback
        raise SystemExit(f"string_prices: {err}")
