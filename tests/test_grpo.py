"""GRPO, the worked example of swapping in a module: its pure losses against plain loops, the module's chunked loss
against a direct computation, groups over multi-step rollouts, learning on the toy task (and a no-signal control),
token credit, its configs and benchmark entries, and a module from outside the repository run by ``etpo.fit``."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import textwrap

import lightning as L
import pytest
import torch

from conftest import REPO, tiny_backbone
from datamodules.batch import GenerationConfig
from datamodules.rollout import RolloutDataModule
from envs.base import TextEnv
from modules.grpo import GRPOModule
from modules.losses.grpo import group_advantages, grpo_loss, reference_kl, token_weights
from test_contenders import _toy_datamodule
from test_etpo_module import TOY_TOKENS, _batch, _mean_policy_reward, _trainer


# ---- pure functions vs plain loops -----------------------------------------------------------------------------

def _loop_advantages(rewards, groups, scale, eps):
    members = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    out = [0.0] * len(rewards)
    for idx in members.values():
        values = [rewards[i] for i in idx]
        if len(values) == 1:
            continue  # a lone sample has no sibling to be compared with
        mean = statistics.fmean(values)
        std = statistics.stdev(values)  # n - 1
        for i in idx:
            out[i] = (rewards[i] - mean) / (std + eps) if scale else rewards[i] - mean
    return out


@pytest.mark.parametrize("scale", [True, False])
def test_group_advantages_match_a_plain_loop(scale):
    gen = torch.Generator().manual_seed(0)
    # groups of sizes 1..5 and one whose rewards are all equal, shuffled, with arbitrary (non-dense) ids
    groups = torch.tensor(sum(([g] * n for g, n in zip((7, 3, 11, 0, 42, 5), (1, 2, 3, 4, 5, 3))), []))
    groups = groups[torch.randperm(len(groups), generator=gen)]
    rewards = torch.randn(len(groups), generator=gen, dtype=torch.float64)
    rewards[groups == 5] = 0.25
    got = group_advantages(rewards, groups, scale=scale, eps=1e-4)
    expected = _loop_advantages(rewards.tolist(), groups.tolist(), scale, 1e-4)
    assert got.tolist() == pytest.approx(expected, abs=1e-12)
    assert torch.all(got[groups == 7] == 0)  # the singleton
    assert torch.all(got[groups == 5] == 0)  # equal rewards: no preference
    for g in (3, 11, 0, 42):  # every real group is centred
        assert abs(float(got[groups == g].sum())) < 1e-9


def test_group_advantages_refuse_mismatched_shapes():
    with pytest.raises(ValueError, match="same length"):
        group_advantages(torch.zeros(3), torch.zeros(4, dtype=torch.long))


def _loop_loss(logprobs, old, adv, kl, mask, clip, beta, aggregation):
    """DeepSeekMath Eq. 3 written out token by token."""
    rows = []
    total_tokens = sum(sum(r) for r in mask)
    token_sum = 0.0
    for b in range(len(mask)):
        row_sum, n = 0.0, 0
        for t in range(len(mask[b])):
            if not mask[b][t]:
                continue
            ratio = math.exp(logprobs[b][t] - old[b][t])
            clipped = min(max(ratio, 1 - clip), 1 + clip)
            term = -min(ratio * adv[b], clipped * adv[b]) + beta * kl[b][t]
            row_sum += term
            n += 1
        rows.append(row_sum / n)
        token_sum += row_sum
    return token_sum / total_tokens if aggregation == "token_mean" else sum(rows) / len(rows)


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean"])
def test_grpo_loss_matches_the_formula_token_by_token(aggregation):
    gen = torch.Generator().manual_seed(1)
    b, length = 5, 7
    mask = torch.zeros(b, length)
    for i, n in enumerate((7, 1, 3, 5, 2)):
        mask[i, :n] = 1
    old = -torch.rand(b, length, generator=gen, dtype=torch.float64) * 3
    logprobs = old + 0.6 * torch.randn(b, length, generator=gen, dtype=torch.float64)  # ratios in and out of the clip
    adv = torch.randn(b, generator=gen, dtype=torch.float64)
    kl = torch.rand(b, length, generator=gen, dtype=torch.float64)
    weights = token_weights(mask.double(), aggregation)
    got = grpo_loss(logprobs, old, adv[:, None] * mask, kl, weights, clip=0.2, beta_kl=0.3)
    expected = _loop_loss(logprobs.tolist(), old.tolist(), adv.tolist(), kl.tolist(), mask.tolist(), 0.2, 0.3,
                          aggregation)
    assert float(got) == pytest.approx(expected, abs=1e-12)
    ratio = (logprobs - old).exp()[mask.bool()]
    assert (ratio > 1.2).any() and (ratio < 0.8).any()  # both sides of the clip were exercised
    # chunks of the tokens add up to the whole (the module sums the loss over chunks)
    parts = sum(float(grpo_loss(logprobs[:, s], old[:, s], (adv[:, None] * mask)[:, s], kl[:, s], weights[:, s],
                                0.2, 0.3)) for s in (slice(0, 3), slice(3, 7)))
    assert parts == pytest.approx(float(got), abs=1e-12)


def test_token_weights_refuse_an_unknown_aggregation():
    with pytest.raises(ValueError, match="sequence_mean"):
        token_weights(torch.ones(2, 2), "max")


def test_reference_kl_is_the_exact_vocabulary_sum_and_its_gradient():
    gen = torch.Generator().manual_seed(2)
    pi_logits = torch.randn(3, 4, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    ref_logits = torch.randn(3, 4, 6, generator=gen, dtype=torch.float64)
    got = reference_kl(pi_logits, ref_logits)
    for idx in [(0, 0), (1, 2), (2, 3)]:
        z_pi = sum(math.exp(x) for x in pi_logits[idx].tolist())
        z_ref = sum(math.exp(x) for x in ref_logits[idx].tolist())
        p = [math.exp(x) / z_pi for x in pi_logits[idx].tolist()]
        q = [math.exp(x) / z_ref for x in ref_logits[idx].tolist()]
        kl = sum(pw * math.log(pw / qw) for pw, qw in zip(p, q))
        assert float(got[idx].detach()) == pytest.approx(kl, abs=1e-12)
        # d KL / d logit_w = p_w (log p_w - log q_w - KL): the exact sum has this gradient, the k3 sample has not
        (grad,) = torch.autograd.grad(got[idx], pi_logits, retain_graph=True)
        expected = [pw * (math.log(pw / qw) - kl) for pw, qw in zip(p, q)]
        assert grad[idx].tolist() == pytest.approx(expected, abs=1e-12)
    assert float(reference_kl(ref_logits, ref_logits).abs().max()) < 1e-12


# ---- the module's loss: chunked and exact ----------------------------------------------------------------------

def _module(**kw):
    torch.manual_seed(0)
    module = GRPOModule(backbone=tiny_backbone(), **kw)
    module.configure_model()
    return module


def _perturb_policy(module, scale=0.3):
    with torch.no_grad():
        for p in module.model.policy_parameters():
            p.add_(scale * torch.randn_like(p))


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean"])
def test_chunked_minibatch_loss_equals_a_direct_computation(aggregation):
    """The module's loss (shared prefixes, vocabulary chunks of 2 tokens, dL/dh surrogate) has the value and the
    gradient of GRPO's loss written directly on full [B, L, V] logits."""
    module = _module(token_chunk_size=2, loss_aggregation=aggregation, beta_kl=0.2, clip=0.2)
    batch = _batch(module, multi_step=True)
    batch.rewards = torch.linspace(-1.0, 1.0, len(batch))  # varied rewards inside the groups
    prepared = module.prepare(batch)  # pi_old = the weights before the perturbation
    _perturb_policy(module)
    params = module.model.policy_parameters()

    loss, charts = module.minibatch_loss(batch, prepared)
    got = torch.autograd.grad(loss, params)

    m = module.model
    args = (batch.prompt_ids, batch.prompt_mask, batch.action_ids, batch.action_mask)
    logits = m.action_logits("policy", *args)
    with torch.no_grad():
        ref = m.action_logits("reference", *args)
    mask = batch.action_mask.double()
    log_pi = torch.log_softmax(logits.double(), -1)
    log_ref = torch.log_softmax(ref.double(), -1)
    taken = log_pi.gather(-1, batch.action_ids[..., None]).squeeze(-1)
    kl = (log_pi.exp() * (log_pi - log_ref)).sum(-1)
    ratio = (taken - prepared.old_logprobs.double()).exp()
    adv = prepared.advantages.double()[:, None]
    per_token = -torch.minimum(ratio * adv, ratio.clamp(0.8, 1.2) * adv) + 0.2 * kl
    if aggregation == "token_mean":
        direct = (per_token * mask).sum() / mask.sum()
    else:
        direct = ((per_token * mask).sum(1) / mask.sum(1)).mean()
    expected = torch.autograd.grad(direct, params)

    assert float(loss.detach()) == pytest.approx(float(direct.detach()), abs=1e-5)
    assert charts["charts/clipfrac"] > 0  # the perturbation moved ratios out of the clip range
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.double(), e.double(), rtol=1e-4, atol=1e-6)
    assert max(float(g.abs().max()) for g in got) > 1e-4


