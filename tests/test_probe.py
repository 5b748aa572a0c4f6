"""The answer-class probe (etpo/probe.py): exemplars per class at the task prompt, the tokens where they part, and
the views' readings there -- checked against a plain per-row forward of every view over the whole vocabulary."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from etpo.probe import AnswerClassProbe, parting_positions
from modules.losses.etpo import optimal_policy_logits, q_from_critic


def test_parting_positions():
    assert parting_positions([1, 2, 3], [1, 2, 4]) == 2
    assert parting_positions([5, 2], [1, 2]) == 0
    assert parting_positions([1, 2], [1, 2, 3]) is None  # one is a prefix of the other: they never part


@dataclass
class _Rollout:
    """The fields of a RolloutBatch the probe reads."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    action_ids: torch.Tensor
    action_mask: torch.Tensor

    def __len__(self):
        return len(self.prompt_ids)


def _pad(rows, left):
    width = max(len(r) for r in rows)
    ids, mask = torch.zeros(len(rows), width, dtype=torch.long), torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, sl], mask[i, sl] = torch.tensor(r), 1
    return ids, mask


def test_probe_readings_equal_a_plain_forward_of_every_view(views_apart):
    tok = views_apart.model.tokenizer
    task = tok.encode("q:", add_special_tokens=False)
    other = tok.encode("h:", add_special_tokens=False)
    forest, logreg, lasso = ([tok.convert_tokens_to_ids(c) for c in text] for text in ("abcab", "abdeh", "abdf"))
    prompts = [task, task, task, other, task]
    actions = [forest, logreg, lasso, logreg[::-1], forest]
    samples = [{"answer_class": "Forest", "status": "ok", "reward": 0.8, "episode_step": 1},
               {"answer_class": "LogReg", "status": "ok", "reward": 0.95, "episode_step": 1},
               {"answer_class": "Lasso", "status": "error", "reward": -1.0, "episode_step": 1},
               # another prompt (an "improve on it" state): counted, but no exemplar
               {"answer_class": "Tree", "status": "ok", "reward": 0.7, "episode_step": 2},
               {"answer_class": "Forest", "status": "ok", "reward": 0.81, "episode_step": 1}]
    pids, pmask = _pad(prompts, left=True)
    aids, amask = _pad(actions, left=False)
    probe = AnswerClassProbe(max_classes=5)
    probe._collect(_Rollout(pids, pmask, aids, amask), samples, batch_number=1)
    assert probe.task_prompt == task
    assert set(probe.exemplars) == {"Forest", "LogReg", "Lasso"}  # Tree was written for another prompt
    assert probe.exemplars["Forest"]["reward"] == 0.81  # the best-rewarded answer of the class
    out = probe._read(None, views_apart, batch_number=1)
    assert out["frequent"] == "Forest" and out["best"] == "LogReg"

    # the reference: every view's full logits from a plain (unshared) per-row forward, then the vocabulary sums here
    m, beta = views_apart.model, views_apart.hparams.beta
    rows = [probe.exemplars[c]["tokens"] for c in out["classes"]]
    ids, mask = _pad(rows, left=False)
    prompt = torch.tensor([task] * len(rows))
    plan = m.plan(prompt, torch.ones_like(prompt), ids, mask, share_prefixes=False)
    with torch.no_grad():
        logits = {view: m.head(m.plan_hidden(view, plan)[0]) for view in ("policy", "reference", "critic")}
    log_pi = torch.log_softmax(logits["policy"], -1)
    log_ref = torch.log_softmax(logits["reference"], -1)
    q = q_from_critic(logits["critic"], logits["reference"], "zero")
    log_star = optimal_policy_logits(logits["reference"], q, beta)
    for i, (name, entry) in enumerate(out["classes"].items()):
        n = len(rows[i])
        taken = ids[i, :n]
        for key, full in (("logp_policy", log_pi), ("logp_reference", log_ref), ("logp_optimal", log_star)):
            assert entry[key] == pytest.approx(float(full[i, torch.arange(n), taken].sum()), abs=1e-4), (name, key)
    # Forest (abc..) and LogReg (abd..) part at position 2; Lasso (abdf) parts from LogReg at 3, from Forest at 2
    parts = {c["position"]: c for c in out["choices"]}
    assert sorted(parts) == [2, 3]
    at2, at3 = parts[2], parts[3]
    assert {name: o["token"] for name, o in at2["options"].items()} == {"Forest": "c", "LogReg": "d", "Lasso": "d"}
    assert {name: o["token"] for name, o in at3["options"].items()} == {"LogReg": "e", "Lasso": "f"}
    for choice in (at2, at3):
        pos = choice["position"]
        for name, option in choice["options"].items():
            i = list(out["classes"]).index(name)
            w = ids[i, pos]
            assert option["pi"] == pytest.approx(math.exp(float(log_pi[i, pos, w])), rel=1e-4)
            assert option["pi_ref"] == pytest.approx(math.exp(float(log_ref[i, pos, w])), rel=1e-4)
            assert option["pi_optimal"] == pytest.approx(math.exp(float(log_star[i, pos, w])), rel=1e-4)
            assert option["q"] == pytest.approx(float(q[i, pos, w]), abs=1e-4)


