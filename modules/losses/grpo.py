"""GRPO math (docs/method.md, section 12), pure torch (no Lightning): group-relative advantages, token weights,
the exact KL to the reference and the per-minibatch loss of :class:`modules.grpo.GRPOModule`.

Group Relative Policy Optimisation (Shao et al. 2024, "DeepSeekMath", Eq. 3) drops PPO's critic: the ``G`` actions
sampled for one prompt ``q`` are scored against each other,

    A_i = (r_i - mean(r_1..r_G)) / (std(r_1..r_G) + eps)                    (the same A_i on every token of o_i)

and the policy minimises the clipped surrogate plus a KL penalty to the reference inside the loss (not in the
reward, as PPO-KL does):

    L = - agg_{i,t} [ min(rho_{i,t} A_i, clip(rho_{i,t}, 1 - eps_c, 1 + eps_c) A_i) - beta_kl KL_{i,t} ],
    rho_{i,t} = pi_theta(o_{i,t} | q, o_{i,<t}) / pi_old(o_{i,t} | q, o_{i,<t}).

Choices made here (each an option where the field disagrees):

* **std**: the unbiased sample std of the group (``n - 1``), as TRL and verl compute it, so advantages compare with
  theirs; ``scale=False`` keeps ``r - mean`` only (Dr. GRPO, Liu et al. 2025: dividing by the std up-weights
  prompts whose rewards barely differ).
* **singleton groups** (a prompt sampled once, e.g. every reflection prompt, which quotes the failed code) get
  advantage **0**: a group-relative advantage compares a sample with its siblings, and a lone sample has none --
  its own mean is its reward. Using the raw reward instead would mix in a baseline-free REINFORCE term on another
  scale. Such rows still feel the KL term. A group whose rewards are all equal also gets 0 (``0 / (0 + eps)``).
* **KL**: the *exact* ``KL(pi_theta(.|ctx) || pi_bar(.|ctx))`` summed over the vocabulary at every action token
  (:func:`reference_kl`), the project's rule for every per-token KL inside a training step. DeepSeekMath and TRL
  use the sampled ``k3`` estimator ``pi_bar/pi - log(pi_bar/pi) - 1`` of the taken token instead: unbiased, but
  with a variance the exact sum does not have, and the vocabulary is already in hand for the taken token's
  log-probability.
* **aggregation**: ``token_mean`` (default) weights every real token of the minibatch equally, as DAPO (Yu et al.
  2025) recommends (Dr. GRPO goes further: a constant divisor) and as PPO-KL and ETPO reduce their losses here;
  ``sequence_mean`` is DeepSeekMath's ``1/G sum_i 1/|o_i| sum_t``, under which a token of a long answer counts less
  than one of a short answer (for a negative advantage, long wrong answers are penalised less per token: the
  length bias Dr. GRPO reports).
"""

from __future__ import annotations

import torch
from torch import Tensor

from modules.losses.etpo import soft_value
from modules.losses.ppo import clipped_surrogate

__all__ = ["AGGREGATIONS", "group_advantages", "token_weights", "reference_kl", "grpo_loss"]

#: how per-token terms are averaged into one loss (see the module docstring)
AGGREGATIONS = ("token_mean", "sequence_mean")


@torch.no_grad()
def group_advantages(rewards: Tensor, groups: Tensor, scale: bool = True, eps: float = 1e-4) -> Tensor:
    """``A_i = (r_i - mean_g r) / (std_g r + eps)`` over the rows of each group ``g`` (``scale=False``: ``r_i -
    mean_g r``), DeepSeekMath Eq. 3's outcome supervision.

    ``rewards [B]`` float, ``groups [B]`` long: rows with the same id are samples of one prompt (any ids, e.g.
    :meth:`datamodules.batch.RolloutBatch.prompt_groups`). ``std`` is the unbiased sample std; a group of one row
    gets ``0`` (no sibling to compare with). Returns ``[B]`` in the dtype of ``rewards``; never carries gradient."""
    if rewards.dim() != 1 or groups.shape != rewards.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and groups {tuple(groups.shape)} must be one-dimensional "
                         "and of the same length")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    _, index = torch.unique(groups, return_inverse=True)  # dense ids 0..G-1
    n_groups = int(index.max()) + 1 if index.numel() else 0
    count = torch.zeros(n_groups, dtype=rewards.dtype, device=rewards.device).index_add_(
        0, index, torch.ones_like(rewards))
    mean = torch.zeros_like(count).index_add_(0, index, rewards) / count
    centred = rewards - mean[index]
    if not scale:
        return centred
    squares = torch.zeros_like(count).index_add_(0, index, centred * centred)
    std = (squares / (count - 1).clamp(min=1)).sqrt()  # a singleton's std is 0 (its centred reward is 0 too)
    return centred / (std[index] + eps)


def token_weights(mask: Tensor, aggregation: str = "token_mean") -> Tensor:
    """Weights ``w [B, L]`` such that ``sum(w * x)`` is the chosen average of per-token terms ``x`` over the real
    tokens of ``mask [B, L]``: ``token_mean`` ``w = mask / sum(mask)``; ``sequence_mean`` ``w_{i,t} = mask_{i,t} /
    (B |o_i|)`` (the mean over rows of each row's token mean). Weights over a whole minibatch, so chunks of its
    tokens can be summed separately. float32 (float64 for a float64 mask)."""
    mask = mask.double() if mask.dtype == torch.float64 else mask.float()
    if aggregation == "token_mean":
        return mask / mask.sum().clamp(min=1)
    if aggregation == "sequence_mean":
        return mask / (mask.sum(-1, keepdim=True).clamp(min=1) * mask.shape[0])
    raise ValueError(f"unknown loss aggregation {aggregation!r}; choose one of {AGGREGATIONS}")


def reference_kl(pi_logits: Tensor, ref_logits: Tensor) -> Tensor:
    """The exact ``KL(pi(.|ctx) || pi_bar(.|ctx)) = sum_w pi(w) (log pi(w) - log pi_bar(w))`` over the last
    (vocabulary) dimension (:func:`modules.losses.etpo.soft_value`'s KL: the project's one formula). Differentiable
    w.r.t. ``pi_logits``; ``[..., V] -> [...]`` float32 (or float64)."""
    _, kl = soft_value(pi_logits.new_zeros(()), pi_logits, ref_logits.detach(), 0.0)
    return kl


def grpo_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, kl: Tensor, weights: Tensor,
              clip: float = 0.2, beta_kl: float = 0.04) -> Tensor:
    """GRPO's loss over (a chunk of) a minibatch's tokens (module docstring; DeepSeekMath Eq. 3):
    ``sum_{i,t} w_{i,t} [-min(rho A, clip(rho) A) + beta_kl KL]`` with ``rho = exp(logprobs - old_logprobs)``.

    ``logprobs``, ``old_logprobs``: ``log pi`` of the taken tokens now and at sampling time ``[B, L]``;
    ``advantages [B, L]`` (the action's advantage on each of its tokens,
    :func:`modules.losses.ppo.token_advantages`); ``kl [B, L]`` per-token KLs (:func:`reference_kl`);
    ``weights [B, L]`` from :func:`token_weights` (zero on padding). The clipped term is
    :func:`modules.losses.ppo.clipped_surrogate` summed with ``weights`` as its mask."""
    surrogate = clipped_surrogate(logprobs, old_logprobs.detach(), advantages.detach(), weights, clip,
                                  reduction="sum")
    return surrogate + beta_kl * (kl * weights).sum()