def test_advantages_group_identical_states_of_multi_step_episodes():
    """Each transition is scored by its own reward against the other actions sampled for the same state: the first
    attempts (of every episode in the batch) form one group; a continuation whose state occurs once gets 0."""
    module = _module()
    batch = _batch(module, multi_step=True)  # 4 envs x 4 steps of 3-step episodes: step 4 restarts
    got = module.advantages(batch)
    states = [tuple(r[m.bool()].tolist()) for r, m in zip(batch.prompt_ids, batch.prompt_mask)]
    expected = _loop_advantages(batch.rewards.tolist(), states, True, module.hparams.std_eps)
    assert got.tolist() == pytest.approx(expected, abs=1e-6)
    first = batch.episode_step == 1
    assert int(first.sum()) == 8 and len({s for s, f in zip(states, first) if f}) == 1  # one group of 8
    assert batch.rewards[first].std() > 0 and got[first].abs().sum() > 0
    lone = torch.tensor([states.count(s) == 1 for s in states])
    assert lone.any() and torch.all(got[lone] == 0)


# ---- learning ---------------------------------------------------------------------------------------------------

def test_grpo_raises_reward_on_the_toy_task():
    L.seed_everything(0)
    module = GRPOModule(backbone=tiny_backbone(tiny_init_std=0.2), beta_kl=0.01, policy_lr=1e-2, epochs=2,
                        minibatch_size=4)
    module.configure_model()
    critic_before = [p.clone() for p in module.model.critic_parameters()]
    before = _mean_policy_reward(module)
    _trainer().fit(module, datamodule=_toy_datamodule(budget=8 * 20))
    after = _mean_policy_reward(module)
    assert before < 0.35 and after > before + 0.4, (before, after)
    assert module.policy_version == 20  # rollout batches learned from
    assert module.trainer.global_step == 20 * 2 * 2  # epochs x minibatches policy steps per batch, nothing else
    for b, a in zip(critic_before, module.model.critic_parameters()):
        assert torch.equal(a, b)  # no critic: the critic adapter is never trained


