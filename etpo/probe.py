"""Where a run's answers part, and what each view says there: the answer-class probe (docs/results/soft_optimal.md).

Answers of different classes (the estimator the code builds, :func:`envs.datascience.extract.answer_class`) written
for the same task prompt share a prefix and then part at one token -- ``clf`` (go on with the forest) against
``from`` (a second import, which may become a logistic regression). Whether a run keeps a better class it has found
is decided at those tokens: by the critic's Q there, by the policy pi_theta, the reference pi_bar and the optimal soft
policy pi* = pi_bar exp(Q / beta) / Z the policy step aims at (docs/method.md, section 6).

:class:`AnswerClassProbe` keeps one *exemplar* per class -- the best-rewarded answer of that class written for the task
prompt (the prompt every episode starts from), as sampled -- and after every update reads, for the leading classes,

* each exemplar's log-probability under pi_theta, pi_bar and (ETPO) pi*: ``logp_policy``, ``logp_reference``,
  ``logp_optimal`` (sums over its tokens);
* at every token where two tracked exemplars part -- each against the most frequent class of the batch and against
  the best-rewarded class -- each side's pi_theta, pi_bar, pi* and Q of its own next token; with the answer trees
  (ETPO's ``optimal_tree`` forms) also the trees' own ``q_tree`` and ``pi_optimal_tree`` there (the last update's
  trees, where an answer of theirs reached that prefix).

Its readings go under ``choice`` in the batch's line of ``history.jsonl`` (:class:`etpo.fit.RunArtifacts` writes it
after this callback has run) and to TensorBoard under ``choice/``. Read-only: no parameter, optimizer or random
generator is touched, so a run with the probe samples exactly what one without it does.
"""

from __future__ import annotations

import math
import sys
from collections import Counter
from typing import Optional

import torch
from lightning.pytorch.callbacks import Callback

__all__ = ["AnswerClassProbe", "parting_positions"]

# per-token readings -> the probabilities reported at a parting token
_PROBABILITIES = (("logp_policy", "pi"), ("logp_reference", "pi_ref"), ("logp_optimal", "pi_optimal"))


