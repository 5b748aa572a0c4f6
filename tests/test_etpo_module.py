"""The ETPO LightningModule and the rollout DataModule, shrunk to a tiny random model and a toy environment:
exact chunked gradients, learning (and a no-policy-step control), on-policy sampling, the fit CLI, resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from conftest import REPO, tiny_backbone, toy_env
from datamodules.rollout import GenerationConfig, RolloutDataModule
from modules.etpo import ETPOModule
from modules.losses.etpo import critic_loss, policy_loss, q_from_critic, soft_value, token_targets, trace_targets


def _trainer(**kw):
    defaults = dict(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                    limit_val_batches=0, log_every_n_steps=1)
    defaults.update(kw)
    return L.Trainer(**defaults)


def _datamodule(budget, num_envs=8, steps_per_update=1, max_new_tokens=8, seed=0, env=None):
    return RolloutDataModule(env=env or toy_env(), num_envs=num_envs, steps_per_update=steps_per_update,
                             budget=budget, seed=seed,
                             generation=GenerationConfig(max_new_tokens=max_new_tokens, temperature=1.0, top_k=0))


class _Collect:
    """A stand-in policy for building batches outside a Trainer."""

    def __init__(self, module):
        self.module = module
        self.policy_version = 0

    def act(self, prompts, generation):
        return self.module.act(prompts, generation)

    def encode_prompts(self, prompts):
        return self.module.encode_prompts(prompts)


def _batch(module, multi_step=False, seed=0, env=None):
    """A real rollout batch of the toy env; multi-step: 4 steps of 3-step episodes (linked transitions, next
    prompts that extend the prompt, terminal and non-terminal rows)."""
    from datamodules.rollout import RolloutCollector

    torch.manual_seed(seed)
    env = env or (toy_env(max_steps=3) if multi_step else toy_env())
    collector = RolloutCollector(env, num_envs=4, steps_per_update=4 if multi_step else 1, budget=100, seed=seed,
                                 generation=GenerationConfig(max_new_tokens=6, temperature=1.0, top_k=0))
    batch = collector.collect(_Collect(module))
    collector.close()
    return batch


def _perturbed_module(q_parameterisation="zero", gradient_checkpointing=False, prefix_sharing=True,
                      alphabet="abcdefgh", **kw):
    torch.manual_seed(0)
    module = ETPOModule(backbone=tiny_backbone(gradient_checkpointing=gradient_checkpointing,
                                               prefix_sharing=prefix_sharing, tiny_alphabet=alphabet),
                        beta=0.05, gamma=0.9, q_parameterisation=q_parameterisation, token_chunk_size=2, **kw)
    module.configure_model()
    m = module.model
    # give the adapters non-trivial weights so policy, critic, target and reference all differ
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_" in name:
                p.add_(0.3 * torch.randn_like(p))
        m.polyak_update(0.5)
    m.train()
    return module


def _plain_reference(module, batch, td_lambda=0.0):
    """Eq. 6 / TD(lambda) targets, the critic loss and the policy loss from full [B, L, V] logits of the plain
    (unshared) forwards and the library objectives."""
    m, beta, gamma = module.model, module.hparams.beta, module.hparams.gamma
    q_form = module.hparams.q_parameterisation
    args = (batch.prompt_ids, batch.prompt_mask, batch.action_ids, batch.action_mask)
    plain = dict(share_prefixes=False)
    mask = batch.action_mask.float()
    with torch.no_grad():
        ref = m.head(m.action_hidden("reference", *args, **plain))
        target_q = q_from_critic(m.head(m.action_hidden("target", *args, **plain)), ref, q_form)
        pi_now = m.head(m.action_hidden("policy", *args, **plain))
        next_values = torch.zeros(len(batch))
        for k in range(len(batch)):
            j = int(batch.next_index[k])
            if j >= 0:
                next_values[k] = soft_value(target_q[j, 0], pi_now[j, 0], ref[j, 0], beta)[0]
        if batch.next_needed.numel():
            ids, pm = batch.next_prompt_ids, batch.next_prompt_mask
            r1 = m.first_token_logits("reference", ids, pm)
            t1 = q_from_critic(m.first_token_logits("target", ids, pm), r1, q_form)
            p1 = m.first_token_logits("policy", ids, pm)
            next_values[batch.next_needed] = soft_value(t1, p1, r1, beta)[0]
        values, _ = soft_value(target_q, pi_now, ref, beta)
        taken = batch.action_ids.unsqueeze(-1)
        y = trace_targets(values, target_q.gather(-1, taken).squeeze(-1), torch.ones_like(values), mask,
                          batch.rewards, batch.dones, next_values, gamma, td_lambda)
        if td_lambda == 0.0:
            torch.testing.assert_close(y, token_targets(target_q, pi_now, ref, mask, batch.rewards, batch.dones,
                                                        next_values, beta, gamma))
    q = q_from_critic(m.head(m.action_hidden("critic", *args, **plain)), ref, q_form)
    pi = m.head(m.action_hidden("policy", *args, **plain))
    return y, critic_loss(q, batch.action_ids, y, mask), policy_loss(pi, ref, q.detach(), mask, beta)


@pytest.mark.parametrize("q_parameterisation", ["logits", "zero"])
@pytest.mark.parametrize("multi_step", [False, True])
@pytest.mark.parametrize("prefix_sharing, gradient_checkpointing", [(True, False), (True, True), (False, False)])
def test_update_gives_the_exact_targets_losses_and_gradients(q_parameterisation, multi_step, prefix_sharing,
                                                             gradient_checkpointing):
    """The update's targets, both losses and both adapters' gradients equal plain autograd through full [B, L, V]
    logits of the plain forwards and the library objectives -- with shared prefixes (multi-step batches mix shared
    and unshared prompts, left padding, linked, next-prompt, terminal and non-terminal rows) and activation
    checkpointing."""
    module = _perturbed_module(q_parameterisation, gradient_checkpointing, prefix_sharing)
    m = module.model
    batch = _batch(module, multi_step=multi_step)
    if multi_step:
        assert (batch.next_index >= 0).any() and batch.next_needed.numel() > 0
        assert (batch.dones == 1).any() and (batch.dones == 0).any()
    plan = module.plan(batch)
    assert (plan.packed is not None) == prefix_sharing
    t = module.compute_targets(batch, plan)
    y, ref_critic, ref_policy = _plain_reference(module, batch)
    torch.testing.assert_close(t.targets, y, rtol=1e-5, atol=1e-5)

    for params, got, want in ((m.critic_parameters(), module.critic_loss(batch, plan, t)[0], ref_critic),
                              (m.policy_parameters(), module.policy_loss(batch, plan, t)[0], ref_policy)):
        assert got.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-6)
        for g1, g2 in zip(torch.autograd.grad(got, params), torch.autograd.grad(want, params)):
            torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)


def test_chunk_positions_bound_the_chunk_and_change_no_number(monkeypatch):
    """``chunk_positions``: a chunk of vocabulary-sized work is min(token_chunk_size, chunk_positions // rows) tokens
    wide, and the targets, both losses and both gradients are those of the plain computation."""
    import modules.etpo as etpo_module
    from modules.shared_base.scoring import token_chunks

    module = _perturbed_module(chunk_positions=5)  # token_chunk_size 2: 5 // 4 rows = 1 token a chunk
    m = module.model
    batch = _batch(module, multi_step=True)
    rows = len(batch)
    assert module.chunk_width(rows) == max(1, min(2, 5 // rows)) == 1 and module.chunk_width(2) == 2
    widths = []

    def recording(n, size):
        widths.append(size)
        return token_chunks(n, size)

    monkeypatch.setattr(etpo_module, "token_chunks", recording)
    plan = module.plan(batch)
    t = module.compute_targets(batch, plan)
    assert widths == [1]
    y, ref_critic, ref_policy = _plain_reference(module, batch)
    torch.testing.assert_close(t.targets, y, rtol=1e-5, atol=1e-5)
    seen = []
    original = type(m).chunked_head_loss
    monkeypatch.setattr(type(m), "chunked_head_loss",
                        lambda self, h, fn, size=64: seen.append(size) or original(self, h, fn, size))
    for params, got, want in ((m.critic_parameters(), module.critic_loss(batch, plan, t)[0], ref_critic),
                              (m.policy_parameters(), module.policy_loss(batch, plan, t)[0], ref_policy)):
        assert got.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-6)
        for g1, g2 in zip(torch.autograd.grad(got, params), torch.autograd.grad(want, params)):
            torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)
    assert seen == [1]
    with pytest.raises(ValueError, match="chunk_positions must be >= 1"):
        ETPOModule(backbone=tiny_backbone(), chunk_positions=0)


def test_etpo_disc_needs_the_papers_backup_and_says_so():
    """ETPO(Disc.) discounts Eq. 6's within-action targets; the trees' backup has no such discount, so the pair is
    refused with the way to the paper's backup (the quickstart runs the trees since learning v3)."""
    with pytest.raises(ValueError, match="etpo_v2.yaml before etpo_disc.yaml"):
        ETPOModule(backbone=tiny_backbone(), target_backup="optimal_tree", discount_within_action=True)
    module = ETPOModule(backbone=tiny_backbone(), target_backup="policy", discount_within_action=True)
    assert module.hparams.discount_within_action


@pytest.mark.parametrize("configs", [("quickstart.yaml",), ("quickstart.yaml", "contenders/etpo_v2.yaml"),
                                     ("quickstart.yaml", "contenders/etpo_v2.yaml", "contenders/etpo_disc.yaml"),
                                     ("quickstart.yaml", "contenders/etpo_1step.yaml"), ("etpo.yaml",),
                                     ("etpo.yaml", "contenders/etpo_disc.yaml")])
def test_the_etpo_configs_make_valid_modules(configs):
    """Each ETPO setting and overlay as the docs name them gives arguments the module accepts (parsing alone does
    not construct it); v2's form pinned by etpo_v2.yaml is the paper's backup and policy step at beta 0.05."""
    from test_configs import resolve

    args = {k: v for k, v in resolve(*configs)["model"]["init_args"].items() if k != "backbone"}
    module = ETPOModule(**args)
    if "contenders/etpo_v2.yaml" in configs:
        assert (module.hparams.target_backup, module.hparams.policy_target, module.hparams.policy_divergence,
                module.hparams.answer_memory, module.hparams.beta) == ("policy", "critic", "reverse", 0, 0.05)
    elif configs == ("quickstart.yaml",):
        assert (module.hparams.target_backup, module.hparams.policy_divergence, module.hparams.beta) == (
            "optimal_tree", "forward", 0.01)


def test_td_lambda_targets_of_the_update_equal_the_plain_computation():
    module = _perturbed_module(td_lambda=0.7, trace_correction=False)
    batch = _batch(module, multi_step=True)
    t = module.compute_targets(batch, module.plan(batch))
    y, _, _ = _plain_reference(module, batch, td_lambda=0.7)
    torch.testing.assert_close(t.targets, y, rtol=1e-5, atol=1e-5)
    y0, _, _ = _plain_reference(module, batch)
    assert not torch.allclose(y, y0)  # lambda changes the targets of the earlier tokens


def test_critic_step_comes_first_and_the_policy_step_sees_the_updated_critic():
    """Algorithm 1's order with two optimizers: the soft Bellman step, then the policy step against the critic
    *after* its step; each optimizer touches its own adapter only."""
    L.seed_everything(0)
    seen = []

    class Spy(ETPOModule):
        def learn(self, batch):
            self._before = {k: [p.detach().clone() for p in ps] for k, ps in
                            (("critic", self.model.critic_parameters()), ("policy", self.model.policy_parameters()))}
            return super().learn(batch)

        def policy_loss(self, batch, plan, t):
            changed = lambda k, ps: any(not torch.equal(a, b) for a, b in zip(self._before[k], ps))  # noqa: E731
            seen.append((changed("critic", self.model.critic_parameters()),
                         changed("policy", self.model.policy_parameters())))
            return super().policy_loss(batch, plan, t)

    module = Spy(backbone=tiny_backbone(), policy_lr=1e-2, critic_lr=1e-2)
    _trainer().fit(module, datamodule=_datamodule(budget=16))
    assert seen == [(True, False), (True, False)]
    optimizers = module.optimizers()
    assert len(optimizers) == 2
    assert [o.optimizer.param_groups[0]["name"] for o in optimizers] == ["critic", "policy"]


@pytest.mark.parametrize("multi_step", [True, False])
def test_the_step_limit_ends_the_episode_without_bootstrap(multi_step):
    """The paper's episode ends: truncation at the step limit is a done signal, so the last token's target of a
    truncated transition is its reward alone (no V(s_{t+1})), and no next prompt is scored for it."""
    module = _perturbed_module()
    env = toy_env(max_steps=3 if multi_step else 1, success_reward=2.0)  # never succeeds: every episode truncates
    batch = _batch(module, multi_step=multi_step, env=env)
    assert batch.truncated.any() and not batch.terminated.any()
    assert torch.equal(batch.dones, batch.truncated.float())
    assert not any(int(k) in batch.next_needed.tolist() for k in torch.nonzero(batch.truncated).flatten())
    t = module.compute_targets(batch, module.plan(batch))
    last = batch.action_mask.sum(1) - 1
    final = t.targets[torch.arange(len(batch)), last]
    torch.testing.assert_close(final[batch.truncated], batch.rewards[batch.truncated])
    if multi_step:  # the episodes that go on bootstrap from V(s_{t+1}) != 0
        going_on = ~batch.truncated
        assert going_on.any() and not torch.allclose(final[going_on], batch.rewards[going_on])


@pytest.mark.parametrize("frozen", ["policy", "critic"])
def test_each_optimizer_has_its_own_learning_rate(frozen):
    L.seed_everything(0)
    module = ETPOModule(backbone=tiny_backbone(), **{"policy_lr": 1e-2, "critic_lr": 1e-2, f"{frozen}_lr": 0.0})
    module.configure_model()
    before = {k: [p.detach().clone() for p in getattr(module.model, f"{k}_parameters")()] for k in ("policy", "critic")}
    _trainer().fit(module, datamodule=_datamodule(budget=8))
    for k in ("policy", "critic"):
        same = all(torch.equal(a, b) for a, b in zip(before[k], getattr(module.model, f"{k}_parameters")()))
        assert same == (k == frozen), k


def test_critic_warmup_freezes_the_policy_for_the_first_batches():
    L.seed_everything(0)
    steps = []

    class Spy(ETPOModule):
        def policy_loss(self, batch, plan, t):
            steps.append(self.policy_version)
            return super().policy_loss(batch, plan, t)

    module = Spy(backbone=tiny_backbone(), critic_warmup=2, critic_steps=2)
    _trainer().fit(module, datamodule=_datamodule(budget=8 * 4))
    assert steps == [2, 3]
    assert module.trainer.global_step == 4 * 2 + 2  # two critic steps per batch, policy steps from batch 3 on


# Settings under which the toy task is learnable within a few dozen updates: a tiny model whose weights are large
# enough for LoRA to move its outputs, a fast target (credit must reach the early tokens within the run), and
# the "zero" Q form so the optimal soft policy starts at the reference rather than at a random sharpening of it.
TOY_ETPO = dict(beta=0.05, gamma=0.99, q_parameterisation="zero", policy_lr=1e-2, critic_lr=1e-2, polyak=0.8)
TOY_TOKENS = 4


def _mean_policy_reward(module, n=64, seed=123):
    """Average reward of the current policy on fresh samples of the toy env (the env's own reward function)."""
    from envs.toy import TargetCharsEnv

    env = TargetCharsEnv(target_chars="ab", prompt="q:")
    torch.manual_seed(seed)
    gen = module.act(["q:"] * n, GenerationConfig(max_new_tokens=TOY_TOKENS, temperature=1.0, top_k=0))
    rewards = []
    for text in gen.texts:
        env.reset(seed=0)
        rewards.append(env.step(text)[1])
    return float(np.mean(rewards))


@pytest.mark.parametrize("train_policy", [True, False])
def test_etpo_learns_the_toy_task_and_the_control_does_not(train_policy):
    L.seed_everything(0)
    module = ETPOModule(backbone=tiny_backbone(tiny_init_std=0.2), train_policy=train_policy, **TOY_ETPO)
    module.configure_model()
    before = _mean_policy_reward(module)
    dm = _datamodule(budget=8 * 40, max_new_tokens=TOY_TOKENS)
    _trainer().fit(module, datamodule=dm)
    after = _mean_policy_reward(module)
    if train_policy:
        assert before < 0.35 and after > before + 0.4, (before, after)
    else:
        assert abs(after - before) < 0.1, (before, after)
        assert module.policy_version == 40  # the critic was still trained every step


def test_rollout_is_on_policy_and_counts_the_budget():
    L.seed_everything(0)
    versions = []

    class Spy(ETPOModule):
        def learn(self, batch):
            # two optimizer steps (critic, policy) per batch
            versions.append((batch.policy_version, self.policy_version, self.global_step // 2))
            # the update runs in train mode: that is what switches activation checkpointing on
            assert self.model.training and self.model.peft_model.training
            return super().learn(batch)

    module = Spy(backbone=tiny_backbone(gradient_checkpointing=True))
    dm = _datamodule(budget=8 * 3 + 1, steps_per_update=1)
    _trainer().fit(module, datamodule=dm)
    assert [v[0] for v in versions] == [0, 1, 2, 3]
    assert all(a == b == c for a, b, c in versions)
    assert dm.collector is None or dm.collector.stats.env_steps >= 25


def _run_fit(tmp_path, *extra, budget=16):
    cmd = [sys.executable, "-m", "etpo.fit", "--config", str(REPO / "configs" / "toy.yaml"),
           "--run_dir", str(tmp_path / "run"), f"--data.budget={budget}", *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_fit_cli_writes_a_complete_run_directory(tmp_path):
    proc = _run_fit(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    assert list(run.glob("events.out.tfevents.*")), sorted(p.name for p in run.iterdir())
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert list((run / "checkpoints").glob("best-*.ckpt"))
    assert (run / "config.yaml").is_file()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["finished"] is True and summary["env_steps"] == 16 and summary["contender"] == "etpo"
    assert len(summary["batch_avg_reward"]) == 2 and len(summary["best_within"]) == 2
    assert (run / "best_code.py").is_file()
    curve = run / "reward_curve.png"
    assert curve.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"reward curve: {curve}" in proc.stdout
    credit = sorted((run / "credit").glob("step_*.html"))
    assert credit and "soft Q of taken token" in credit[0].read_text()
    assert len((run / "history.jsonl").read_text().splitlines()) == 2
    # every action of every batch with what the environment made of it, matching the batch averages
    samples = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
    assert [s["batch"] for s in samples] == [1] * 8 + [2] * 8
    for batch, avg in zip((1, 2), summary["batch_avg_reward"]):
        rewards = [s["reward"] for s in samples if s["batch"] == batch]
        assert abs(sum(rewards) / len(rewards) - avg) < 1e-9
    assert all(isinstance(s["text"], str) and s["status"] for s in samples)
    from peft import PeftConfig

    assert PeftConfig.from_pretrained(str(run / "adapters" / "policy")).r == 4
    # the TensorBoard file carries the grouped keys
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run)).Reload()
    keys = set(acc.Tags()["scalars"])
    for key in ("losses/critic", "losses/policy", "charts/kl", "charts/entropy", "charts/q_taken",
                "charts/target_mean", "charts/avg_reward", "charts/best_reward", "charts/runnable_fraction",
                "charts/env_steps", "charts/sps"):
        assert key in keys, (key, sorted(keys))
    # a second run into the same directory without --ckpt_path refuses clearly
    again = _run_fit(tmp_path)
    assert again.returncode == 2 and "--ckpt_path last" in again.stderr


@pytest.mark.parametrize("bad, expected", [
    (["--model.init_args.no_such_key=1"], "no_such_key"),
    (["--data.num_envs=many"], "num_envs"),
    (["--data.env.init_args.target_chars=ab", "--data.env.class_path=envs.nowhere.Env"], "envs.nowhere.Env"),
])
def test_bad_config_stops_with_one_clear_line(tmp_path, capsys, bad, expected):
    from etpo.fit import main

    args = ["--config", str(REPO / "configs" / "toy.yaml"), "--run_dir", str(tmp_path / "run"), *bad]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("etpo.fit: error:")]
    assert len(errors) == 1 and expected in errors[0] and "Traceback" not in err, err


def test_resume_reaches_the_same_state_as_an_uninterrupted_run(tmp_path):
    full = _run_fit(tmp_path / "a", budget=32)
    assert full.returncode == 0, full.stderr[-3000:]
    part = _run_fit(tmp_path / "b", budget=16)
    assert part.returncode == 0, part.stderr[-3000:]
    resumed = _run_fit(tmp_path / "b", "--ckpt_path=last", budget=32)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = torch.load(tmp_path / "a" / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(tmp_path / "b" / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert a["global_step"] == b["global_step"] == 8  # a critic and a policy step per batch
    assert a["agent"]["policy_version"] == b["agent"]["policy_version"] == 4
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert any("target" in k for k in a["state_dict"])
    for k in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][k], b["state_dict"][k], rtol=0, atol=1e-6, msg=k)
    assert len(a["optimizer_states"]) == len(b["optimizer_states"]) == 2  # critic and policy
    for state_a, state_b in zip(a["optimizer_states"], b["optimizer_states"]):
        opt_a, opt_b = state_a["state"], state_b["state"]
        assert opt_a and opt_a.keys() == opt_b.keys()
        for k in opt_a:
            for name in ("exp_avg", "exp_avg_sq", "step"):
                torch.testing.assert_close(opt_a[k][name], opt_b[k][name], rtol=0, atol=1e-6)
    sa = json.loads((tmp_path / "a" / "run" / "summary.json").read_text())
    sb = json.loads((tmp_path / "b" / "run" / "summary.json").read_text())
    assert sa["env_steps"] == sb["env_steps"] == 32
    assert sa["best_reward"] == sb["best_reward"] and sa["batch_avg_reward"] == sb["batch_avg_reward"]


def _collect(relabels, flag=True, steps=4, envs=3, seed=0, module=None):
    from datamodules.rollout import RolloutCollector
    from envs.toy import TargetCharsEnv

    class Toy(TargetCharsEnv):  # with success_reward it ends on success and truncates at the step limit: an
        actions_relabel_to_first_state = flag  # action's reward, next observation and termination ignore the state

    class Policy(_Collect):
        relabels_actions = relabels

    module = module or _perturbed_module()
    torch.manual_seed(seed)
    collector = RolloutCollector(lambda: Toy(target_chars="ab", max_steps=3, prompt="q:", success_reward=1.0),
                                 num_envs=envs,
                                 steps_per_update=steps, budget=100, seed=seed,
                                 generation=GenerationConfig(max_new_tokens=4, temperature=1.0, top_k=0))
    batch = collector.collect(Policy(module))
    collector.close()
    return module, batch


def test_later_steps_are_handed_over_moved_to_their_episode_s_first_state():
    """With an environment that allows it and a learner that asks, every transition after an episode's first step
    comes back a second time as a transition from the episode's first observation: the same action, reward,
    termination and next state, the step limit's truncation undone; nothing is relabelled otherwise."""
    module, batch = _collect(relabels=True)
    moved = batch.relabelled
    later = [k for k in range(len(batch)) if int(batch.episode_step[k]) > 1]
    assert later and moved is not None and len(moved) == len(later)
    first_prompt = module.encode_prompts(["q:"])[0]

    def unpad(ids, mask, k):
        return ids[k][mask[k].bool()].tolist()

    next_of = {}  # a transition's next state, from its link or its own next prompt
    for j, k in enumerate(batch.next_needed.tolist()):
        next_of[k] = unpad(batch.next_prompt_ids, batch.next_prompt_mask, j)
    for k in range(len(batch)):
        if int(batch.next_index[k]) >= 0:
            next_of[k] = unpad(batch.prompt_ids, batch.prompt_mask, int(batch.next_index[k]))
    moved_next = {k: unpad(moved.next_prompt_ids, moved.next_prompt_mask, j)
                  for j, k in enumerate(moved.next_needed.tolist())}
    for j, k in enumerate(later):
        assert unpad(moved.prompt_ids, moved.prompt_mask, j) == list(first_prompt)
        assert unpad(moved.action_ids, moved.action_mask, j) == unpad(batch.action_ids, batch.action_mask, k)
        assert float(moved.rewards[j]) == float(batch.rewards[k])
        assert bool(moved.terminated[j]) == bool(batch.terminated[k]) and not bool(moved.truncated[j])
        assert int(moved.episode_step[j]) == 1 and int(moved.next_index[j]) == -1
        if not bool(moved.terminated[j]):  # the next state goes on, and is the step's own
            if k in next_of:
                assert moved_next[j] == next_of[k]
            else:  # truncated where it was taken: its next state was not needed there; here it is the prompt + action
                assert moved_next[j][:len(first_prompt)] == list(first_prompt) and bool(batch.truncated[k])
    assert bool(batch.truncated[later].any())  # the case the relabelling undoes is in the batch
    assert _collect(relabels=False)[1].relabelled is None
    assert _collect(relabels=True, flag=False)[1].relabelled is None


def test_etpo_learns_relabelled_actions_at_the_first_state_and_remembers_them_there():
    trees = dict(target_backup="optimal_tree", policy_target="optimal_tree", unwritten_value="zero")
    module = _perturbed_module(relabel_actions=True, answer_memory=8, **trees)
    assert module.relabels_actions
    _, batch = _collect(relabels=True, module=module)
    with module.without_trainer():
        charts = module.learn(batch)
    assert charts["charts/relabelled_actions"] == float(len(batch.relabelled)) > 0
    first = tuple(module.encode_prompts(["q:"])[0])
    stored = {tuple(t.action) for t in module.memory.prompts.get(first, [])}
    moved = {tuple(a[m.bool()].tolist()) for a, m in zip(batch.relabelled.action_ids, batch.relabelled.action_mask)}
    assert moved & stored  # answers written at later states are remembered under the first one
    with pytest.raises(ValueError, match="relabel_actions learns actions at states"):
        ETPOModule(backbone=tiny_backbone(), relabel_actions=True, td_lambda=1.0)
    assert not ETPOModule(backbone=tiny_backbone()).relabels_actions
