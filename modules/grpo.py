"""GRPO as a LightningModule: the critic-free, group-relative baseline (DeepSeekMath's GRPO, as in TRL and verl), on
the same shared base model, rollout pipeline and charts as ETPO -- and the worked example of ``docs/extending.md``:
it is written against the module contract of :mod:`modules.agent` only (``learn``, ``optimizer_step_on``,
``token_credit``), the model layer and the pure losses of :mod:`modules.losses.grpo`.

:meth:`GRPOModule.learn`, top to bottom, for one fresh on-policy rollout batch:

1. **prepare** (no gradient): group the transitions by prompt (:meth:`~datamodules.batch.RolloutBatch.prompt_groups`:
   token-identical states share a group), the group-relative advantage of every transition from its own reward
   (:func:`modules.losses.grpo.group_advantages`), the log-probabilities of the taken tokens under the sampling
   weights (``pi_old``) and the reference's hidden states (the exact KL's ``pi_bar``, computed once per batch);
2. **update**: ``epochs`` passes over shuffled minibatches of ``minibatch_size`` transitions, one policy optimizer
   step each (:meth:`~modules.agent.AgentModule.optimizer_step_on`) on the clipped surrogate with the action's
   advantage on every token plus ``beta_kl`` times the exact per-token ``KL(pi_theta || pi_bar)``
   (:func:`modules.losses.grpo.grpo_loss`).

No critic: only the *policy* adapter is trained. The shared base model still carries the critic and target adapters
(every contender loads the same model layer); GRPO never runs them, gives them no optimizer, and they stay at their
initial values (they cost ``2 * r * (d_in + d_out)`` parameters per adapted layer and appear in checkpoints).

Episodes with several steps: GRPO is a bandit method -- it has no value function to carry reward across environment
steps, and a rollout batch may cut an episode anywhere, so a return-to-go would be truncated at the batch boundary
with nothing to bootstrap from. Every transition is therefore a one-step problem ``(s_t, a_t, r_t)`` and is grouped
with the other actions sampled for the *same state*: in the data-science env the first attempts of the parallel
environments share the task prompt and form a group; a reflection prompt quotes the failed code and its error, is
unique, forms a singleton group and gets advantage 0 (it is trained by the KL term only; ``charts/grouped_fraction``
shows how much of a batch carries a reward signal). The credit across attempts that ETPO's and PPO-KL's critics give
is exactly what GRPO does without.

The old log-probabilities are those of ``pi_theta`` at sampling time, without the sampler's temperature / top-k
(as PPO-KL's): the ratio is PPO's trust region on the policy's own probabilities. With one epoch of one minibatch the
ratio is identically 1 and the forward that computes them is skipped (``pi_old`` = the detached current values).

Memory engineering stays out of the way: shared prompt prefixes are computed once
(:meth:`~modules.shared_base.SharedBaseLM.plan`), vocabulary-sized tensors exist one chunk of tokens at a time, and
each chunk's loss is reduced at once to its gradient w.r.t. the chunk's hidden states (``sum(h * dL/dh)``: the
exact gradient, one backward through the transformer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping, Optional

import torch
from lightning.pytorch.cli import LRSchedulerCallable

from datamodules.batch import RolloutBatch
from modules.agent import AgentModule, TokenCredit
from modules.losses.etpo import entropy
from modules.losses.grpo import AGGREGATIONS, group_advantages, grpo_loss, reference_kl, token_weights
from modules.losses.ppo import token_advantages
from modules.shared_base import BackboneConfig, adapter_parameters
from modules.shared_base.scoring import token_chunks

__all__ = ["GRPOModule"]


@dataclass
class _Prepared:
    """Step 1's results for the whole batch (row ``b`` = transition ``b``)."""

    advantages: torch.Tensor  # [B] group-relative advantage of each transition
    ref_hidden: torch.Tensor  # [B, L, H] reference hidden states, action-aligned
    old_logprobs: Optional[torch.Tensor]  # [B, L] log pi_old of the taken tokens; None: the ratio is 1
    charts: dict

    def rows(self, index: torch.Tensor, width: int) -> "_Prepared":
        old = None if self.old_logprobs is None else self.old_logprobs[index, :width]
        return _Prepared(self.advantages[index], self.ref_hidden[index, :width], old, {})