def parting_positions(a: list[int], b: list[int]) -> Optional[int]:
    """The first position where two token sequences differ; None when one is a prefix of the other."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None


class AnswerClassProbe(Callback):
    """Per batch, the answer classes' exemplars and their parting tokens as every view reads them (module docstring).

    Args:
        max_classes: exemplars read per batch: the best-rewarded runnable classes and the most frequent classes so
            far, up to this many in all.
        context_chars: characters of the shared prefix shown before a parting token.
    """

    def __init__(self, max_classes: int = 5, context_chars: int = 60):
        self.max_classes = int(max_classes)
        self.context_chars = int(context_chars)
        self.task_prompt: Optional[list[int]] = None
        # class -> {"tokens", "reward", "batch", "runnable"}: the exemplar of every class written for the task prompt
        self.exemplars: dict[str, dict] = {}
        self.counts: Counter = Counter()  # answers per class over the run (every prompt)
        self.latest: Optional[dict] = None  # the last batch's readings (RunArtifacts puts them in history.jsonl)
        self._batch_classes: Counter = Counter()
        self._warned = False

    # ---- state (a resumed run goes on with the same exemplars) ---------------------------------------------------
    def state_dict(self) -> dict:
        return {"task_prompt": self.task_prompt, "exemplars": self.exemplars, "counts": dict(self.counts)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.task_prompt = state_dict.get("task_prompt")
        self.exemplars = dict(state_dict.get("exemplars") or {})
        self.counts = Counter(state_dict.get("counts") or {})

    # ---- the hook -------------------------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.latest = None
        stats = getattr(trainer.datamodule, "stats", None)
        rollout = getattr(pl_module, "last_batch", None)
        readings = getattr(pl_module, "token_readings", None)
        if stats is None or rollout is None or not callable(readings) or trainer.world_size > 1:
            return  # nothing to read, or sharded: every rank would have to run the same forwards
        samples = stats.batch_samples
        if len(samples) != len(rollout) or not any("answer_class" in s for s in samples):
            return  # the environment names no classes
        try:
            self._collect(rollout, samples, stats.updates)
            self.latest = self._read(trainer, pl_module, stats.updates)
        except Exception as err:  # noqa: BLE001 - a diagnostic must not end a long run
            if not self._warned:
                print(f"etpo.fit: the answer-class probe is off for this run ({type(err).__name__}: {err})",
                      file=sys.stderr, flush=True)
                self._warned = True
            return
        if self.latest is not None and trainer.is_global_zero:
            self._write(trainer, self.latest)

    def _collect(self, rollout, samples: list[dict], batch_number: int) -> None:
        prompts = [row[m.bool()].tolist() for row, m in zip(rollout.prompt_ids.cpu(), rollout.prompt_mask.cpu())]
        actions = [row[m.bool()].tolist() for row, m in zip(rollout.action_ids.cpu(), rollout.action_mask.cpu())]
        if self.task_prompt is None:  # the prompt most rows of the first batch share: every episode's first state
            first = [p for p, s in zip(prompts, samples) if s.get("episode_step", 1) == 1] or prompts
            self.task_prompt = list(Counter(tuple(p) for p in first).most_common(1)[0][0])
        for prompt, action, sample in zip(prompts, actions, samples):
            name = sample.get("answer_class")
            if name is None:
                continue
            self.counts[name] += 1
            if prompt != self.task_prompt:
                continue
            runnable = sample.get("status") == "ok"
            held = self.exemplars.get(name)
            if held is None or (runnable, sample["reward"]) > (held["runnable"], held["reward"]):
                self.exemplars[name] = {"tokens": action, "reward": float(sample["reward"]), "runnable": runnable,
                                        "batch": batch_number}
        self._batch_classes = Counter(s.get("answer_class") for s in samples if s.get("answer_class"))

    def _tracked(self) -> list[str]:
        runnable = sorted((c for c, e in self.exemplars.items() if e["runnable"]),
                          key=lambda c: -self.exemplars[c]["reward"])
        frequent = [c for c, _ in (self._batch_classes + self.counts).most_common() if c in self.exemplars]
        tracked: list[str] = []
        for name in runnable[:2] + frequent + runnable[2:]:
            if name not in tracked and len(tracked) < self.max_classes:
                tracked.append(name)
        return tracked

    @torch.no_grad()
    def _read(self, trainer, pl_module, batch_number: int) -> Optional[dict]:
        tracked = self._tracked()
        if not tracked:
            return None
        device = pl_module.device
        rows = [self.exemplars[c]["tokens"] for c in tracked]
        width = max(len(r) for r in rows)
        action_ids = torch.zeros(len(rows), width, dtype=torch.long)
        action_mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            action_ids[i, : len(r)] = torch.tensor(r)
            action_mask[i, : len(r)] = 1
        prompt = torch.tensor([self.task_prompt] * len(rows), dtype=torch.long)
        values = pl_module.token_readings(prompt.to(device), torch.ones_like(prompt).to(device),
                                          action_ids.to(device), action_mask.to(device))
        values = {k: v.float().cpu() for k, v in values.items()}
        classes = {}
        total = max(1, sum(self._batch_classes.values()))
        for i, name in enumerate(tracked):
            n = len(rows[i])
            held = self.exemplars[name]
            entry = {"reward": held["reward"], "runnable": held["runnable"], "found_in_batch": held["batch"],
                     "tokens": n, "batch_share": self._batch_classes.get(name, 0) / total}
            for key in ("logp_policy", "logp_reference", "logp_optimal"):
                if key in values:
                    entry[key] = float(values[key][i, :n].sum())
            classes[name] = entry
        frequent = max(tracked, key=lambda c: (self._batch_classes.get(c, 0), self.counts[c]))
        best = max(tracked, key=lambda c: (self.exemplars[c]["runnable"], self.exemplars[c]["reward"]))
        tokenizer = pl_module.model.tokenizer
        # the answer trees' own Q and pi* where the module keeps them (ETPO with the trees, docs/method.md 4a): what
        # the critic is trained towards and, with policy_target: optimal_tree, what the policy step aims at
        tree_of = getattr(pl_module, "tree_readings", None)
        trees = [tree_of(self.task_prompt, r) for r in rows] if callable(tree_of) else [None] * len(rows)
        beta = float(getattr(pl_module.hparams, "beta", 0.0) or 0.0)
        choices: dict[tuple, dict] = {}
        for anchor in dict.fromkeys((frequent, best)):
            a = tracked.index(anchor)
            for i, name in enumerate(tracked):
                if name == anchor:
                    continue
                pos = parting_positions(rows[i], rows[a])
                if pos is None:
                    continue
                key = (pos, tuple(rows[a][:pos]))
                choice = choices.setdefault(key, {
                    "position": pos, "context": tokenizer.decode(rows[a][:pos])[-self.context_chars:], "options": {}})
                for k in (i, a):
                    option = {"token": tokenizer.decode([rows[k][pos]])}
                    for source, out in _PROBABILITIES:
                        if source in values:
                            option[out] = math.exp(float(values[source][k, pos]))
                    if "q" in values:
                        option["q"] = float(values["q"][k, pos])
                    read = trees[k][pos] if trees[k] is not None else None
                    if read is not None and beta > 0 and "logp_reference" in values:
                        q_tree, v_tree = read
                        option["q_tree"] = q_tree
                        option["pi_optimal_tree"] = math.exp(float(values["logp_reference"][k, pos])
                                                             + (q_tree - v_tree) / beta)
                    choice["options"][tracked[k]] = option
        return {"batch": batch_number, "frequent": frequent, "best": best, "classes": classes,
                "choices": sorted(choices.values(), key=lambda c: c["position"])}

    def _write(self, trainer, latest: dict) -> None:
        experiment = getattr(trainer.logger, "experiment", None)
        if not hasattr(experiment, "add_scalar"):
            return
        step = trainer.global_step
        for name, entry in latest["classes"].items():
            for key in ("logp_policy", "logp_reference", "logp_optimal"):
                if key in entry:
                    experiment.add_scalar(f"choice/{name}/{key}", entry[key], step)
        for choice in latest["choices"]:
            for name, option in choice["options"].items():
                for key in ("pi", "pi_optimal", "q", "pi_optimal_tree", "q_tree"):
                    if key in option:
                        experiment.add_scalar(f"choice/{name}/at_{choice['position']}/{key}", option[key], step)