class ConstantRewardEnv(TextEnv):
    """Every action earns the same reward: every group-relative advantage is 0."""

    def reset(self, *, seed=None, options=None):
        return "q:", {"status": "reset", "steps": 0}

    def step(self, action):
        return "q:", 0.5, True, False, {"status": "ok", "steps": 1}


def _constant_datamodule(budget):
    return RolloutDataModule(env=ConstantRewardEnv, num_envs=8, steps_per_update=1, budget=budget, seed=0,
                             generation=GenerationConfig(max_new_tokens=TOY_TOKENS, temperature=1.0, top_k=0))


def _kl_to_reference(module, batch):
    m = module.model
    args = (batch.prompt_ids, batch.prompt_mask, batch.action_ids, batch.action_mask)
    with torch.no_grad():
        kl = reference_kl(m.action_logits("policy", *args), m.action_logits("reference", *args))
    mask = batch.action_mask.float()
    return float((kl * mask).sum() / mask.sum())


def test_without_reward_differences_only_the_kl_moves_the_policy():
    # no reward signal and no KL: the gradient is exactly zero, the policy stays bit for bit where it was
    L.seed_everything(0)
    module = GRPOModule(backbone=tiny_backbone(tiny_init_std=0.2), beta_kl=0.0, policy_lr=1e-2, epochs=2,
                        minibatch_size=4)
    module.configure_model()
    _perturb_policy(module)
    before = [p.clone() for p in module.model.policy_parameters()]
    _trainer().fit(module, datamodule=_constant_datamodule(budget=8 * 3))
    for b, a in zip(before, module.model.policy_parameters()):
        assert torch.equal(a, b)
    # with the KL term the same run pulls the policy back towards the reference
    L.seed_everything(0)
    module = GRPOModule(backbone=tiny_backbone(tiny_init_std=0.2), beta_kl=1.0, policy_lr=1e-2, epochs=2,
                        minibatch_size=4)
    module.configure_model()
    _perturb_policy(module)
    probe = _batch(module, seed=5)
    kl_before = _kl_to_reference(module, probe)
    _trainer().fit(module, datamodule=_constant_datamodule(budget=8 * 10))
    kl_after = _kl_to_reference(module, probe)
    assert kl_before > 0.05 and kl_after < 0.5 * kl_before, (kl_before, kl_after)


