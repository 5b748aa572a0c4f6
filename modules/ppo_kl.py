"""PPO-KL as a LightningModule: the paper's action-level RLHF-style baseline (spec section 6), on the same shared
base model, rollout pipeline and charts as ETPO.

* the policy is the *policy* LoRA adapter; the value function ``V_psi(s_t)`` is a scalar linear head on the
  hidden state of the last prompt token under the *critic* adapter (no second copy of the model);
* when a rollout batch arrives: log-probabilities of the taken tokens under the sampling policy and the reference,
  the KL-penalised action rewards ``r' = r - beta_ppo * sum_j log(pi/pi_bar)``, values, GAE over environment steps;
* then ``ppo_epochs`` passes over shuffled minibatches; *each training step is one minibatch* (one optimizer
  step), so Lightning's automatic optimisation and every strategy work unchanged; a new rollout is pulled -- with
  the weights of that moment -- only when the minibatch queue is empty.
"""

from __future__ import annotations

from collections import deque
from typing import Iterator

import torch

from etpo.objectives import entropy, soft_value
from etpo.ppo import clipped_surrogate, gae, kl_penalised_rewards, token_advantages, value_loss
from modules.agent import AgentModule, adapter_parameters
from modules.shared_base import BackboneConfig

__all__ = ["PPOKLModule"]