class GRPOModule(AgentModule):
    """Group Relative Policy Optimisation: clipped ratio, group-relative advantages, exact KL to the reference.

    Args:
        backbone: the shared base model (only the policy adapter is trained; the critic adapter stays unused).
        beta_kl: weight of the per-token ``KL(pi_theta || pi_bar)`` in the loss (DeepSeekMath: 0.04).
        clip: PPO ratio clip ``eps`` (DeepSeekMath: 0.2).
        epochs: passes over each rollout batch (DeepSeekMath and TRL's default: 1).
        minibatch_size: transitions per optimizer step.
        scale_rewards: divide ``r - mean`` by the group's std (GRPO); False keeps ``r - mean`` (Dr. GRPO).
        std_eps: added to the group std before dividing (TRL: 1e-4).
        loss_aggregation: ``token_mean`` (every real token of a minibatch weighs the same; default) or
            ``sequence_mean`` (DeepSeekMath's mean over actions of each action's token mean).
            See :mod:`modules.losses.grpo`.
        policy_lr, weight_decay: AdamW settings of the policy adapter.
        policy_max_grad_norm: gradient-norm clip of the policy group (as ETPO's and PPO-KL's: 10).
        policy_lr_scheduler: optional scheduler (``class_path`` + ``init_args`` in YAML), stepped after every
            optimizer step.
        token_chunk_size: action tokens per chunk when evaluating vocabulary-sized tensors.
    """

    contender = "grpo"

    def __init__(
        self,
        backbone: BackboneConfig | None = None,
        beta_kl: float = 0.04,
        clip: float = 0.2,
        epochs: int = 1,
        minibatch_size: int = 8,
        scale_rewards: bool = True,
        std_eps: float = 1e-4,
        loss_aggregation: Literal["token_mean", "sequence_mean"] = "token_mean",
        policy_lr: float = 1e-4,
        weight_decay: float = 0.0,
        policy_max_grad_norm: float = 10.0,
        policy_lr_scheduler: Optional[LRSchedulerCallable] = None,
        token_chunk_size: int = 64,
    ):
        super().__init__(backbone)
        if epochs < 1 or minibatch_size < 1 or token_chunk_size < 1:
            raise ValueError("epochs, minibatch_size and token_chunk_size must be positive")
        if clip <= 0 or beta_kl < 0 or std_eps < 0:
            raise ValueError(f"need clip > 0, beta_kl >= 0 and std_eps >= 0; got clip={clip}, beta_kl={beta_kl}, "
                             f"std_eps={std_eps}")
        if loss_aggregation not in AGGREGATIONS:
            raise ValueError(f"loss_aggregation must be one of {AGGREGATIONS}, got {loss_aggregation!r}")
        self.save_hyperparameters(ignore=["backbone", "policy_lr_scheduler"])
        self.policy_lr_scheduler = policy_lr_scheduler

    # ---- optimisation ------------------------------------------------------------------------------------------
    def configure_optimizers(self):
        # From the strategy's model, so that sharded (FSDP) parameters are the ones being stepped.
        hp = self.hparams
        params = [p for _, p in adapter_parameters(self.trainer.model, "policy", trainable_only=True)]
        if not params:
            raise RuntimeError("no trainable parameters found for the policy adapter")
        optimizer = torch.optim.AdamW([{"params": params, "name": "policy", "max_grad_norm": hp.policy_max_grad_norm}],
                                      lr=hp.policy_lr, weight_decay=hp.weight_decay)
        if self.policy_lr_scheduler is None:
            return optimizer
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": self.policy_lr_scheduler(optimizer), "interval": "step"}}

    # ---- the update --------------------------------------------------------------------------------------------
    def advantages(self, batch: RolloutBatch) -> torch.Tensor:
        """``[B]``: each transition's reward against the other actions sampled for the same prompt."""
        hp = self.hparams
        return group_advantages(batch.rewards.float(), batch.prompt_groups(), hp.scale_rewards, hp.std_eps)

    def learn(self, batch: RolloutBatch) -> Mapping[str, float]:
        hp = self.hparams
        n = len(batch)
        size = min(hp.minibatch_size, n)
        ratio_is_one = hp.epochs == 1 and size == n  # one step on the sampling weights
        prepared = self.run_forward(self.prepare, batch, not ratio_is_one)  # 1.
        optimizer = self.optimizers()
        sums: dict[str, float] = {}
        steps = 0
        for _ in range(hp.epochs):  # 2.
            order = torch.randperm(n, device=batch.device)
            for start in range(0, n, size):
                rows = order[start:start + size]
                mb = batch.rows(rows)
                step = self.optimizer_step_on(optimizer, self.minibatch_loss, mb,
                                              prepared.rows(rows, mb.action_mask.shape[1]))
                for key, value in step.items():
                    sums[key] = sums.get(key, 0.0) + float(value)
                steps += 1
        # the charts of a batch: averages over its optimizer steps, next to step 1's group statistics
        return {**prepared.charts, **{key: value / steps for key, value in sums.items()}}

    @torch.no_grad()
    def prepare(self, batch: RolloutBatch, with_old_logprobs: bool = True) -> _Prepared:
        """Step 1: group advantages, the reference's hidden states and (unless the ratio is 1) ``log pi_old``."""
        m = self.model
        groups = batch.prompt_groups()
        advantages = self.advantages(batch)
        plan = m.plan(batch.prompt_ids, batch.prompt_mask, batch.action_ids, batch.action_mask)
        h_ref, _ = m.plan_hidden("reference", plan)
        old = None
        if with_old_logprobs:
            h_policy, _ = m.plan_hidden("policy", plan)
            old = m.taken_logprobs(h_policy, batch.action_ids, self.hparams.token_chunk_size)
            old = old * batch.action_mask.float()
        sizes = torch.bincount(groups)[groups]
        charts = {"charts/groups": float(groups.max()) + 1.0,
                  "charts/grouped_fraction": float((sizes > 1).float().mean()),
                  "charts/advantage_abs_mean": float(advantages.abs().mean())}
        return _Prepared(advantages=advantages, ref_hidden=h_ref.detach(), old_logprobs=old, charts=charts)

    def minibatch_loss(self, mb: RolloutBatch, prepared: _Prepared) -> tuple[torch.Tensor, dict]:
        """Step 2's loss on one minibatch (:func:`modules.losses.grpo.grpo_loss`), chunk by chunk over the action
        tokens; returns a surrogate whose value is the loss and whose gradient is the loss's."""
        hp, m = self.hparams, self.model
        mask = mb.action_mask.float()
        advantages = token_advantages(prepared.advantages, mask)
        weights = token_weights(mask, hp.loss_aggregation)
        plan = m.plan(mb.prompt_ids, mb.prompt_mask, mb.action_ids, mb.action_mask)
        h_policy, _ = m.plan_hidden("policy", plan)
        stats = {"kl": 0.0, "entropy": 0.0, "clipped": 0.0}

        def chunk_loss(sl: slice, logits: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                ref_logits = m.head(prepared.ref_hidden[:, sl])
            logprobs = torch.log_softmax(logits, -1).gather(-1, mb.action_ids[:, sl, None]).squeeze(-1)
            old = logprobs.detach() if prepared.old_logprobs is None else prepared.old_logprobs[:, sl]
            kl = reference_kl(logits, ref_logits)
            with torch.no_grad():
                real = mask[:, sl]
                stats["kl"] += float((kl * real).sum())
                stats["entropy"] += float((entropy(logits.detach()) * real).sum())
                stats["clipped"] += float((((logprobs - old).exp() - 1).abs() > hp.clip).float().mul(real).sum())
            return grpo_loss(logprobs, old, advantages[:, sl], kl, weights[:, sl], hp.clip, hp.beta_kl)

        loss = m.chunked_head_loss(h_policy, chunk_loss, hp.token_chunk_size)
        n = float(mask.sum().clamp(min=1))
        charts = {"losses/policy": float(loss.detach()), "charts/kl": stats["kl"] / n,
                  "charts/entropy": stats["entropy"] / n, "charts/clipfrac": stats["clipped"] / n,
                  "charts/action_tokens": n / mask.shape[0]}
        return loss, charts

    # ---- token-level credit ------------------------------------------------------------------------------------
    @torch.no_grad()
    def token_credit(self, batch: RolloutBatch, max_examples: Optional[int] = 4) -> TokenCredit:
        """Per-token credit as GRPO assigns it: every token of an action carries its group-relative advantage (the
        groups are formed over the whole batch), next to the per-token log-ratio ``log pi - log pi_bar`` of the
        taken token and the exact ``KL(pi || pi_bar)`` the loss penalises at that token."""
        m = self.model
        advantages = self.advantages(batch.to(self.device))
        sub, tokens = self.credit_rows(batch, max_examples)
        mask = sub.action_mask.float()
        plan = m.plan(sub.prompt_ids, sub.prompt_mask, sub.action_ids, sub.action_mask)
        h_policy, _ = m.plan_hidden("policy", plan)
        h_ref, _ = m.plan_hidden("reference", plan)
        log_ratio = torch.zeros_like(mask)
        kl = torch.zeros_like(mask)
        for sl in token_chunks(mask.shape[1], self.hparams.token_chunk_size):
            pi_logits, ref_logits = m.head(h_policy[:, sl]), m.head(h_ref[:, sl])
            taken = sub.action_ids[:, sl, None]
            log_ratio[:, sl] = (torch.log_softmax(pi_logits, -1).gather(-1, taken)
                                - torch.log_softmax(ref_logits, -1).gather(-1, taken)).squeeze(-1)
            kl[:, sl] = reference_kl(pi_logits, ref_logits)
        rows = lambda x: self.per_token_lists(x, mask)  # noqa: E731
        return TokenCredit(tokens=tokens,
                           scores={"group advantage (shared by the action)":
                                   rows(token_advantages(advantages[:len(sub)], mask)),
                                   "log pi - log pi_bar": rows(log_ratio),
                                   "KL(pi || pi_bar) at the token": rows(kl)},
                           rewards=[float(r) for r in sub.rewards.cpu()])