def test_a_better_answer_of_a_class_replaces_its_exemplar_and_state_survives(views_apart):
    tok = views_apart.model.tokenizer
    task = tok.encode("q:", add_special_tokens=False)
    first, second = ([tok.convert_tokens_to_ids(c) for c in text] for text in ("ab", "abc"))
    probe = AnswerClassProbe()
    for batch, (action, status, reward) in enumerate([(first, "error", -1.0), (second, "ok", 0.5)], start=1):
        pids, pmask = _pad([task], left=True)
        aids, amask = _pad([action], left=False)
        probe._collect(_Rollout(pids, pmask, aids, amask),
                       [{"answer_class": "A", "status": status, "reward": reward, "episode_step": 1}], batch)
    assert probe.exemplars["A"]["tokens"] == second and probe.exemplars["A"]["batch"] == 2
    restored = AnswerClassProbe()
    restored.load_state_dict(probe.state_dict())
    assert restored.exemplars == probe.exemplars and restored.task_prompt == task and restored.counts == probe.counts


@pytest.mark.parametrize("unwritten", ["zero", "node"])
def test_the_trees_q_and_pi_star_at_a_parting_token_equal_a_softmax_over_the_vocabulary(views_apart, unwritten):
    """With answer trees kept by the module, the probe's ``q_tree`` / ``pi_optimal_tree`` at a parting token are the
    trees' Q of that token and pi* = softmax(log pi_bar + Q / beta) over the whole vocabulary, every token no answer
    wrote there at the unwritten value (0, or the node's V) -- built here by hand from a plain forward."""
    from modules.losses.etpo import tree_backup

    tok = views_apart.model.tokenizer
    task = tok.encode("q:", add_special_tokens=False)
    forest, logreg, lasso = ([tok.convert_tokens_to_ids(c) for c in text] for text in ("abcab", "abdeh", "abdf"))
    rows, rewards = [forest, logreg, lasso], [0.3, 0.6, -1.0]
    m, beta = views_apart.model, views_apart.hparams.beta
    ids, mask = _pad(rows, left=False)
    prompt = torch.tensor([task] * len(rows))
    plan = m.plan(prompt, torch.ones_like(prompt), ids, mask, share_prefixes=False)
    with torch.no_grad():
        log_ref = torch.log_softmax(m.head(m.plan_hidden("reference", plan)[0]), -1)
    taken = [[float(log_ref[i, j, w]) for j, w in enumerate(r)] for i, r in enumerate(rows)]
    tree = tree_backup([tuple(task)] * 3, rows, taken, rewards, beta, unwritten)
    probe = AnswerClassProbe(max_classes=5)
    pids, pmask = _pad([task] * 3, left=True)
    samples = [{"answer_class": c, "status": "ok" if r > -1 else "error", "reward": r, "episode_step": 1}
               for c, r in zip(("Forest", "LogReg", "Lasso"), rewards)]
    probe._collect(_Rollout(pids, pmask, ids, mask), samples, batch_number=1)
    views_apart.last_trees = {"values": tree.node_values, "unwritten": unwritten}
    try:
        out = probe._read(None, views_apart, batch_number=1)
    finally:
        views_apart.last_trees = None
    values = tree.node_values
    parts = {c["position"]: c for c in out["choices"]}
    assert sorted(parts) == [2, 3]
    for pos, choice in parts.items():
        for name, option in choice["options"].items():
            row = rows[("Forest", "LogReg", "Lasso").index(name)]
            node = (tuple(task), tuple(row[:pos]))
            written = {prefix[-1]: v for (g, prefix), v in values.items() if len(prefix) == pos + 1
                       and prefix[:pos] == node[1]}
            q = torch.full((log_ref.shape[-1],), 0.0 if unwritten == "zero" else values[node], dtype=torch.float64)
            for token, v in written.items():
                q[token] = v
            i = rows.index(row)
            pi_star = torch.softmax(log_ref[i, pos].double() + q / beta, -1)
            assert option["q_tree"] == pytest.approx(float(q[row[pos]]), abs=1e-9)
            assert option["pi_optimal_tree"] == pytest.approx(float(pi_star[row[pos]]), rel=1e-4)
    # the readings without trees: none
    assert all("q_tree" not in o for c in probe._read(None, views_apart, 1)["choices"] for o in c["options"].values())