class PPOKLModule(AgentModule):
    """Action-level PPO with a KL penalty to the reference.

    Args:
        backbone: the shared base model (policy adapter; critic adapter + value head for V).
        beta_ppo: KL penalty coefficient on the per-action reward.
        gamma, gae_lambda: discount and GAE lambda over environment steps (spec: 0.99, 0.95).
        clip: PPO ratio clip (spec: 0.2).
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
        self._queue: deque[dict] = deque()

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
        hp = self.hparams
        wrapped = self.trainer.model
        critic = adapter_parameters(wrapped, "critic") + [p for n, p in wrapped.named_parameters()
                                                          if "value_head" in n and p.requires_grad]
        groups = [
            {"params": adapter_parameters(wrapped, "policy"), "lr": hp.policy_lr, "name": "policy",
             "max_grad_norm": hp.policy_max_grad_norm},
            {"params": critic, "lr": hp.critic_lr, "name": "critic", "max_grad_norm": hp.critic_max_grad_norm},
        ]
        return torch.optim.AdamW(groups, weight_decay=hp.weight_decay)

    # ---- pieces ------------------------------------------------------------------------------------------------
    def state_values(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        """``V_psi(s)``: the value head on the critic view's hidden state at the last prompt token."""
        hidden = self.model.prompt_last_hidden("critic", prompt_ids, prompt_mask)
        return self.value_head(hidden.float()).squeeze(-1)

    def _taken_logprobs(self, hidden: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """log pi(w_j | ctx_j) of the taken tokens, evaluated chunk by chunk (no [B, L, V] tensor kept)."""
        return self.model.taken_logprobs(hidden, actions, max(1, self.hparams.token_chunk_size))

    @torch.no_grad()
    def prepare_rollout(self, batch: dict) -> dict:
        """Old and reference log-probs, KL-penalised rewards, values, GAE advantages and returns."""
        hp = self.hparams
        m = self.model
        args = (batch["prompt_ids"], batch["prompt_mask"], batch["action_ids"], batch["action_mask"])
        actions, mask = batch["action_ids"], batch["action_mask"].float()
        old_logprobs = self._taken_logprobs(m.action_hidden("policy", *args), actions)
        ref_logprobs = self._taken_logprobs(m.action_hidden("reference", *args), actions)
        rewards = kl_penalised_rewards(batch["rewards"].float(), old_logprobs, ref_logprobs, mask, hp.beta_ppo)
        values = self.state_values(batch["prompt_ids"], batch["prompt_mask"])
        next_values = torch.zeros_like(values)
        needed = batch["next_needed"]
        if needed.numel() > 0:
            next_values[needed] = self.state_values(batch["next_prompt_ids"], batch["next_prompt_mask"])
        advantages, returns = gae(rewards, values, next_values, batch["dones"].float(), batch["next_index"],
                                  hp.gamma, hp.gae_lambda)
        if hp.normalize_advantages and advantages.numel() > 1:
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        return {**batch, "old_logprobs": old_logprobs, "ref_logprobs": ref_logprobs, "advantages": advantages,
                "returns": returns, "penalised_rewards": rewards}

    def _minibatches(self, batch: dict) -> list[dict]:
        n = batch["rewards"].shape[0]
        size = min(self.hparams.minibatch_size, n)
        out = []
        for _ in range(self.hparams.ppo_epochs):
            order = torch.randperm(n, device=batch["rewards"].device)
            for s in range(0, n, size):
                idx = order[s:s + size]
                out.append({**self._select(batch, idx), "charts": False})
        out[0]["charts"] = True  # the KL/entropy charts need a reference forward: once per rollout is enough
        return out

    @staticmethod
    def _select(batch: dict, idx: torch.Tensor) -> dict:
        per_transition = ("prompt_ids", "prompt_mask", "action_ids", "action_mask", "old_logprobs", "advantages",
                          "returns", "rewards")
        mb = {k: batch[k][idx] for k in per_transition}
        # trim padding that the subset no longer needs (left-padded prompts, right-padded actions)
        keep_p = mb["prompt_mask"].sum(0) > 0
        mb["prompt_ids"], mb["prompt_mask"] = mb["prompt_ids"][:, keep_p], mb["prompt_mask"][:, keep_p]
        width = int(mb["action_mask"].sum(1).max())
        for k in ("action_ids", "action_mask", "old_logprobs"):
            mb[k] = mb[k][:, :width]
        return mb

    @torch.no_grad()
    def token_credit(self, batch: dict, max_examples: int | None = 4) -> dict:
        """Per-token credit as PPO-KL assigns it: every token of an action carries the action's GAE advantage
        (action-level credit), next to the per-token log-ratio to the reference that the KL penalty sums."""
        full = {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        prepared = self.prepare_rollout(full)
        sub, tokens = self._credit_subset(batch, max_examples)
        k = sub["rewards"].numel()
        mask = sub["action_mask"].float()
        # the rollout's own policy and reference log-probs (the subset keeps the batch's action width)
        log_ratio = (prepared["old_logprobs"][:k] - prepared["ref_logprobs"][:k]) * mask
        adv = token_advantages(prepared["advantages"][:k], mask)
        rows = lambda t: [[float(x) for x, keep in zip(r, mk) if keep] for r, mk in zip(t.cpu(), mask.cpu())]
        return {"tokens": tokens,
                "scores": {"advantage (shared by the action)": rows(adv), "log pi - log pi_bar": rows(log_ratio)},
                "rewards": [float(r) for r in sub["rewards"].cpu()]}

    # ---- the update --------------------------------------------------------------------------------------------
    def update_loss(self, mb: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """Clipped surrogate on per-token ratios with the action's advantage on every token, plus the value loss."""
        hp = self.hparams
        m = self.model
        args = (mb["prompt_ids"], mb["prompt_mask"], mb["action_ids"], mb["action_mask"])
        actions, mask = mb["action_ids"], mb["action_mask"].float()
        h_policy = m.action_hidden("policy", *args)
        logprobs = self._taken_logprobs(h_policy, actions)
        adv = token_advantages(mb["advantages"], mask)
        loss_policy = clipped_surrogate(logprobs, mb["old_logprobs"], adv, mask, hp.clip)
        values = self.state_values(mb["prompt_ids"], mb["prompt_mask"])
        loss_value = value_loss(values, mb["returns"])
        charts = {"losses/policy": float(loss_policy.detach()), "losses/critic": float(loss_value.detach()),
                  "charts/value_mean": float(values.detach().mean())}
        if not mb.get("charts", True):
            return loss_policy + hp.value_coef * loss_value, charts
        with torch.no_grad():
            n = mask.sum().clamp(min=1)
            kl_sum = ent_sum = 0.0
            h_ref = m.action_hidden("reference", *args)
            step = max(1, hp.token_chunk_size)
            for s in range(0, actions.shape[1], step):
                pi_logits = m.head(h_policy[:, s:s + step].detach())
                ref_logits = m.head(h_ref[:, s:s + step])
                _, kl = soft_value(torch.zeros_like(pi_logits), pi_logits, ref_logits, 0.0)
                kl_sum += float((kl * mask[:, s:s + step]).sum())
                ent_sum += float((entropy(pi_logits) * mask[:, s:s + step]).sum())
            ratio = torch.exp(logprobs - mb["old_logprobs"])
            clipfrac = float((((ratio - 1).abs() > hp.clip).float() * mask).sum() / n)
        charts.update({
            "charts/kl": kl_sum / float(n),
            "charts/entropy": ent_sum / float(n),
            "charts/clipfrac": clipfrac,
            "charts/action_tokens": float(n) / mask.shape[0],
        })
        return loss_policy + hp.value_coef * loss_value, charts

    def training_step(self, dataloader_iter: Iterator) -> torch.Tensor:
        if not self._queue:
            batch = self.next_batch(dataloader_iter)  # sampled now, with the current weights
            prepared = self.prepare_rollout(batch)
            self._queue.extend(self._minibatches(prepared))
            self._last_rollout = batch
        # the rollout charts of the batch being trained on, at every step (checkpointing monitors best_reward)
        self.log_rollout(self._last_rollout)
        mb = self._queue.popleft()
        loss, charts = self.update_loss(mb)
        size = int(mb["rewards"].numel())
        for key, value in charts.items():
            self.log(key, value, on_step=True, prog_bar=key.startswith("losses/"), batch_size=size)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        # stop only once the last rollout's minibatches are all used
        if not self._queue:
            super().on_train_batch_end(outputs, batch, batch_idx)
