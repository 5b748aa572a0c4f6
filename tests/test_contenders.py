"""Baselines and ablations in the same framework: PPO-KL's math against plain loops and hand computations,
PPO-KL learning the toy task, Reflection never changing a weight, ETPO(1-step) episodes, shared chart keys."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch

from conftest import tiny_backbone, toy_env
from datamodules.rollout import GenerationConfig, RolloutCollector, RolloutDataModule
from modules.etpo import ETPOModule
from modules.grpo import GRPOModule
from modules.losses.ppo import clipped_surrogate, gae, kl_penalised_rewards, token_advantages
from modules.ppo_kl import PPOKLModule
from modules.reflection import ReflectionModule
from test_etpo_module import TOY_ETPO, TOY_TOKENS, _mean_policy_reward, _trainer


def test_gae_equals_a_plain_loop_over_episodes():
    rng = np.random.default_rng(0)
    # three environments, interleaved in collection order as the collector lays them out: step-major
    # env 0: an episode of 3 steps ending (done), env 1: 3 steps, not done (bootstrap), env 2: done at step 1,
    # then a new episode of 2 steps (not linked to the first).
    layout = [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1), (0, 2), (1, 2), (2, 2)]  # (env, step)
    episode_of = {(0, 0): "a", (0, 1): "a", (0, 2): "a", (1, 0): "b", (1, 1): "b", (1, 2): "b",
                  (2, 0): "c", (2, 1): "d", (2, 2): "d"}
    done = {(0, 2): 1.0, (2, 0): 1.0}
    n = len(layout)
    rewards = torch.tensor(rng.normal(size=n))
    values = torch.tensor(rng.normal(size=n))
    next_values = torch.tensor(rng.normal(size=n))
    dones = torch.tensor([done.get(k, 0.0) for k in layout])
    next_index = torch.full((n,), -1)
    for i, key in enumerate(layout):
        for j in range(i + 1, n):
            if layout[j][0] == key[0] and episode_of[layout[j]] == episode_of[key]:
                next_index[i] = j
                break
    gamma, lam = 0.9, 0.8
    adv, ret = gae(rewards, values, next_values, dones, next_index, gamma, lam)

    expected = np.zeros(n)
    for ep in "abcd":
        idx = [i for i, k in enumerate(layout) if episode_of[k] == ep]
        running = 0.0
        for pos in reversed(range(len(idx))):
            i = idx[pos]
            nonterminal = 1.0 - float(dones[i])
            v_next = float(values[idx[pos + 1]]) if pos + 1 < len(idx) else float(next_values[i])
            delta = float(rewards[i]) + gamma * nonterminal * v_next - float(values[i])
            running = delta + gamma * lam * nonterminal * (running if pos + 1 < len(idx) else 0.0)
            expected[i] = running
    np.testing.assert_allclose(adv.numpy(), expected, atol=1e-12)
    np.testing.assert_allclose(ret.numpy(), expected + values.numpy(), atol=1e-12)


def test_every_token_of_an_action_gets_its_action_advantage():
    adv = torch.tensor([0.5, -2.0, 3.0])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.float32)
    per_token = token_advantages(adv, mask)
    for b in range(3):
        real = per_token[b][mask[b] == 1]
        assert torch.all(real == adv[b]) and torch.all(per_token[b][mask[b] == 0] == 0)


def test_clipped_surrogate_matches_a_hand_computation():
    # token 1: ratio 1.5, A = +1 -> min(1.5, 1.2) = 1.2;  token 2: ratio 0.5, A = +1 -> min(0.5, 0.8) = 0.5
    # token 3: ratio 1.5, A = -1 -> min(-1.5, -1.2) = -1.5; token 4: ratio 0.5, A = -1 -> min(-0.5, -0.8) = -0.8
    # token 5: padding
    old = torch.zeros(1, 5)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.5, 0.5, 7.0]]))
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    loss = clipped_surrogate(new, old, adv, mask, clip=0.2)
    assert loss.item() == pytest.approx(-(1.2 + 0.5 - 1.5 - 0.8) / 4, abs=1e-6)


def test_kl_penalised_rewards():
    rewards = torch.tensor([1.0, 0.5])
    old = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0]])
    ref = torch.tensor([[-1.5, -2.5, -3.0], [-1.0, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    got = kl_penalised_rewards(rewards, old, ref, mask, beta=0.1)
    assert torch.allclose(got, torch.tensor([1.0 - 0.1 * 1.0, 0.5 - 0.1 * 1.0]))


def _toy_datamodule(budget, num_envs=8, env=None, steps_per_update=1):
    return RolloutDataModule(env=env or toy_env(), num_envs=num_envs, steps_per_update=steps_per_update,
                             budget=budget, seed=0,
                             generation=GenerationConfig(max_new_tokens=TOY_TOKENS, temperature=1.0, top_k=0))


def test_ppo_kl_raises_reward_on_the_toy_task():
    L.seed_everything(0)
    module = PPOKLModule(backbone=tiny_backbone(tiny_init_std=0.2), beta_ppo=0.01, policy_lr=1e-2, critic_lr=1e-2,
                         ppo_epochs=2, minibatch_size=8)
    module.configure_model()
    before = _mean_policy_reward(module)
    _trainer().fit(module, datamodule=_toy_datamodule(budget=8 * 30))
    after = _mean_policy_reward(module)
    assert before < 0.35 and after > before + 0.3, (before, after)
    assert module.policy_version == 30  # rollout batches learned from
    assert module.trainer.global_step == 30 * 2  # ppo_epochs optimizer steps per rollout batch of one minibatch


def test_reflection_never_changes_a_weight():
    L.seed_everything(0)
    module = ReflectionModule(backbone=tiny_backbone())
    module.configure_model()
    before = {k: v.clone() for k, v in module.model.peft_model.state_dict().items()}
    dm = _toy_datamodule(budget=8 * 3)
    _trainer().fit(module, datamodule=dm)
    after = module.model.peft_model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k


class _GarbagePolicy:
    """A stand-in policy whose actions are never code (the env answers invalid-output): a 1-step episode still
    must end after its one step."""

    policy_version = 0

    def __init__(self, module):
        self.module = module

    def act(self, prompts, generation):
        return self.module.act(prompts, generation)

    def encode_prompts(self, prompts):
        return self.module.encode_prompts(prompts)


def test_etpo_one_step_episodes_never_exceed_one_step():
    from envs.datascience import DataScienceEnv

    module = ETPOModule(backbone=tiny_backbone(tiny_alphabet="abc ()=:\n"))
    module.configure_model()
    env = {"class_path": "envs.datascience.DataScienceEnv",
           "init_args": {"dataset": "iris", "max_steps": 1, "reflection": False, "n_splits": 2}}
    collector = RolloutCollector(env, num_envs=4, steps_per_update=3, budget=100, seed=0,
                                 generation=GenerationConfig(max_new_tokens=6, temperature=1.0, top_k=0))
    try:
        batch = collector.collect(_GarbagePolicy(module))
    finally:
        collector.close()
    assert len(batch) == 12
    assert torch.all(batch.episode_step == 1)
    assert torch.all(batch.dones == 1)  # every step ends its episode (the step limit is a done signal)
    assert torch.all(batch.next_index == -1) and batch.next_needed.numel() == 0  # nothing bootstraps
    assert collector.stats.episodes == 12
    assert DataScienceEnv("iris", max_steps=1, reflection=False).max_steps == 1


SHARED_KEYS = {"losses/critic", "losses/policy", "charts/kl", "charts/entropy", "charts/avg_reward",
               "charts/best_reward", "charts/runnable_fraction", "charts/env_steps", "charts/sps"}


@pytest.mark.parametrize("make_module", [
    lambda: ETPOModule(backbone=tiny_backbone(), **TOY_ETPO),
    lambda: PPOKLModule(backbone=tiny_backbone(), ppo_epochs=1, minibatch_size=8),
    lambda: GRPOModule(backbone=tiny_backbone(), epochs=1, minibatch_size=8),
    lambda: ReflectionModule(backbone=tiny_backbone()),
], ids=["etpo", "ppo_kl", "grpo", "reflection"])
def test_contenders_log_the_same_chart_keys(tmp_path, make_module):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    L.seed_everything(0)
    module = make_module()
    logger = TensorBoardLogger(str(tmp_path), name="", version="")
    _trainer(logger=logger).fit(module, datamodule=_toy_datamodule(budget=16))
    keys = set(EventAccumulator(str(tmp_path)).Reload().Tags()["scalars"])
    expected = SHARED_KEYS
    if isinstance(module, ReflectionModule):
        expected = {k for k in SHARED_KEYS if k.startswith("charts/") and k not in ("charts/kl", "charts/entropy")}
    elif isinstance(module, GRPOModule):  # no critic, so no critic loss
        expected = SHARED_KEYS - {"losses/critic"}
        assert "losses/critic" not in keys
    assert expected <= keys, sorted(expected - keys)


def test_token_credit_etpo_per_token_vs_ppo_shared():
    from test_etpo_module import _batch

    L.seed_everything(0)
    etpo = ETPOModule(backbone=tiny_backbone(), **TOY_ETPO)
    etpo.configure_model()
    batch = _batch(etpo)
    credit = etpo.token_credit(batch, max_examples=3)
    assert len(credit.tokens) == 3 and len(credit.rewards) == 3
    n = [int(x) for x in batch.action_mask[:3].sum(1)]
    for name, rows in credit.scores.items():
        assert [len(r) for r in rows] == n, name
    # the last token's target is the reward (Eq. 6); the soft Q starts at zero in the "zero" form
    assert [r[-1] for r in credit.scores["target y (Eq. 6)"]] == pytest.approx(credit.rewards)

    ppo = PPOKLModule(backbone=tiny_backbone())
    ppo.configure_model()
    shared = ppo.token_credit(batch, max_examples=3).scores["advantage (shared by the action)"]
    assert all(len(set(row)) == 1 for row in shared)  # one advantage for every token of an action

    # the log-ratio column is log pi - log pi_bar of each taken token (policy moved away from the reference first)
    with torch.no_grad():
        for p in ppo.model.policy_parameters():
            p.add_(0.3 * torch.randn_like(p))
    credit = ppo.token_credit(batch, max_examples=None)
    assert len(credit.tokens) == len(batch)  # None = every transition
    args = (batch.prompt_ids, batch.prompt_mask, batch.action_ids, batch.action_mask)
    expected = ppo.model.action_logprobs("policy", *args) - ppo.model.action_logprobs("reference", *args)
    got = credit.scores["log pi - log pi_bar"]
    assert max(abs(x) for row in got for x in row) > 1e-3
    for row, exp, mask in zip(got, expected, batch.action_mask.bool()):
        assert row == pytest.approx(exp[mask].tolist(), abs=1e-5)


def test_contenders_leave_the_sampling_generator_where_etpo_leaves_it():
    """Same seed -> same first rollout batch for every contender: building PPO-KL's value head must not draw
    from the global generator that sampling uses (its default Linear initialisation would)."""
    draws = {}
    for name, make in {"etpo": lambda: ETPOModule(backbone=tiny_backbone()),
                       "ppo_kl": lambda: PPOKLModule(backbone=tiny_backbone()),
                       "grpo": lambda: GRPOModule(backbone=tiny_backbone()),
                       "reflection": lambda: ReflectionModule(backbone=tiny_backbone())}.items():
        module = make()
        torch.manual_seed(123)
        module.configure_model()
        draws[name] = torch.rand(8)
    assert torch.equal(draws["ppo_kl"], draws["etpo"])
    assert torch.equal(draws["grpo"], draws["etpo"])
    assert torch.equal(draws["reflection"], draws["etpo"])
