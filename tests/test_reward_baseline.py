"""The reward baseline of ETPOModule (docs/method.md, section 7b): by enumeration, a constant shift of the rewards
leaves the soft-optimal policy unchanged when every episode has the same length (and changes it when episodes can
end early); the module's targets with a baseline are the plain targets of the shifted rewards; the running mean is
the mean of every reward so far and survives a checkpoint; episodes of different lengths are refused."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from conftest import tiny_backbone, toy_env
from modules.etpo import ETPOModule
from test_etpo_module import _batch, _datamodule, _perturbed_module, _plain_reference, _trainer

VOCAB, TOKENS_PER_ATTEMPT, ATTEMPTS = 3, 2, 2


def _soft_optimal_policies(shift: float, end_early_above: float | None, beta=0.3, gamma=0.9) -> dict:
    """pi*(.|ctx) = pi_bar exp(Q*/beta) / Z at every context of a small token-level problem, by recursion over the
    whole tree: attempts of 2 tokens from 3, a random reward for each attempt (given everything written so far) less
    ``shift``, 2 attempts -- or, with ``end_early_above``, an episode that ends after an attempt rewarded above it."""
    rng = random.Random(7)
    contexts = [c for n in range(TOKENS_PER_ATTEMPT * ATTEMPTS + 1) for c in itertools.product(range(VOCAB), repeat=n)]
    prior = {c: np.log(np.array([rng.random() + 0.1 for _ in range(VOCAB)])) for c in contexts}
    prior = {c: p - np.logaddexp.reduce(p) for c, p in prior.items()}  # log pi_bar(.|ctx)
    reward = {c: rng.uniform(-1, 1) for c in contexts if c and len(c) % TOKENS_PER_ATTEMPT == 0}
    values: dict = {}

    def q(ctx, w):
        nxt = ctx + (w,)
        if len(nxt) % TOKENS_PER_ATTEMPT:  # inside an attempt: no reward, no discount
            return value(nxt)
        done = len(nxt) == TOKENS_PER_ATTEMPT * ATTEMPTS or (
            end_early_above is not None and reward[nxt] > end_early_above)
        return reward[nxt] - shift + (0.0 if done else gamma * value(nxt))

    def value(ctx):
        if ctx not in values:
            qs = np.array([q(ctx, w) for w in range(VOCAB)])
            values[ctx] = beta * np.logaddexp.reduce(prior[ctx] + qs / beta)
        return values[ctx]

    policies = {}
    for ctx in contexts[: -VOCAB ** (TOKENS_PER_ATTEMPT * ATTEMPTS)]:  # every context that still acts
        logits = prior[ctx] + np.array([q(ctx, w) for w in range(VOCAB)]) / beta
        policies[ctx] = np.exp(logits - np.logaddexp.reduce(logits))
    return policies


def _largest_difference(a: dict, b: dict) -> float:
    return max(float(np.abs(a[c] - b[c]).max()) for c in a)


def test_a_reward_shift_leaves_the_soft_optimal_policy_alone_only_with_episodes_of_one_length():
    plain = _soft_optimal_policies(0.0, None)
    assert len(plain) == sum(VOCAB ** n for n in range(TOKENS_PER_ATTEMPT * ATTEMPTS))
    for shift in (-0.7, 0.4, 3.0):
        assert _largest_difference(plain, _soft_optimal_policies(shift, None)) < 1e-9
    # an episode that can end early collects fewer shifted rewards: the shift now rewards (or punishes) ending
    early = _soft_optimal_policies(0.0, 0.5)
    assert _largest_difference(early, _soft_optimal_policies(0.4, 0.5)) > 1e-2


@pytest.mark.parametrize("td_lambda", [0.0, 0.7])
def test_targets_with_a_baseline_are_the_plain_targets_of_the_shifted_rewards(td_lambda):
    module = _perturbed_module("zero", td_lambda=td_lambda, trace_correction=False, reward_baseline=0.35)
    batch = _batch(module, multi_step=True)  # 3-step episodes of the toy env: every one ends at its step limit
    assert (batch.dones == 1).any() and (batch.dones == 0).any()
    module.update_reward_baseline(batch)
    t = module.compute_targets(batch, module.plan(batch))
    shifted = _batch(module, multi_step=True)
    shifted.rewards = shifted.rewards - 0.35
    y, _, _ = _plain_reference(module, shifted, td_lambda=td_lambda)
    torch.testing.assert_close(t.targets, y, rtol=1e-5, atol=1e-5)
    unshifted, _, _ = _plain_reference(module, batch, td_lambda=td_lambda)
    assert not torch.allclose(t.targets, unshifted)
    assert t.charts["charts/reward_baseline"] == pytest.approx(0.35)


def test_the_running_baseline_is_the_mean_of_every_reward_so_far_and_survives_a_checkpoint(tmp_path):
    L.seed_everything(0)
    seen_rewards, shifts = [], []

    class Spy(ETPOModule):
        def compute_targets(self, batch, plan, replayed=None, record_behaviour=False):
            seen_rewards.extend(float(r) for r in batch.rewards)
            shifts.append(self.reward_shift)
            return super().compute_targets(batch, plan, replayed, record_behaviour)

    module = Spy(backbone=tiny_backbone(), reward_baseline="running")
    assert module.reward_shift == 0.0  # nothing seen yet
    trainer = _trainer(enable_checkpointing=True, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=_datamodule(budget=3 * 8))
    assert len(shifts) == 3 and len(seen_rewards) == 24
    for k, shift in enumerate(shifts):  # each batch is centred on the mean of every reward up to its own
        assert shift == pytest.approx(float(np.mean(seen_rewards[: 8 * (k + 1)])), abs=1e-6)
    assert len(set(np.round(seen_rewards, 6))) > 1
    path = tmp_path / "x.ckpt"
    trainer.save_checkpoint(path)
    again = ETPOModule(backbone=tiny_backbone(), reward_baseline="running")
    again.on_load_checkpoint(torch.load(path, weights_only=False))
    assert (again.reward_sum, again.reward_count) == pytest.approx((sum(seen_rewards), 24))
    assert again.reward_shift == pytest.approx(float(np.mean(seen_rewards)), abs=1e-6)
    assert again.episode_length == module.episode_length == 1


def test_episodes_of_different_lengths_are_refused_with_a_baseline():
    # the toy env with a success reward ends an episode at the first success: lengths 1..3 in one batch
    module = _perturbed_module("zero", reward_baseline="running")
    env = toy_env(max_steps=3, success_reward=0.5, target_chars="abcd")
    batch = _batch(module, multi_step=True, env=env)
    ends = {int(n) for n in batch.episode_step[batch.dones.bool()]}
    assert len(ends) > 1, ends
    with pytest.raises(ValueError, match=r"same number of steps.*stop_on_success: false"):
        module.update_reward_baseline(batch)
    # without a baseline the same batch is the paper's business as usual
    _perturbed_module("zero").update_reward_baseline(batch)
    with pytest.raises(ValueError, match="reward_baseline must be"):
        ETPOModule(backbone=tiny_backbone(), reward_baseline="mean")
    assert ETPOModule(backbone=tiny_backbone(), reward_baseline=-0.5).reward_shift == -0.5  # a fixed b as given


# -- two processes (gloo): every rank shifts by the same b and refuses the same lengths ------------------------------

def _ended_batch(rewards: list[float], steps: list[int]):
    """A batch whose transitions all end their episodes, after ``steps`` steps, with ``rewards``."""
    from datamodules.batch import GenerationConfig, RolloutBatch, RolloutMetrics

    B, P, L = len(rewards), 3, 2
    return RolloutBatch(
        prompt_ids=torch.full((B, P), 5), prompt_mask=torch.ones(B, P, dtype=torch.long),
        action_ids=torch.full((B, L), 6), action_mask=torch.ones(B, L, dtype=torch.long),
        rewards=torch.tensor(rewards), terminated=torch.ones(B, dtype=torch.bool),
        truncated=torch.zeros(B, dtype=torch.bool), next_index=torch.full((B,), -1),
        next_needed=torch.zeros(0, dtype=torch.long), env_index=torch.arange(B),
        episode_step=torch.tensor(steps), runnable=torch.ones(B, dtype=torch.bool), policy_version=0,
        sampling=GenerationConfig(temperature=1.0, top_k=0), metrics=RolloutMetrics(0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
        next_prompt_ids=torch.zeros(0, P, dtype=torch.long), next_prompt_mask=torch.zeros(0, P, dtype=torch.long))


def _baseline_worker(rank: int, world: int, port: int, out: str) -> None:
    import json

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    res: dict = {}
    try:
        module = ETPOModule(backbone=tiny_backbone(), reward_baseline="running")
        module.update_reward_baseline(_ended_batch([1.0, -1.0, 1.0] if rank == 0 else [0.5, -1.0], [5] * (3 - rank)))
        res["shift"], res["count"] = module.reward_shift, module.reward_count
        cases = {"lengths differ across ranks": ([5, 5], [4, 4]), "one rank mixes lengths": ([5, 5], [5, 4])}
        for name, steps in cases.items():
            fresh = ETPOModule(backbone=tiny_backbone(), reward_baseline="running")
            try:
                fresh.update_reward_baseline(_ended_batch([0.0, 0.0], steps[rank]))
                res[name] = "accepted"
            except ValueError as err:
                res[name] = "raised" if "4 to 5 steps" in str(err) else str(err)
        dist.barrier()  # every rank got here: none was left waiting in a collective
    finally:
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(res))
        dist.destroy_process_group()


def test_every_rank_shifts_by_the_same_mean_and_refuses_the_same_lengths(tmp_path):
    """With 2 processes the running mean is over both ranks' rewards (the same b everywhere), and episodes of
    different lengths -- on different ranks, or on one rank only -- make every rank raise together, not one rank
    raise while the other waits for it in the all-reduce."""
    import json
    import time

    import torch.multiprocessing as mp
    from test_scale import _free_port

    world = 2
    ctx = mp.spawn(_baseline_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=False)
    deadline = time.monotonic() + 240
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the ranks did not finish: one is waiting for the other in a collective")
    for rank in range(world):
        res = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert res["shift"] == pytest.approx((1.0 - 1.0 + 1.0 + 0.5 - 1.0) / 5) and res["count"] == 5
        assert res["lengths differ across ranks"] == res["one rank mixes lengths"] == "raised", res