# ---- token credit -----------------------------------------------------------------------------------------------

def test_token_credit_shows_the_group_advantage_and_the_log_ratio():
    module = _module()
    batch = _batch(module, multi_step=True)
    _perturb_policy(module)
    credit = module.token_credit(batch, max_examples=None)
    assert len(credit.tokens) == len(batch) and credit.rewards == pytest.approx(batch.rewards.tolist())
    advantages = module.advantages(batch)
    shared = credit.scores["group advantage (shared by the action)"]
    for row, a in zip(shared, advantages.tolist()):
        assert row == pytest.approx([a] * len(row), abs=1e-6)
    args = (batch.prompt_ids, batch.prompt_mask, batch.action_ids, batch.action_mask)
    log_ratio = module.model.action_logprobs("policy", *args) - module.model.action_logprobs("reference", *args)
    kl = reference_kl(module.model.action_logits("policy", *args), module.model.action_logits("reference", *args))
    for got_ratio, got_kl, exp_ratio, exp_kl, mask in zip(credit.scores["log pi - log pi_bar"],
                                                          credit.scores["KL(pi || pi_bar) at the token"],
                                                          log_ratio, kl, batch.action_mask.bool()):
        assert got_ratio == pytest.approx(exp_ratio[mask].tolist(), abs=1e-5)
        assert got_kl == pytest.approx(exp_kl[mask].tolist(), abs=1e-5)
    assert max(abs(x) for row in credit.scores["log pi - log pi_bar"] for x in row) > 1e-3
    assert len(module.token_credit(batch, max_examples=3).tokens) == 3


# ---- configs and benchmarks -------------------------------------------------------------------------------------

@pytest.mark.parametrize("base", ["quickstart.yaml", "etpo.yaml"])
def test_the_grpo_overlay_is_a_valid_grpo_module_on_every_setting(base):
    """The overlay turns a setting into GRPO with valid arguments (tests/test_configs.py checks that it changes
    nothing but the model section)."""
    from test_configs import resolve

    resolved = resolve(base, "contenders/grpo.yaml")
    assert resolved["model"]["class_path"] == "modules.grpo.GRPOModule"
    GRPOModule(**{k: v for k, v in resolved["model"]["init_args"].items() if k != "backbone"})  # valid arguments


@pytest.mark.parametrize("name", ["cpu.yaml", "paper.yaml", "smoke.yaml"])
def test_benchmarks_run_grpo_like_the_other_contenders(tmp_path, monkeypatch, name):
    from etpo import benchmark

    cfg = benchmark.load_config(REPO / "configs" / "benchmark" / name, [f"out={tmp_path}"])
    specs = benchmark.plan(cfg, only=["grpo"])
    assert specs and all(s.contender == "grpo" for s in specs)
    config = next(c.config for c in cfg.contenders if c.name == "grpo")
    assert (REPO / config).is_file() and config in specs[0].command
    if name == "cpu.yaml":  # the arguments reach the resolved config (what the sweep checks before running)
        monkeypatch.chdir(REPO)  # contender configs are relative to the repository root
        assert benchmark.preflight(specs[:1]) == []


# ---- a module from outside the repository -----------------------------------------------------------------------

