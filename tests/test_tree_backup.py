"""ETPO's soft-optimal tree backup in the module (target_backup: optimal_tree, answer_memory; docs/method.md 4a):
the batch's targets are tree_targets of its answers -- with log pi_bar from a plain forward of the reference and
leaves from the rewards -- the stored answers of its prompts join the trees and the critic's regression, and the
memory survives a checkpoint."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_backbone
from modules.etpo import ETPOModule
from modules.losses.etpo import branch_q, policy_loss, q_from_critic, tree_backup, tree_targets
from test_etpo_module import _batch


def _module(**kw):
    torch.manual_seed(0)
    kw.setdefault("target_backup", "optimal_tree")
    module = ETPOModule(backbone=tiny_backbone(), beta=0.2, gamma=0.9, q_parameterisation="zero", token_chunk_size=2,
                        **kw)
    module.configure_model()
    with torch.no_grad():
        for name, p in module.model.named_parameters():
            if "lora_" in name:
                p.add_(0.3 * torch.randn_like(p))
    return module


def _rows(batch):
    lengths = batch.action_mask.sum(1).tolist()
    prompts = [tuple(p[m.bool()].tolist()) for p, m in zip(batch.prompt_ids, batch.prompt_mask)]
    return prompts, [batch.action_ids[i, :n].tolist() for i, n in enumerate(lengths)], lengths


def _plain_log_ref(module, batch):
    m = module.model
    args = (batch.prompt_ids, batch.prompt_mask, batch.action_ids, batch.action_mask)
    with torch.no_grad():
        ref = torch.log_softmax(m.head(m.action_hidden("reference", *args, share_prefixes=False)), -1)
    return ref.gather(-1, batch.action_ids.unsqueeze(-1)).squeeze(-1)


def _plain_tree_policy_loss(module, batch, t, mask=None, divergence="reverse") -> float:
    """Eq. 7 from plain forwards (no shared prefixes): pi* of the critic's Q with the trees' Q at their branches; the
    mean over ``mask`` (default: every action token)."""
    m = module.model
    args = (batch.prompt_ids, batch.prompt_mask, batch.action_ids, batch.action_mask)
    with torch.no_grad():
        ref = m.head(m.action_hidden("reference", *args, share_prefixes=False))
        q = q_from_critic(m.head(m.action_hidden("critic", *args, share_prefixes=False)), ref, "zero")
        q = branch_q(q, *t.branches)
        pi = m.head(m.action_hidden("policy", *args, share_prefixes=False))
    mask = batch.action_mask.float() if mask is None else mask.float()
    return float(policy_loss(pi, ref, q, mask, module.hparams.beta, divergence=divergence))


def test_the_batch_targets_are_the_tree_backup_of_its_answers():
    module = _module()
    batch = _batch(module)  # toy env: every row answers the same prompt and ends its episode (leaf = its reward)
    prompts, actions, lengths = _rows(batch)
    assert len(set(prompts)) == 1 and len({tuple(a) for a in actions}) > 2
    t = module.compute_targets(batch, module.plan(batch))
    module.answer_trees(batch, t)
    log_ref = _plain_log_ref(module, batch)
    want = tree_targets(prompts, actions, [log_ref[i, :n].tolist() for i, n in enumerate(lengths)],
                        batch.rewards.tolist(), module.hparams.beta)
    for i, n in enumerate(lengths):
        assert t.targets[i, :n].tolist() == pytest.approx(want[i], abs=1e-5)
        assert float(t.targets[i, n - 1]) == pytest.approx(float(batch.rewards[i]), abs=1e-6)  # the last token
        assert float(t.targets[i, n:].abs().sum()) == 0.0  # padding stays zero
    # what the probe reads back: along every row, the trees' Q of each written token is that row's target, and the
    # node value before it the previous target (the root's: beta log Z over the first tokens)
    for prompt, action, n, i in zip(prompts, actions, lengths, range(len(lengths))):
        read = module.tree_readings(prompt, action)
        assert [q for q, _ in read] == pytest.approx(want[i], abs=1e-5)
        assert [v for _, v in read][1:] == pytest.approx(want[i][:-1], abs=1e-5)
    root = read[0][1]
    unwritten = 0.0 if module.hparams.unwritten_value == "zero" else root
    assert module.tree_readings(prompts[0], [10 ** 6]) == [(unwritten, root)]  # a token no row wrote
    assert module.tree_readings((10 ** 6,), actions[0]) == [None] * lengths[0]  # another prompt: no tree


def test_concat_keeps_every_row_and_shifts_the_links():
    module = _module()
    first, second = _batch(module, multi_step=True, seed=0), _batch(module, multi_step=True, seed=1)
    joined = first.concat(second)
    n = len(first)
    assert len(joined) == n + len(second)
    for part, offset in ((first, 0), (second, n)):
        p_rows, a_rows, _ = _rows(part)
        jp, ja, _ = _rows(joined)
        assert jp[offset: offset + len(part)] == p_rows and ja[offset: offset + len(part)] == a_rows
        for k in range(len(part)):
            j = int(part.next_index[k])
            assert int(joined.next_index[offset + k]) == (j + offset if j >= 0 else -1)
        for name in ("rewards", "terminated", "truncated", "episode_step"):
            assert torch.equal(getattr(joined, name)[offset: offset + len(part)], getattr(part, name))
    # next prompts: row r of `second` that needs one still finds its own prompt
    def next_prompt(batch, row):
        k = batch.next_needed.tolist().index(row)
        return batch.next_prompt_ids[k][batch.next_prompt_mask[k].bool()].tolist()

    for row in second.next_needed.tolist():
        assert next_prompt(joined, row + n) == next_prompt(second, row)


def test_the_optimality_backup_values_next_states_at_the_optimal_soft_value():
    """target_backup optimal_tree: a leaf is r + gamma (1 - done) V*(s'), V* = beta log sum pi_bar exp(Q / beta) of the
    target network at the next state -- for next states later in the batch and for next prompts alike."""
    module = _module()
    batch = _batch(module, multi_step=True)
    assert (batch.next_index >= 0).any() and batch.next_needed.numel() > 0
    t = module.compute_targets(batch, module.plan(batch))
    m, beta, gamma = module.model, module.hparams.beta, module.hparams.gamma
    with torch.no_grad():
        def v_star(ids, mask):
            ref = m.first_token_logits("reference", ids, mask)
            q = q_from_critic(m.first_token_logits("target", ids, mask), ref, "zero")
            return beta * torch.logsumexp(torch.log_softmax(ref, -1) + q / beta, -1)

        next_v = torch.zeros(len(batch))
        linked = batch.next_index >= 0
        here = v_star(batch.prompt_ids, batch.prompt_mask)
        next_v[linked] = here[batch.next_index[linked]]
        next_v[batch.next_needed] = v_star(batch.next_prompt_ids, batch.next_prompt_mask)
    want = batch.rewards + gamma * (1 - batch.dones.float()) * next_v
    torch.testing.assert_close(t.leaf_values, want, rtol=1e-5, atol=1e-5)


def test_stored_answers_join_the_batch_and_its_trees():
    """answer_memory: the best distinct answers per prompt are stored after an update; the next update recalls those
    its batch did not write again, and the batch with them is backed up as one tree (targets equal tree_targets of
    all rows with plain log pi_bar); the memory is part of a checkpoint."""
    from modules.replay import stored_batch

    module = _module(answer_memory=3)
    first, second = _batch(module, seed=0), _batch(module, seed=1)
    with module.without_trainer():
        module.learn(first)
    _, first_actions, _ = _rows(first)
    stored = module.memory.prompts[next(iter(module.memory.prompts))]
    best = sorted({tuple(a): float(r) for a, r in zip(first_actions, first.rewards)}.items(), key=lambda kv: -kv[1])
    assert [s.reward for s in stored] == pytest.approx([r for _, r in best[:3]])  # the three best, best first
    recalled = module.memory.recall(second)
    _, second_actions, _ = _rows(second)
    assert recalled == [s for s in stored if s.action not in second_actions] and recalled
    joined = second.concat(stored_batch(recalled, second))
    t = module.compute_targets(joined, module.plan(joined))
    module.answer_trees(joined, t)
    prompts, actions, lengths = _rows(joined)
    log_ref = _plain_log_ref(module, joined)
    want = tree_targets(prompts, actions, [log_ref[i, :n].tolist() for i, n in enumerate(lengths)],
                        joined.rewards.tolist(), module.hparams.beta)
    for i, n in enumerate(lengths):
        assert t.targets[i, :n].tolist() == pytest.approx(want[i], abs=1e-5)
    with module.without_trainer():
        charts = module.learn(second)
    assert charts["charts/remembered_answers"] == len(recalled)
    state = {}
    module.on_save_checkpoint(state)
    restored = _module(answer_memory=3)
    restored.on_load_checkpoint(state)
    assert restored.memory.state_dict() == module.memory.state_dict()


def test_branch_q_moves_mass_only_between_the_written_continuations():
    """pi* of a branch row: every unwritten token keeps pi_bar's probability, the written ones share their pi_bar mass
    in proportion to pi_bar exp(Q / beta); rows off the branches keep the critic's Q."""
    beta, vocab = 0.1, 8
    groups, actions = ["p"] * 4, [[1, 2, 5], [1, 3, 5], [1, 3, 6], [4, 0]]
    torch.manual_seed(0)
    node_logits = {}  # the reference's distribution at every node (rows through a node share it)
    ref_logits = torch.zeros(4, 3, vocab, dtype=torch.float64)
    for b, a in enumerate(actions):
        for j in range(len(a)):
            ref_logits[b, j] = node_logits.setdefault(tuple(a[:j]), torch.randn(vocab, dtype=torch.float64))
    log_ref_full = torch.log_softmax(ref_logits, -1)
    log_ref = [[float(log_ref_full[b, j, w]) for j, w in enumerate(a)] for b, a in enumerate(actions)]
    tree = tree_backup(groups, actions, log_ref, [0.9, 0.2, -1.0, 0.5], beta)
    # branches: the root (tokens 1 and 4), after [1] (tokens 2 and 3), after [1, 3] (tokens 5 and 6)
    assert [j for j, b in enumerate(tree.branches[2]) if b is not None] == [0, 1, 2]
    assert tree.branches[0][2] is None  # after [1, 2] only one answer goes on
    critic_q = torch.randn(4, 3, vocab, dtype=torch.float64)
    mask, value, index, q = ETPOModule._branch_tensors(tree.branches, torch.zeros(4, 3))
    got = branch_q(critic_q, mask, value, index, q)
    for b, row in enumerate(tree.branches):
        for j, branch in enumerate(row):
            if b == 3 and j == 1 or branch is None:  # padding, or no branch: the critic's Q
                assert torch.equal(got[b, j], critic_q[b, j])
                continue
            tokens, q_written, v = branch
            star = torch.softmax(log_ref_full[b, j] + got[b, j] / beta, -1)
            others = [w for w in range(vocab) if w not in tokens]
            torch.testing.assert_close(star[others], log_ref_full[b, j, others].exp())
            torch.testing.assert_close(star[tokens].sum(), log_ref_full[b, j, tokens].exp().sum())
            weights = log_ref_full[b, j, tokens].exp() * torch.exp(torch.tensor(q_written, dtype=torch.float64) / beta)
            torch.testing.assert_close(star[tokens] / star[tokens].sum(), weights / weights.sum())


def test_the_policy_step_moves_towards_the_trees_where_the_answers_part():
    """policy_target optimal_tree: the policy loss is Eq. 7 against pi* of the critic's Q with the tree's Q at the
    branches -- equal to the loss built from full logits of plain forwards and branch_q."""
    # the critic keeps the paper's targets; only the policy uses the tree
    module = _module(policy_target="optimal_tree", target_backup="policy")
    batch = _batch(module)
    plan = module.plan(batch)
    t = module.compute_targets(batch, plan)
    module.answer_trees(batch, t)
    assert t.branches is not None and bool(t.branches[0].any())
    got, _ = module.policy_loss(batch, module.plan(batch, next_prompts=False), t)
    assert float(got.detach()) == pytest.approx(_plain_tree_policy_loss(module, batch, t), rel=1e-5)
    without, _ = module.policy_loss(batch, module.plan(batch, next_prompts=False), t.__class__(
        **{**t.__dict__, "branches": None}))
    assert float(without.detach()) != pytest.approx(float(got.detach()), rel=1e-3)


@pytest.mark.parametrize("divergence", ["reverse", "forward"])
def test_with_a_zero_prior_every_answer_token_gets_the_trees_q(divergence):
    """unwritten_value zero: every real token of every answer is a node with the tree's Q -- its written
    continuations by value, every other token at 0 -- and the policy loss equals Eq. 7 built from plain forwards (or,
    with policy_divergence forward, KL(pi* || pi) from them)."""
    module = _module(policy_target="optimal_tree", unwritten_value="zero", policy_divergence=divergence)
    batch = _batch(module)
    t = module.compute_targets(batch, module.plan(batch))
    module.answer_trees(batch, t)
    assert torch.equal(t.branches[0], batch.action_mask.bool())
    got, _ = module.policy_loss(batch, module.plan(batch, next_prompts=False), t)
    assert float(got.detach()) == pytest.approx(_plain_tree_policy_loss(module, batch, t, divergence=divergence),
                                                rel=1e-5)
    other = "reverse" if divergence == "forward" else "forward"
    assert float(got.detach()) != pytest.approx(_plain_tree_policy_loss(module, batch, t, divergence=other), rel=1e-3)


@pytest.mark.parametrize("unwritten", ["zero", "node"])
def test_policy_nodes_choices_takes_the_step_only_where_the_trees_hold_a_choice(unwritten):
    """policy_nodes: choices -- Eq. 7 (plain forwards) averaged over the positions whose node has two or more
    written continuations (found here by enumerating the rows' prefixes) or a single one below the unwritten value."""
    module = _module(policy_target="optimal_tree", unwritten_value=unwritten, policy_nodes="choices")
    batch = _batch(module)
    prompts, actions, lengths = _rows(batch)
    t = module.compute_targets(batch, module.plan(batch))
    module.answer_trees(batch, t)
    want = torch.zeros(batch.action_mask.shape, dtype=torch.bool)
    for i, (p, a) in enumerate(zip(prompts, actions)):
        for j in range(len(a)):
            nxt = {b[j] for q, b in zip(prompts, actions) if q == p and len(b) > j and b[:j] == a[:j]}
            below = unwritten == "zero" and float(t.targets[i, j]) < 0.0  # the written token's tree Q
            want[i, j] = len(nxt) > 1 or below
    assert torch.equal(t.policy_mask.cpu(), want)
    assert 0 < int(want.sum()) < int(batch.action_mask.sum())  # a real restriction on this batch
    got, charts = module.policy_loss(batch, module.plan(batch, next_prompts=False), t)
    assert float(got.detach()) == pytest.approx(_plain_tree_policy_loss(module, batch, t, want), rel=1e-5)
    with pytest.raises(ValueError, match="policy_nodes"):
        ETPOModule(backbone=tiny_backbone(), policy_nodes="choices")  # needs the trees' policy target


def test_the_tree_backup_refuses_what_it_does_not_combine_with():
    with pytest.raises(ValueError, match="answer_memory"):
        ETPOModule(backbone=tiny_backbone(), answer_memory=4)  # the memory feeds the optimality backup only
    with pytest.raises(ValueError, match="answer_memory"):
        ETPOModule(backbone=tiny_backbone(), policy_target="optimal_tree", answer_memory=4)
    with pytest.raises(ValueError, match="policy_target"):
        ETPOModule(backbone=tiny_backbone(), policy_target="greedy")
    with pytest.raises(ValueError, match="unwritten_value"):
        ETPOModule(backbone=tiny_backbone(), policy_target="optimal_tree", unwritten_value="one")
    with pytest.raises(ValueError, match="replay_capacity"):
        ETPOModule(backbone=tiny_backbone(), target_backup="optimal_tree", replay_capacity=8, replay_rows=2)
    with pytest.raises(ValueError, match="target_backup"):
        ETPOModule(backbone=tiny_backbone(), target_backup="greedy")
