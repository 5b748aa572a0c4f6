"""PPO-KL math (docs/method.md, section 11), pure torch: the paper's RLHF-style, action-level baseline.

* per-action reward ``r'_t = r_t - beta_ppo * sum_j log(pi_theta(w_j|ctx) / pi_bar(w_j|ctx))`` (sampled KL of the
  whole action to the reference, with the log-probabilities of the sampling policy);
* a scalar value ``V(s_t)`` per state; GAE over *environment* steps (gamma 0.99, lambda 0.95);
* the advantage ``A_t`` is shared by every token of ``a_t`` (action-level credit);
* clipped surrogate on per-token ratios, and a value loss.
"""

from __future__ import annotations

import torch

__all__ = ["kl_penalised_rewards", "gae", "token_advantages", "clipped_surrogate", "value_loss"]


def kl_penalised_rewards(rewards: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                         mask: torch.Tensor, beta: float) -> torch.Tensor:
    """``r' = r - beta * sum_j (log pi_old(w_j) - log pi_bar(w_j))`` over the real tokens of each action."""
    sampled_kl = ((old_logprobs - ref_logprobs) * mask).sum(-1)
    return rewards - beta * sampled_kl


@torch.no_grad()
def gae(rewards: torch.Tensor, values: torch.Tensor, next_values: torch.Tensor, dones: torch.Tensor,
        next_index: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over environment steps for a batch of transitions.

    Transitions are linked by ``next_index[t]`` (the batch index of the same episode's next transition, or -1).
    ``next_values[t]`` is ``V(s_{t+1})`` (used when the next transition is not in the batch; zero where done).
    ``A_t = delta_t + gamma * lam * (1 - done_t) * A_{next(t)}``,
    ``delta_t = r_t + gamma * (1 - done_t) * V(s_{t+1}) - V(s_t)``. Returns ``(advantages, returns)``.
    """
    n = rewards.shape[0]
    advantages = torch.zeros_like(rewards)
    # successors always come later in the batch (collection order), so one backward sweep suffices
    for t in range(n - 1, -1, -1):
        nxt = int(next_index[t])
        not_done = 1.0 - float(dones[t])
        v_next = values[nxt] if nxt >= 0 else next_values[t]
        delta = rewards[t] + gamma * not_done * v_next - values[t]
        carry = advantages[nxt] if nxt >= 0 else 0.0
        advantages[t] = delta + gamma * lam * not_done * carry
    return advantages, advantages + values


def token_advantages(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Every token of an action gets its action's advantage (``[B] -> [B, L]``, zero on padding)."""
    return advantages[:, None] * mask


def clipped_surrogate(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                      mask: torch.Tensor, clip: float = 0.2, reduction: str = "mean") -> torch.Tensor:
    """PPO's clipped objective on per-token ratios, as a loss to minimise:
    ``-min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)`` averaged over real tokens (``advantages`` is ``[B, L]``)."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip, 1.0 + clip) * advantages
    per_token = -torch.minimum(unclipped, clipped) * mask
    if reduction == "sum":
        return per_token.sum()
    return per_token.sum() / mask.sum().clamp(min=1)


def value_loss(values: torch.Tensor, returns: torch.Tensor) -> torch.Tensor:
    """``0.5 * (V(s) - R)^2`` averaged over transitions."""
    return 0.5 * (values - returns).pow(2).mean()
