"""The answer-class probe (etpo/probe.py): exemplars per class at the task prompt, the tokens where they part, and
the views' readings there -- checked against a plain per-row forward of every view over the whole vocabulary."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from conftest import tiny_backbone
from etpo.probe import AnswerClassProbe, parting_positions
from modules.etpo import ETPOModule
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


@pytest.fixture(scope="module")
def module():
    torch.manual_seed(0)
    m = ETPOModule(backbone=tiny_backbone(), beta=0.1, q_parameterisation="zero", token_chunk_size=3)
    m.configure_model()
    with torch.no_grad():  # adapters that differ: policy, critic and reference all say something else
        for name, p in m.model.named_parameters():
            if "lora_" in name:
                p.add_(0.3 * torch.randn_like(p))
    m.model.eval()
    return m


def test_probe_readings_equal_a_plain_forward_of_every_view(module):
    tok = module.model.tokenizer
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
    out = probe._read(None, module, batch_number=1)
    assert out["frequent"] == "Forest" and out["best"] == "LogReg"

    # the reference: every view's full logits from a plain (unshared) per-row forward, then the vocabulary sums here
    m, beta = module.model, module.hparams.beta
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


def test_a_better_answer_of_a_class_replaces_its_exemplar_and_state_survives(module):
    tok = module.model.tokenizer
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
