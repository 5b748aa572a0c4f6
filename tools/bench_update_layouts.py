"""The ETPO update on the quickstart's batch shapes, before and after the exact speed-up of the gradient steps.

    python tools/bench_update_layouts.py --dataset balance_scale --repeats 3

Builds two rollout batches of 8 rows from real untrained answers of SmolLM2 on the dataset (the headroom samples in
docs/results/headroom/<dataset>_samples.jsonl.gz), each row's state and next state as the env makes them:

* **first attempts** -- every row the task prompt (the CPU setting without feedback: after a failure the task again);
* **attempts with feedback** -- every row a later attempt of an episode that goes on (``stop_on_success: false``):
  after an earlier answer that ran, the task prompt, that answer as sampled, one line with its AUC and the short stub;
  after one that failed, the task prompt again (the quickstart's ``reflection: false``; ``--reflection``: its error
  and a hint instead); every row has a next state of the same kind.

For each it times, in one process and alternately (the machines are noisy; medians), the update as it is (the critic
and policy steps plan the batch without the next prompts, which only the targets read) and as it was before (those
steps over the plan with the next prompts) -- the same losses and gradients (tests/test_reflection_layout.py) -- and
prints the positions every forward computes.
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
import etpo  # noqa: E402,F401  (before torch: passive OpenMP waits)
import torch  # noqa: E402


def _samples(dataset: str) -> list[dict]:
    path = REPO / "docs" / "results" / "headroom" / f"{dataset}_samples.jsonl.gz"
    with gzip.open(path, "rt") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def build_batches(module, dataset: str, reflection: bool = False):
    from datamodules.batch import GenerationConfig, RolloutBatch, RolloutMetrics, pad_rows
    from envs.datascience import DataScienceEnv
    from envs.datascience.prompts import task_first_prompt

    env = DataScienceEnv(dataset, prompt_style="few_shot", max_steps=5, n_splits=1)
    task = env.prompt
    recs = _samples(dataset)[:24]

    def state(rec):  # the state after answer `rec`, as the env builds it
        auc = rec["reward"] if rec["status"] == "ok" else None
        if auc is None and not reflection:
            return task
        return task_first_prompt(task, rec.get("code"), rec["text"], None if auc is not None else rec["error"], auc)

    answers = recs[:8]                 # the actions of the batch
    earlier = recs[8:16]               # the answers the reflection rows saw
    enc = lambda texts: [r[m.bool()].tolist() for r, m in zip(*module.model.encode_prompts(texts))]  # noqa: E731
    sampling = GenerationConfig(max_new_tokens=96, temperature=0.5, top_k=50)
    actions = []
    for rec in answers:
        ids, mask = module.model.encode_actions([rec["text"]])
        actions.append(ids[0][mask[0].bool()].tolist()[:96])
    batches = {}
    for name, prompts in (("first attempts", [task] * 8), ("attempts with feedback", [state(r) for r in earlier])):
        nexts = [state(r) for r in answers]
        if name == "first attempts":  # no feedback: the next state of a failure is the task, of a success the end
            nexts = [task for _ in answers]
        done = [name == "first attempts" and r["status"] == "ok" for r in answers]
        need = [i for i in range(8) if not done[i]]
        p_ids, p_mask = pad_rows(enc(prompts), "left")
        a_ids, a_mask = pad_rows(actions, "right")
        n_ids, n_mask = pad_rows(enc([nexts[i] for i in need]), "left") if need else (None, None)
        batches[name] = RolloutBatch(
            prompt_ids=p_ids, prompt_mask=p_mask, action_ids=a_ids, action_mask=a_mask,
            rewards=torch.tensor([r["reward"] for r in answers], dtype=torch.float32),
            terminated=torch.tensor(done), truncated=torch.zeros(8, dtype=torch.bool),
            next_index=torch.full((8,), -1), next_needed=torch.tensor(need, dtype=torch.long),
            env_index=torch.arange(8), episode_step=torch.ones(8, dtype=torch.long),
            runnable=torch.tensor([r["status"] == "ok" for r in answers]), policy_version=0, sampling=sampling,
            metrics=RolloutMetrics(0.0, 0.0, 0.0, 0.0, 0.0, 0.0), next_prompt_ids=n_ids, next_prompt_mask=n_mask)
    return batches


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="balance_scale")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--reflection", action="store_true", help="failed answers' states show the error (default: the task)")
    ap.add_argument("--only", default=None, help="time one batch kind only: 'first' or 'feedback'")
    args = ap.parse_args(argv)
    from modules.etpo import ETPOModule
    from modules.shared_base import BackboneConfig

    class Before(ETPOModule):
        """The update before the change: the gradient steps over the plan with the next prompts."""

        def plan(self, batch, next_prompts: bool = True):
            return super().plan(batch, True)

    backbone = BackboneConfig(source="smollm2", gguf_cache_dir=str(REPO / "runs" / ".model_cache"))
    kw = dict(backbone=backbone, beta=0.05, q_parameterisation="zero", td_lambda=1.0, trace_correction=False,
              critic_steps=2, policy_lr=2e-4, critic_lr=5e-4, polyak=0.9)
    now = ETPOModule(**kw)
    now.configure_model()
    before = Before(**kw)
    before.model = now.model  # one model: the two differ only in how the gradient steps plan the batch
    now.model.train()
    batches = build_batches(now, args.dataset, args.reflection)
    if args.only:
        batches = {k: v for k, v in batches.items() if args.only in k}
    print(f"dataset {args.dataset}; torch threads {torch.get_num_threads()}")
    print(f"{'batch':<24}{'positions: targets':>20}{'gradient steps':>16}{'before':>10}{'now':>10}{'ratio':>8}")
    for name, batch in batches.items():
        with_next, without = now.plan(batch), now.plan(batch, next_prompts=False)
        times = {"before": [], "now": []}
        with now.without_trainer(), before.without_trainer():
            for module in (before, now):  # warm-up: allocator, optimizer state
                module.learn(batch)
            for _ in range(args.repeats):
                for label, module in (("before", before), ("now", now)):
                    t0 = time.perf_counter()
                    module.learn(batch)
                    times[label].append(time.perf_counter() - t0)
        b, n = statistics.median(times["before"]), statistics.median(times["now"])
        print(f"{name:<24}{with_next.tokens_computed:>20}{without.tokens_computed:>16}{b:>9.1f}s{n:>9.1f}s"
              f"{b / n:>7.2f}x", flush=True)


if __name__ == "__main__":
    main()
