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
from etpo.objectives import critic_loss, policy_loss, q_from_critic, token_targets, soft_value
from modules.etpo import ETPOModule


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


def _batch(module, multi_step=False, seed=0):
    from datamodules.rollout import RolloutCollector

    torch.manual_seed(seed)
    env = toy_env(max_steps=3) if multi_step else toy_env()
    collector = RolloutCollector(env, num_envs=4, steps_per_update=2 if multi_step else 1, budget=100, seed=seed,
                                 generation=GenerationConfig(max_new_tokens=6, temperature=1.0, top_k=0))
    batch = collector.collect(_Collect(module))
    collector.close()
    return batch


@pytest.mark.parametrize("q_parameterisation", ["logits", "zero"])
@pytest.mark.parametrize("multi_step", [False, True])
def test_chunked_update_gives_the_exact_gradient_of_the_objectives(q_parameterisation, multi_step):
    """The chunked, memory-lean update equals plain autograd through full [B, L, V] logits and the objectives."""
    torch.manual_seed(0)
    module = ETPOModule(backbone=tiny_backbone(), beta=0.05, gamma=0.9, q_parameterisation=q_parameterisation,
                        token_chunk_size=2)
    module.configure_model()
    m = module.model
    # give the adapters non-trivial weights so policy, critic, target and reference all differ
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_" in name:
                p.add_(0.3 * torch.randn_like(p))
        m.polyak_update(0.5)
    batch = _batch(module, multi_step=multi_step)
    if multi_step:
        assert (batch["next_index"] >= 0).any(), "the multi-step batch should link transitions"
    params = [p for p in m.parameters() if p.requires_grad]

    loss, charts = module.update_loss(batch)
    grads_chunked = torch.autograd.grad(loss, params, allow_unused=True)

    # reference: full logits, library objectives, plain autograd
    args = (batch["prompt_ids"], batch["prompt_mask"], batch["action_ids"], batch["action_mask"])
    mask = batch["action_mask"].float()
    with torch.no_grad():
        ref = m.action_logits("reference", *args)
        target_q = q_from_critic(m.action_logits("target", *args), ref, q_parameterisation)
        pi_now = m.action_logits("policy", *args)
        # next-state values straight from full forwards of the next prompts
        next_values = torch.zeros(len(batch["rewards"]))
        for k in range(len(batch["rewards"])):
            j = int(batch["next_index"][k])
            if j >= 0:
                next_values[k] = soft_value(target_q[j, 0], pi_now[j, 0], ref[j, 0], 0.05)[0]
        needed = batch["next_needed"]
        if needed.numel():
            ids, pm = batch["next_prompt_ids"], batch["next_prompt_mask"]
            r1 = m.first_token_logits("reference", ids, pm)
            t1 = q_from_critic(m.first_token_logits("target", ids, pm), r1, q_parameterisation)
            p1 = m.first_token_logits("policy", ids, pm)
            next_values[needed] = soft_value(t1, p1, r1, 0.05)[0]
        y = token_targets(target_q, pi_now, ref, mask, batch["rewards"], batch["dones"], next_values, 0.05, 0.9)
    q = q_from_critic(m.action_logits("critic", *args), ref, q_parameterisation)
    pi = m.action_logits("policy", *args)
    ref_loss = critic_loss(q, batch["action_ids"], y, mask) + policy_loss(pi, ref, q.detach(), mask, 0.05)
    grads_ref = torch.autograd.grad(ref_loss, params, allow_unused=True)

    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5, abs=1e-6)
    assert charts["losses/critic"] > 0 and charts["losses/policy"] >= 0
    for g1, g2 in zip(grads_chunked, grads_ref):
        if g2 is None:
            assert g1 is None or torch.all(g1 == 0)
            continue
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)


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
        def update_loss(self, batch):
            versions.append((batch["policy_version"], self.policy_version, self.global_step))
            # the update runs in train mode: that is what switches activation checkpointing on
            assert self.model.training and self.model.peft_model.training
            return super().update_loss(batch)

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
    credit = sorted((run / "credit").glob("step_*.html"))
    assert credit and "soft Q of taken token" in credit[0].read_text()
    assert len((run / "history.jsonl").read_text().splitlines()) == 2
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
    assert a["global_step"] == b["global_step"] == 4
    assert a["agent"]["policy_version"] == b["agent"]["policy_version"] == 4
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert any("target" in k for k in a["state_dict"])
    for k in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][k], b["state_dict"][k], rtol=0, atol=1e-6, msg=k)
    opt_a, opt_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert opt_a.keys() == opt_b.keys()
    for k in opt_a:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(opt_a[k][name], opt_b[k][name], rtol=0, atol=1e-6)
    sa = json.loads((tmp_path / "a" / "run" / "summary.json").read_text())
    sb = json.loads((tmp_path / "b" / "run" / "summary.json").read_text())
    assert sa["env_steps"] == sb["env_steps"] == 32
    assert sa["best_reward"] == sb["best_reward"] and sa["batch_avg_reward"] == sb["batch_avg_reward"]
