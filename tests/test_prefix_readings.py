"""tools/prefix_readings.py: two given answers read where they part, against a plain per-row forward of every view
over the whole vocabulary (the answer-class probe's own check, for answers of one class)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from modules.losses.etpo import optimal_policy_logits, q_from_critic

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("_tool_prefix_readings", REPO / "tools" / "prefix_readings.py")
tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tool)


def test_the_pair_is_read_where_it_parts_as_a_plain_forward_says(views_apart):
    tok = views_apart.model.tokenizer
    task = tok.encode("q:", add_special_tokens=False)
    # one-letter tokens the tiny vocabulary holds: "abce" shared, then "a" (the plain call) against "d" (an argument)
    plain, argued = ([tok.convert_tokens_to_ids(c) for c in text] for text in ("abcea", "abcedh"))
    out = tool.read_pair(views_apart, task, {"plain": plain, "argued": argued})
    (choice,) = out["choices"]
    assert choice["position"] == 4
    assert {n: o["token"] for n, o in choice["options"].items()} == {"plain": "a", "argued": "d"}

    m, beta = views_apart.model, views_apart.hparams.beta
    width = max(len(plain), len(argued))
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for i, row in enumerate((plain, argued)):
        ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
    prompt = torch.tensor([task] * 2)
    plan = m.plan(prompt, torch.ones_like(prompt), ids, mask, share_prefixes=False)
    with torch.no_grad():
        logits = {view: m.head(m.plan_hidden(view, plan)[0]) for view in ("policy", "reference", "critic")}
    log_pi, log_ref = torch.log_softmax(logits["policy"], -1), torch.log_softmax(logits["reference"], -1)
    q = q_from_critic(logits["critic"], logits["reference"], "zero")
    log_star = optimal_policy_logits(logits["reference"], q, beta)
    for i, name in enumerate(("plain", "argued")):
        o, w = choice["options"][name], ids[i, 4]
        assert o["pi"] == pytest.approx(math.exp(float(log_pi[i, 4, w])), rel=1e-4)
        assert o["pi_ref"] == pytest.approx(math.exp(float(log_ref[i, 4, w])), rel=1e-4)
        assert o["pi_optimal"] == pytest.approx(math.exp(float(log_star[i, 4, w])), rel=1e-4)
        assert o["q"] == pytest.approx(float(q[i, 4, w]), abs=1e-4)
        n = int(mask[i].sum())
        assert out["classes"][name]["logp_policy"] == pytest.approx(
            float(log_pi[i, torch.arange(n), ids[i, :n]].sum()), abs=1e-4)
    with pytest.raises(ValueError, match="never part"):
        tool.read_pair(views_apart, task, {"short": plain[:3], "long": plain})


def test_the_answer_is_the_first_at_the_task_prompt_that_matches(tmp_path):
    rows = [{"batch": 1, "episode_step": 2, "text": "clf = F(max_samples=1000)"},
            {"batch": 1, "episode_step": 1, "text": "clf = F()"},
            {"batch": 2, "episode_step": 1, "text": "clf = F(max_samples=1000)", "reward": 0.98}]
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert tool.task_prompt_answer(tmp_path, "max_samples")["batch"] == 2  # batch 1's was not at the task prompt
    with pytest.raises(SystemExit, match="no answer at the task prompt contains 'max_depth'"):
        tool.task_prompt_answer(tmp_path, "max_depth")
