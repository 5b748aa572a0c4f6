"""PPO-KL as a LightningModule: the paper's action-level RLHF-style baseline (docs/method.md, "PPO-KL"), on the
same shared base model, rollout pipeline and charts as ETPO.

* the policy is the *policy* LoRA adapter; the value function ``V_psi(s_t)`` is a scalar linear head on the
  hidden state of the last prompt token under the *critic* adapter (no second copy of the model);
* when a rollout batch arrives: log-probabilities of the taken tokens under the sampling policy and the reference,
  the KL-penalised action rewards ``r' = r - beta_ppo * sum_j log(pi/pi_bar)``, values, GAE over environment steps;
* then ``ppo_epochs`` passes over shuffled minibatches, one optimizer step each.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch

from datamodules.batch import RolloutBatch
from modules.agent import AgentModule, TokenCredit
from modules.losses.etpo import entropy, soft_value
from modules.losses.ppo import clipped_surrogate, gae, kl_penalised_rewards, token_advantages, value_loss
from modules.shared_base import BackboneConfig, adapter_parameters

__all__ = ["PPOKLModule"]


class PPOKLModule(AgentModule):
    """Action-level PPO with a KL penalty to the reference.

    Args:
        backbone: the shared base model (policy adapter; critic adapter + value head for V).
        beta_ppo: KL penalty coefficient on the per-action reward.
        gamma, gae_lambda: discount and GAE lambda over environment steps (the paper: 0.99, 0.95).
        clip: PPO ratio clip (the paper: 0.2).
        ppo_epochs: passes over each rollout batch (reference implementation: 5).
        minibatch_size: transitions per optimizer step.
        value_coef: weight of the value loss.
        policy_lr, critic_lr, weight_decay, policy_max_grad_norm, critic_max_grad_norm: as in ETPO.
        normalize_advantages: standardise advantages over the rollout batch.
        token_chunk_size: action tokens per chunk when evaluating vocabulary-sized tensors.
    """

    contender = "ppo_kl"

    def __init__(
        self,
        backbone: BackboneConfig | None = None,
        beta_ppo: float = 0.1,
        gamma: float = 0.99,
        gae_lambda: float = 0.95,
        clip: float = 0.2,
        ppo_epochs: int = 5,
        minibatch_size: int = 8,
        value_coef: float = 0.5,
        policy_lr: float = 1e-4,
        critic_lr: float = 1e-4,
        weight_decay: float = 0.0,
        policy_max_grad_norm: float = 10.0,
        critic_max_grad_norm: float = 10.0,
        normalize_advantages: bool = True,
        token_chunk_size: int = 64,
    ):
        super().__init__(backbone)
        if ppo_epochs < 1 or minibatch_size < 1:
            raise ValueError("ppo_epochs and minibatch_size must be positive")
        self.save_hyperparameters(ignore=["backbone"])
        self.value_head: torch.nn.Linear | None = None

    def configure_model(self) -> None:
        super().configure_model()
        if self.value_head is None:
            hidden = self.model.hidden_size
            # skip_init: the default initialisation would draw from the global generator that rollout sampling
            # uses, so PPO-KL's first batch would differ from ETPO's and Reflection's under the same seed.
            self.value_head = torch.nn.utils.skip_init(torch.nn.Linear, hidden, 1, device=self.model.device,
                                                       dtype=torch.float32)
            torch.nn.init.zeros_(self.value_head.weight)
            torch.nn.init.zeros_(self.value_head.bias)

    def configure_optimizers(self):
        # one optimizer, two parameter groups: PPO's policy and value losses are summed into one loss per minibatch
        hp = self.hparams
        wrapped = self.root_model()
        critic = [p for _, p in adapter_parameters(wrapped, "critic", trainable_only=True)]
        critic += [p for n, p in wrapped.named_parameters() if "value_head" in n and p.requires_grad]
        groups = [
            {"params": [p for _, p in adapter_parameters(wrapped, "policy", trainable_only=True)], "lr": hp.policy_lr,
             "name": "policy", "max_grad_norm": hp.policy_max_grad_norm},
            {"params": critic, "lr": hp.critic_lr, "name": "critic", "max_grad_norm": hp.critic_max_grad_norm},
        ]
        return torch.optim.AdamW(groups, weight_decay=hp.weight_decay)

    # ---- pieces ------------------------------------------------------------------------------------------------
    def state_values(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                     extra_ids: Optional[torch.Tensor] = None, extra_mask: Optional[torch.Tensor] = None):
        """``V_psi(s)``: the value head on the critic view's hidden state at the last prompt token, for the prompts
        and (optionally) extra prompts, scored in one forward with shared prefixes once."""
        m = self.model
        dummy = torch.zeros((prompt_ids.shape[0], 1), dtype=torch.long, device=prompt_ids.device)
        plan = m.plan(prompt_ids, prompt_mask, dummy, torch.ones_like(dummy), extra_ids, extra_mask)
        hidden, extra = m.plan_hidden("critic", plan)
        values = self.value_head(hidden[:, 0].float()).squeeze(-1)
        extra_values = self.value_head(extra.float()).squeeze(-1) if extra is not None else None
        return values, extra_values

    def taken_logprobs(self, view: str, batch: RolloutBatch) -> torch.Tensor:
        """``log pi(w_j | ctx_j)`` of the taken tokens under ``view`` (chunked head; no [B, L, V] tensor kept)."""
        m = self.model
        plan = m.plan(batch.prompt_ids, batch.prompt_mask, batch.action_ids, batch.action_mask)
        hidden, _ = m.plan_hidden(view, plan)
        return m.taken_logprobs(hidden, batch.action_ids, self.hparams.token_chunk_size)

    @torch.no_grad()
    def prepare_rollout(self, batch: RolloutBatch) -> dict:
        """Old and reference log-probs, KL-penalised rewards, values, GAE advantages and returns."""
        hp = self.hparams
        mask = batch.action_mask.float()
        old_logprobs = self.taken_logprobs("policy", batch) * mask
        ref_logprobs = self.taken_logprobs("reference", batch) * mask
        rewards = kl_penalised_rewards(batch.rewards.float(), old_logprobs, ref_logprobs, mask, hp.beta_ppo)
        values, extra = self.state_values(batch.prompt_ids, batch.prompt_mask, batch.next_prompt_ids,
                                          batch.next_prompt_mask)
        next_values = torch.zeros_like(values)
        if extra is not None:
            next_values[batch.next_needed] = extra
        advantages, returns = gae(rewards, values, next_values, batch.dones, batch.next_index, hp.gamma,
                                  hp.gae_lambda)
        if hp.normalize_advantages and advantages.numel() > 1:
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        return {"old_logprobs": old_logprobs, "ref_logprobs": ref_logprobs, "advantages": advantages,
                "returns": returns, "penalised_rewards": rewards}

    # ---- the update --------------------------------------------------------------------------------------------
    def learn(self, batch: RolloutBatch) -> Mapping[str, float]:
        hp = self.hparams
        prepared = self.run_forward(self.prepare_rollout, batch)
        optimizer = next(iter(self.optimizers_by_name().values()))
        n = len(batch)
        size = min(hp.minibatch_size, n)
        charts: dict[str, float] = {}
        first = True
        for _ in range(hp.ppo_epochs):
            order = torch.randperm(n, device=batch.device)
            for s in range(0, n, size):
                rows = order[s:s + size]
                step = self.optimizer_step_on(optimizer, self.minibatch_loss, batch.rows(rows),
                                              {k: v[rows] for k, v in prepared.items()}, first)
                charts.update(step)
                first = False  # the KL / entropy charts need a reference forward: once per rollout is enough
        return charts

    def minibatch_loss(self, mb: RolloutBatch, prepared: dict, with_charts: bool) -> tuple[torch.Tensor, dict]:
        """Clipped surrogate on per-token ratios with the action's advantage on every token, plus the value loss."""
        hp, m = self.hparams, self.model
        mask = mb.action_mask.float()
        width = mask.shape[1]
        old_logprobs = prepared["old_logprobs"][:, :width]
        plan = m.plan(mb.prompt_ids, mb.prompt_mask, mb.action_ids, mb.action_mask)
        h_policy, _ = m.plan_hidden("policy", plan)
        logprobs = m.taken_logprobs(h_policy, mb.action_ids, hp.token_chunk_size)
        adv = token_advantages(prepared["advantages"], mask)
        loss_policy = clipped_surrogate(logprobs, old_logprobs, adv, mask, hp.clip)
        values, _ = self.state_values(mb.prompt_ids, mb.prompt_mask)
        loss_value = value_loss(values, prepared["returns"])
        charts = {"losses/policy": float(loss_policy.detach()), "losses/critic": float(loss_value.detach()),
                  "charts/value_mean": float(values.detach().mean())}
        if with_charts:
            with torch.no_grad():
                n = mask.sum().clamp(min=1)
                h_ref, _ = m.plan_hidden("reference", plan)
                kl_sum = ent_sum = 0.0
                for sl, pi_logits in m.head_chunks(h_policy.detach(), hp.token_chunk_size):
                    ref_logits = m.head(h_ref[:, sl])
                    _, kl = soft_value(torch.zeros_like(pi_logits), pi_logits, ref_logits, 0.0)
                    kl_sum += float((kl * mask[:, sl]).sum())
                    ent_sum += float((entropy(pi_logits) * mask[:, sl]).sum())
                ratio = torch.exp(logprobs - old_logprobs)
                clipfrac = float((((ratio - 1).abs() > hp.clip).float() * mask).sum() / n)
            charts.update({"charts/kl": kl_sum / float(n), "charts/entropy": ent_sum / float(n),
                           "charts/clipfrac": clipfrac, "charts/action_tokens": float(n) / mask.shape[0]})
        return loss_policy + hp.value_coef * loss_value, charts

    # ---- token-level credit ------------------------------------------------------------------------------------
    @torch.no_grad()
    def token_credit(self, batch: RolloutBatch, max_examples: Optional[int] = 4) -> TokenCredit:
        """Per-token credit as PPO-KL assigns it: every token of an action carries the action's GAE advantage
        (action-level credit), next to the per-token log-ratio to the reference that the KL penalty sums."""
        prepared = self.prepare_rollout(batch.to(self.device))
        sub, tokens = self.credit_rows(batch, max_examples)
        k = len(sub)
        mask = sub.action_mask.float()
        width = mask.shape[1]
        # the rollout's own policy and reference log-probs (the subset keeps the batch's action width or less)
        log_ratio = (prepared["old_logprobs"][:k, :width] - prepared["ref_logprobs"][:k, :width]) * mask
        adv = token_advantages(prepared["advantages"][:k], mask)
        return TokenCredit(tokens=tokens,
                           scores={"advantage (shared by the action)": self.per_token_lists(adv, mask),
                                   "log pi - log pi_bar": self.per_token_lists(log_ratio, mask)},
                           rewards=[float(r) for r in sub.rewards.cpu()])
