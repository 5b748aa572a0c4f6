"""The critic replay (modules/replay.py) and the critic warm-up of ETPOModule: replayed targets are the off-policy
Retrace targets of the *current* policy and target network (checked against a plain-loop computation from full
logits), only the critic sees replayed rows, the store survives a checkpoint, warm-up steps are counted."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from conftest import tiny_backbone
from modules.etpo import ETPOModule
from modules.losses.etpo import q_from_critic, soft_value
from modules.replay import TransitionReplay
from test_etpo_module import _batch, _datamodule, _perturbed_module, _trainer


def _log_softmax_taken(logits, ids):
    return torch.log_softmax(logits.double(), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def _plain_replay_targets(module, past, log_mu, td_lambda):
    """Retrace targets of replayed rows from full [B, L, V] logits of the plain forwards, as explicit loops:
    y_last = r + gamma (1 - done) V(s'), y_j = V(ctx_{j+1}) + lambda c_{j+1} (y_{j+1} - Qbar(ctx_{j+1}, w_{j+1}))
    with c = min(1, pi_now / mu) -- every quantity under the current policy and target network."""
    m, beta, gamma = module.model, module.hparams.beta, module.hparams.gamma
    form = module.hparams.q_parameterisation
    args = (past.prompt_ids, past.prompt_mask, past.action_ids, past.action_mask)
    with torch.no_grad():
        ref = m.head(m.action_hidden("reference", *args, share_prefixes=False))
        target_q = q_from_critic(m.head(m.action_hidden("target", *args, share_prefixes=False)), ref, form)
        pi = m.head(m.action_hidden("policy", *args, share_prefixes=False))
        next_value = {}
        if past.next_needed.numel():
            ids, pm = past.next_prompt_ids, past.next_prompt_mask
            r1 = m.first_token_logits("reference", ids, pm)
            v1 = soft_value(q_from_critic(m.first_token_logits("target", ids, pm), r1, form),
                            m.first_token_logits("policy", ids, pm), r1, beta)[0]
            next_value = {int(b): float(v) for b, v in zip(past.next_needed, v1)}
        y = torch.zeros(past.action_ids.shape, dtype=torch.float64)
        for b in range(len(past)):
            n = int(past.action_mask[b].sum())
            values = [float(soft_value(target_q[b, j], pi[b, j], ref[b, j], beta)[0]) for j in range(n)]
            taken = past.action_ids[b]
            q_taken = [float(target_q[b, j, taken[j]]) for j in range(n)]
            log_pi = _log_softmax_taken(pi[b, :n], taken[:n])
            c = [min(1.0, float(torch.exp(log_pi[j] - float(log_mu[b, j])))) for j in range(n)]
            done = bool(past.terminated[b] or past.truncated[b])
            y[b, n - 1] = float(past.rewards[b]) + (0.0 if done else gamma * next_value[b])
            for j in range(n - 2, -1, -1):
                y[b, j] = values[j + 1] + td_lambda * c[j + 1] * (y[b, j + 1] - q_taken[j + 1])
    return y.float()


@pytest.mark.parametrize("td_lambda", [0.0, 0.8])
def test_replayed_targets_are_the_current_policys_retrace_targets(td_lambda):
    module = _perturbed_module("zero", td_lambda=td_lambda, trace_correction=False, replay_capacity=32, replay_rows=6)
    fresh = _batch(module, multi_step=True)  # sampled at temperature 1 by the policy as it is now
    t = module.compute_targets(fresh, module.plan(fresh), record_behaviour=True)
    # what is stored as log mu is the sampling policy's log-probability of each taken token
    log_pi_then = _log_softmax_taken(
        module.model.head(module.model.action_hidden("policy", fresh.prompt_ids, fresh.prompt_mask, fresh.action_ids,
                                                     fresh.action_mask, share_prefixes=False)), fresh.action_ids)
    mask = fresh.action_mask.bool()
    torch.testing.assert_close(t.behaviour_log_probs[mask].double(), log_pi_then[mask], rtol=1e-5, atol=1e-5)
    module.replay.add_batch(fresh, t.behaviour_log_probs, policy_version=0)
    assert len(module.replay) == len(fresh)
    # the policy and the target move on: the stored transitions are now off-policy
    with torch.no_grad():
        for name, p in module.model.named_parameters():
            if "lora_" in name and ("policy" in name or "critic" in name):
                p.add_(0.2 * torch.randn_like(p))
        module.model.polyak_update(0.5)
    past, plan, got = module.replayed_targets(fresh)
    assert len(past) == 6 and past.next_needed.numel() > 0 and (past.dones == 1).any()
    drawn = module.replay.sample(6, seed=module.policy_version, like=fresh)
    assert torch.equal(drawn[0].action_ids, past.action_ids)  # seeded: the same rows again
    want = _plain_replay_targets(module, past, drawn[1], td_lambda)
    torch.testing.assert_close(got.targets, want, rtol=1e-5, atol=1e-5)
    if td_lambda > 0:
        assert (got.traces[past.action_mask.bool()] < 1).any()  # the cut is active, pi_now != mu


def test_replayed_next_states_are_the_transitions_own():
    module = _perturbed_module("zero", replay_capacity=64, replay_rows=1)
    fresh = _batch(module, multi_step=True)
    t = module.compute_targets(fresh, module.plan(fresh), record_behaviour=True)
    replay = TransitionReplay(64)
    replay.add_batch(fresh, t.behaviour_log_probs, policy_version=3)
    prompts = [row[m.bool()].tolist() for row, m in zip(fresh.prompt_ids, fresh.prompt_mask)]
    needed = {int(b): row[m.bool()].tolist() for b, row, m in zip(fresh.next_needed, fresh.next_prompt_ids,
                                                                   fresh.next_prompt_mask)}
    for b, item in enumerate(replay.items):
        assert item.prompt == prompts[b] and item.policy_version == 3
        if bool(fresh.dones[b]):
            assert item.next_prompt is None
        elif int(fresh.next_index[b]) >= 0:
            assert item.next_prompt == prompts[int(fresh.next_index[b])]
        else:
            assert item.next_prompt == needed[b]
    restored = TransitionReplay(64)
    restored.load_state_dict(replay.state_dict())
    a, b = replay.sample(5, seed=7, like=fresh), restored.sample(5, seed=7, like=fresh)
    assert torch.equal(a[0].prompt_ids, b[0].prompt_ids) and torch.equal(a[1], b[1])
    small = TransitionReplay(4)
    small.add_batch(fresh, t.behaviour_log_probs, policy_version=0)
    assert len(small) == 4 and small.items[-1].prompt == prompts[-1]  # first in, first out


def test_the_critic_loss_with_replay_is_the_mean_over_both_and_the_policy_loss_ignores_it():
    module = _perturbed_module("zero", td_lambda=1.0, trace_correction=False, replay_capacity=32, replay_rows=4)
    old = _batch(module, multi_step=True, seed=1)
    module.replay.add_batch(old, module.compute_targets(old, module.plan(old), record_behaviour=True)
                            .behaviour_log_probs, 0)
    fresh = _batch(module, multi_step=True, seed=2)
    plan = module.plan(fresh)
    t = module.compute_targets(fresh, plan)
    replayed = module.replayed_targets(fresh)
    alone, _ = module.critic_loss(fresh, plan, t)
    both, charts = module.critic_loss(fresh, plan, t, replayed)
    rb, rplan, rt = replayed
    past_alone, _ = module.critic_loss(rb, rplan, rt)
    n_fresh, n_past = float(fresh.action_mask.sum()), float(rb.action_mask.sum())
    assert both.item() == pytest.approx((alone.item() * n_fresh + past_alone.item() * n_past) / (n_fresh + n_past),
                                        rel=1e-5)
    assert charts["charts/critic_loss_replay"] == pytest.approx(past_alone.item(), rel=1e-5)


def test_a_fit_with_replay_and_warmup_runs_its_steps_and_resumes_the_store(tmp_path):
    """Warm-up: 3 critic steps (and the policy step) in each of the first 2 batches, then 1 + 1; the replay fills,
    is drawn from from the second batch on, and is saved with the checkpoint."""
    L.seed_everything(0)
    seen = []

    class Spy(ETPOModule):
        def critic_loss(self, batch, plan, t, replayed=None):
            seen.append((self.policy_version, replayed is not None))
            return super().critic_loss(batch, plan, t, replayed)

    module = Spy(backbone=tiny_backbone(), critic_warmup=2, critic_warmup_steps=3, warmup_freezes_policy=False,
                 replay_capacity=12, replay_rows=4)
    trainer = _trainer(enable_checkpointing=True, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=_datamodule(budget=8 * 4))
    assert [v for v, _ in seen] == [0, 0, 0, 1, 1, 1, 2, 3]
    assert [r for _, r in seen] == [False] * 3 + [True] * 5  # nothing to replay before the first batch is stored
    assert trainer.global_step == 2 * (3 + 1) + 2 * (1 + 1)
    assert len(module.replay) == 12
    path = tmp_path / "x.ckpt"
    trainer.save_checkpoint(path)
    again = ETPOModule(backbone=tiny_backbone(), replay_capacity=12, replay_rows=4)
    again.on_load_checkpoint(torch.load(path, weights_only=False))
    assert [x.action for x in again.replay.items] == [x.action for x in module.replay.items]
    with pytest.raises(ValueError, match="both be > 0"):
        ETPOModule(backbone=tiny_backbone(), replay_capacity=8)