OUTSIDE_MODULE = '''
"""A REINFORCE-with-baseline agent written outside the repository against the module contract only."""
from typing import Optional

import torch

from modules.agent import AgentModule, TokenCredit
from modules.shared_base import BackboneConfig, adapter_parameters


class Reinforce(AgentModule):
    contender = "reinforce"

    def __init__(self, backbone: BackboneConfig | None = None, lr: float = 1e-2):
        super().__init__(backbone)
        self.save_hyperparameters(ignore=["backbone"])

    def configure_optimizers(self):
        params = [p for _, p in adapter_parameters(self.trainer.model, "policy", trainable_only=True)]
        return torch.optim.AdamW([{"params": params, "name": "policy", "max_grad_norm": 1.0}], lr=self.hparams.lr)

    def learn(self, batch):
        return self.optimizer_step_on(self.optimizers(), self.loss, batch)

    def loss(self, batch):
        m = self.model
        plan = m.plan(batch.prompt_ids, batch.prompt_mask, batch.action_ids, batch.action_mask)
        hidden, _ = m.plan_hidden("policy", plan)
        logp = (m.taken_logprobs(hidden, batch.action_ids) * batch.action_mask).sum(-1)
        loss = -((batch.rewards - batch.rewards.mean()) * logp).mean()
        return loss, {"losses/policy": float(loss.detach())}

    @torch.no_grad()
    def token_credit(self, batch, max_examples: Optional[int] = 4):
        sub, tokens = self.credit_rows(batch, max_examples)
        centred = (sub.rewards - batch.rewards.mean().to(sub.device))[:, None] * sub.action_mask
        return TokenCredit(tokens=tokens, scores={"centred reward": self.per_token_lists(centred, sub.action_mask)},
                           rewards=sub.rewards.tolist())
'''


def _fit(tmp_path, *args, env=None):
    cmd = [sys.executable, "-m", "etpo.fit", "--config", str(REPO / "configs" / "toy.yaml"),
           "--run_dir", str(tmp_path / "run"), "--data.budget=16", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)


def _scalar_keys(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return set(EventAccumulator(str(run_dir)).Reload().Tags()["scalars"])


ROLLOUT_KEYS = {"charts/avg_reward", "charts/best_reward", "charts/runnable_fraction", "charts/env_steps",
                "charts/sps"}


def test_a_module_defined_outside_the_repository_runs_through_fit(tmp_path):
    package = tmp_path / "outside" / "banditpkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(textwrap.dedent(OUTSIDE_MODULE))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path / "outside"),
                                                                      os.environ.get("PYTHONPATH")]))}
    proc = _fit(tmp_path, "--model", "banditpkg.Reinforce", "--model.init_args.lr=0.02", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["contender"] == "reinforce" and summary["model_class"] == "banditpkg.Reinforce"
    assert summary["finished"] is True and summary["env_steps"] == 16 and summary["updates"] == 2
    assert len((run / "history.jsonl").read_text().splitlines()) == 2
    resolved = (run / "config.yaml").read_text()
    assert "class_path: banditpkg.Reinforce" in resolved and "lr: 0.02" in resolved
    assert {"losses/policy", "charts/grad_norm_policy"} | ROLLOUT_KEYS <= _scalar_keys(run)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["agent"]["policy_version"] == 2 and ckpt["global_step"] == 2
    assert (run / "adapters" / "policy" / "adapter_config.json").is_file()
    pages = sorted((run / "credit").glob("step_*.html"))
    assert pages and "centred reward" in pages[0].read_text()


def test_grpo_runs_through_fit(tmp_path):
    proc = _fit(tmp_path, "--model", "modules.grpo.GRPOModule", "--model.init_args.epochs=2",
                "--model.init_args.minibatch_size=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["contender"] == "grpo" and summary["finished"] is True and summary["env_steps"] == 16
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["agent"]["policy_version"] == 2 and ckpt["global_step"] == 2 * 2 * 2
    assert len(ckpt["optimizer_states"]) == 1  # the policy's: no critic
    keys = _scalar_keys(run)
    assert {"losses/policy", "charts/kl", "charts/entropy", "charts/clipfrac", "charts/grouped_fraction"} \
        | ROLLOUT_KEYS <= keys
    assert "losses/critic" not in keys
    pages = sorted((run / "credit").glob("step_*.html"))
    assert pages and "group advantage" in pages[0].read_text()
