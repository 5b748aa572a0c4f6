"""ETPO objectives: exact per-token soft values, Bellman targets and losses (pure torch, no Lightning).

Notation follows docs/method.md (the paper's equation numbers):

* every ``*_logits`` tensor is ``[B, L, V]`` and *aligned to the action*: row ``j`` is the distribution over the
  choice of action token ``j`` given the prompt and the action tokens before it (any leading shape works for the
  vocabulary reductions, e.g. ``[B, V]`` for the first token of a bare prompt);
* ``mask`` is ``[B, L]`` with 1 on real action tokens. Actions are right-padded, so the real tokens of row ``b``
  are ``0 .. n_b - 1`` and the last real token is ``n_b - 1``;
* ``q_logits`` are soft Q-values for every next token, used as given (they are Q, not log-probabilities).
  How Q is read from the critic network (the paper's ``logits`` form or the ``zero`` form) is decided by the
  caller; see :func:`q_from_critic`.

All vocabulary sums are exact (no sampling), which is what makes the per-token decomposition consistent with the
action-level soft Bellman equation (Appendix A).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Hashable, Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "q_from_critic",
    "soft_value",
    "optimal_policy_logits",
    "optimal_value",
    "targets_from_values",
    "trace_targets",
    "tree_targets",
    "tree_backup",
    "TreeBackup",
    "branch_q",
    "trace_coefficients",
    "behaviour_log_probs",
    "token_targets",
    "soft_q_regression",
    "critic_loss",
    "policy_loss",
    "entropy",
    "masked_mean",
]

Q_PARAMETERISATIONS = ("logits", "zero")


def q_from_critic(critic_logits: torch.Tensor, ref_logits: torch.Tensor, parameterisation: str = "logits") -> torch.Tensor:
    """Read soft Q-values from the critic network's vocabulary-sized output.

    ``logits`` (the paper, default): ``Q = critic logits``; the critic starts as the reference model, so at
    initialisation Q equals the reference logits and the optimal soft policy ``pi_bar * exp(Q / beta)`` is a strong
    sharpening of the reference. ``zero``: ``Q = critic logits - reference logits``, identically zero at
    initialisation, so the optimal soft policy starts equal to the reference and the soft values start at 0: on
    the scale of the reward (docs/method.md, "Q parameterisation").
    """
    if parameterisation == "logits":
        return critic_logits
    if parameterisation == "zero":
        return critic_logits - ref_logits
    raise ValueError(f"unknown Q parameterisation {parameterisation!r}; choose one of {Q_PARAMETERISATIONS}")


def _upcast(x: torch.Tensor) -> torch.Tensor:
    # Vocabulary sums are accumulated in float32 at least: bf16 sums over 32k-50k entries lose digits.
    # float64 inputs (the exact-enumeration tests) keep their precision.
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(_upcast(logits), dim=-1)


def soft_value(
    q_logits: torch.Tensor, pi_logits: torch.Tensor, ref_logits: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact soft value of a context and its KL to the reference (docs/method.md, section 3).

    ``KL(ctx) = sum_w pi(w|ctx) (log pi(w|ctx) - log pi_bar(w|ctx))`` and
    ``V(ctx) = sum_w pi(w|ctx) Q(ctx, w) - beta * KL(ctx)``, with ``pi = softmax(pi_logits)`` and
    ``pi_bar = softmax(ref_logits)``. Reduces the last (vocabulary) dimension; returns ``(value, kl)``.
    """
    log_pi = _log_probs(pi_logits)
    log_ref = _log_probs(ref_logits)
    pi = log_pi.exp()
    # Tokens with pi == 0 contribute nothing (0 * log 0 = 0); guard against -inf logits producing NaN.
    kl_terms = torch.where(pi > 0, pi * (log_pi - log_ref), torch.zeros_like(pi))
    kl = kl_terms.sum(-1)
    expected_q = torch.where(pi > 0, pi * _upcast(q_logits), torch.zeros_like(pi)).sum(-1)
    return expected_q - beta * kl, kl


def optimal_policy_logits(ref_logits: torch.Tensor, q_logits: torch.Tensor, beta: float) -> torch.Tensor:
    """Log-probabilities of the optimal soft policy ``pi*(w|ctx) = pi_bar(w|ctx) exp(Q(ctx,w)/beta) / Z(ctx)``
    (docs/method.md, section 6; Appendix B)."""
    return F.log_softmax(_log_probs(ref_logits) + _upcast(q_logits) / beta, dim=-1)


def optimal_value(q_logits: torch.Tensor, ref_logits: torch.Tensor, beta: float) -> torch.Tensor:
    """The soft value of the optimal soft policy, ``V*(ctx) = beta log sum_w pi_bar(w|ctx) exp(Q(ctx, w) / beta)`` =
    ``beta log Z(ctx)`` (docs/method.md, sections 4a and 6): the value the soft Bellman *optimality* equation backs
    up, where :func:`soft_value` gives the current policy's. Reduces the last (vocabulary) dimension."""
    return beta * torch.logsumexp(_log_probs(ref_logits) + _upcast(q_logits) / beta, dim=-1)


def _last_token_index(mask: torch.Tensor) -> torch.Tensor:
    lengths = mask.long().sum(-1)
    if (lengths == 0).any():
        raise ValueError("every action needs at least one real token (a row of `mask` is all zeros)")
    return lengths - 1


@torch.no_grad()
def targets_from_values(
    values: torch.Tensor,
    mask: torch.Tensor,
    rewards: torch.Tensor,
    dones: torch.Tensor,
    next_values: torch.Tensor,
    gamma: float,
    discount_within_action: bool = False,
) -> torch.Tensor:
    """Per-token soft Bellman targets (Eq. 6) from per-row soft values ``values[B, L] = V(ctx_j)``.

    For a real token ``j`` that is not the last one, ``y_j = V(ctx_{j+1})`` -- no reward and, unlike
    ETPO(Disc.), no discount inside an action. For the last real token ``n - 1``,
    ``y = r + gamma * (1 - done) * V(s_{t+1})`` where ``next_values[B]`` is V at the first token of the next state.
    ``discount_within_action=True`` multiplies the within-action targets by ``gamma`` (the deliberately
    inconsistent ETPO(Disc.) ablation of Appendix G). Zero where ``mask`` is 0; never carries gradient.
    """
    mask_f = mask.to(values.dtype)
    targets = torch.zeros_like(values)
    within = values[:, 1:]
    if discount_within_action:
        within = gamma * within
    targets[:, :-1] = within
    last = _last_token_index(mask)
    final = rewards.to(values.dtype) + gamma * (1.0 - dones.to(values.dtype)) * next_values.to(values.dtype)
    targets[torch.arange(values.shape[0], device=values.device), last] = final
    return (targets * mask_f).detach()


@torch.no_grad()
def trace_targets(
    values: torch.Tensor,
    target_q_taken: torch.Tensor,
    traces: torch.Tensor,
    mask: torch.Tensor,
    rewards: torch.Tensor,
    dones: torch.Tensor,
    next_values: torch.Tensor,
    gamma: float,
    td_lambda: float,
    discount_within_action: bool = False,
) -> torch.Tensor:
    """Token-level soft TD(lambda) targets in Retrace form (docs/method.md, "Token credit: TD(lambda)").

    For the last real token ``n - 1`` the target is Eq. 6's, ``y = r + gamma (1 - done) V(s_{t+1})``; before it,
    backwards through the action,

        y_j = V(ctx_{j+1}) + lambda * c_{j+1} * (y_{j+1} - Qbar(ctx_{j+1}, w_{j+1}))

    with ``values[B, L] = V(ctx_j)`` (exact soft values under the target network), ``target_q_taken[B, L] =
    Qbar(ctx_j, w_j)`` (the target network's Q of the taken token) and ``traces[B, L] = c_j`` in ``[0, 1]``
    (1, or the truncated importance weight ``min(1, pi / mu)`` when the tokens were sampled from a behaviour
    ``mu != pi``; see :func:`trace_coefficients`). ``td_lambda = 0`` is Eq. 6 exactly; with ``lambda = 1`` and
    ``c = 1`` the target is ``r + gamma (1 - done) V(s') + sum_{k > j} (V(ctx_k) - Qbar(ctx_k, w_k))``, whose
    expectation under pi is the on-policy soft return ``r + gamma (1 - done) V(s') - beta sum_{k > j}
    log(pi / pi_bar)(w_k)`` -- and which equals that return token for token when pi is the soft-greedy policy of
    the target network. For every lambda, any behaviour and any traces in [0, 1] the fixed point is the soft Q of
    pi: the corrections ``y - Qbar(w)`` have mean zero given the token (Retrace, Munos et al. 2016). Away from it
    (a lagging target network) the traces decide what the target estimates: ``pi / mu`` would make targets sampled
    from ``mu`` on-policy ones, Retrace's ``min(1, pi / mu)`` keeps them bounded. ``discount_within_action``
    multiplies every within-action target by gamma (ETPO(Disc.)). No gradient flows out of it.
    """
    if not 0.0 <= td_lambda <= 1.0:
        raise ValueError(f"td_lambda must be in [0, 1], got {td_lambda}")
    dtype = values.dtype
    mask_b = mask.bool()
    b, length = values.shape
    last = _last_token_index(mask)
    final = rewards.to(dtype) + gamma * (1.0 - dones.to(dtype)) * next_values.to(dtype)
    within_scale = gamma if discount_within_action else 1.0
    targets = torch.zeros_like(values)
    rows = torch.arange(b, device=values.device)
    targets[rows, last] = final
    if length > 1:
        correction = td_lambda * traces.to(dtype)
        # y_j depends on y_{j+1}: one vectorised step per column, from the right
        for j in range(length - 2, -1, -1):
            within = mask_b[:, j] & (last > j)
            step = values[:, j + 1] + correction[:, j + 1] * (targets[:, j + 1] - target_q_taken[:, j + 1].to(dtype))
            targets[:, j] = torch.where(within, within_scale * step, targets[:, j])
    return (targets * mask.to(dtype)).detach()


@dataclass
class TreeBackup:
    """What :func:`tree_backup` gives per row ``b`` and action token ``j``: ``targets[b][j] = Q(ctx_j, w_j)``, and
    ``branches[b][j] = (tokens, q, unwritten_q)`` -- the continuations written at ``ctx_j``, their soft-optimal Q and
    the Q of every token not written there -- at the nodes where the tree says something about the choice: with
    ``unwritten="node"`` where two or more continuations were written (elsewhere every token is worth the node
    value and the entry is None), with ``unwritten="zero"`` at every node."""

    targets: list[list[float]]
    branches: list[list[Optional[tuple[list[int], list[float], float]]]]
    #: every node's value ``V``, keyed ``(group, prefix)`` (the prefix a tuple of token ids; the full action a leaf):
    #: what the answer-class probe reads at the tokens where answers part
    node_values: dict = field(default_factory=dict)


def tree_backup(
    groups: Sequence[Hashable],
    actions: Sequence[Sequence[int]],
    log_ref_taken: Sequence[Sequence[float]],
    leaf_values: Sequence[float],
    beta: float,
    unwritten: str = "node",
) -> TreeBackup:
    """Soft-optimal per-token values over the tree of answers written for one prompt (docs/method.md, section 4a).

    Rows with the same ``groups`` key were written for the same prompt: their actions (token ids) form a prefix tree
    whose root is the prompt. ``leaf_values[b]`` is the value of finishing row ``b``'s action -- Eq. 6's last-token
    target ``r + gamma (1 - done) V(s')`` -- and ``log_ref_taken[b][j] = log pi_bar(w_j | ctx_j)``. Bottom up, every
    node's value is the soft Bellman *optimality* backup over the continuations the tree holds,

        V(node) = beta * log( sum_c pi_bar(c | node) exp(Q(node, c) / beta) / sum_c pi_bar(c | node) ),
        Q(node, c) = V(child c)                      (no reward, no discount inside an action; Eq. 6)

    -- the value of the optimal soft policy pi* = pi_bar exp(Q / beta) / Z restricted to the written continuations,
    a token never written being valued at the node's own value (``unwritten="node"``, the renormalisation; with every
    continuation present it is exactly beta log Z, and the root's value is the action-level soft value of Appendix
    A). ``unwritten="zero"`` values a token never written at 0 instead -- the prior of a critic in the ``zero`` Q
    form, an average outcome under a reward baseline: ``V(node) = beta log(sum_c pi_bar(c) exp(Q(node, c) / beta) +
    (1 - sum_c pi_bar(c)))``, so that a written continuation worse than that is left for the unwritten ones. Row
    ``b``'s target at token ``j`` is ``Q(ctx_j, w_j) = V(ctx_{j+1})``: a prefix is worth its best known
    continuation, not the average of the ones written after it, so a second import line that one answer turned
    into a logistic regression (0.95) and five into classes that do not exist is worth the former. Identical rows
    share a leaf (their mean value).
    """
    if not (len(groups) == len(actions) == len(log_ref_taken) == len(leaf_values)):
        raise ValueError("groups, actions, log_ref_taken and leaf_values need one entry per row")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if unwritten not in ("node", "zero"):
        raise ValueError(f"unwritten must be 'node' or 'zero', got {unwritten!r}")
    # a node is (group, prefix); children[node] = {token: log pi_bar}; leaves[node] = values of rows ending there
    children: dict[tuple, dict[int, float]] = {}
    leaves: dict[tuple, list[float]] = {}
    rows = [tuple(int(t) for t in action) for action in actions]
    for g, action, log_ref, value in zip(groups, rows, log_ref_taken, leaf_values):
        if not action:
            raise ValueError("every action needs at least one token")
        for j, token in enumerate(action):
            children.setdefault((g, action[:j]), {}).setdefault(token, float(log_ref[j]))
        leaves.setdefault((g, action), []).append(float(value))
    value: dict[tuple, float] = {}
    # bottom up: the longest prefixes first, so that every child's value is known when its parent is reached
    for node in sorted(set(children) | set(leaves), key=lambda n: -len(n[1])):
        g, prefix = node
        options = [(log_w, value[(g, prefix + (token,))]) for token, log_w in children.get(node, {}).items()]
        if node in leaves:  # an answer ends here (and, rarely, another goes on): its mean value, weighted as the
            # likeliest continuation -- ending is one of the options at this node
            options.append((max((w for w, _ in options), default=0.0), sum(leaves[node]) / len(leaves[node])))
        log_w = torch.tensor([w for w, _ in options], dtype=torch.float64)
        q = torch.tensor([v for _, v in options], dtype=torch.float64)
        if unwritten == "node":
            value[node] = float(beta * (torch.logsumexp(log_w + q / beta, 0) - torch.logsumexp(log_w, 0)))
        else:  # the mass never written, at Q = 0 (none left when, by rounding, the written mass reaches 1)
            rest = 1.0 - float(torch.exp(torch.logsumexp(log_w, 0)))
            terms = torch.cat([log_w + q / beta, torch.tensor([math.log(rest)] if rest > 1e-12 else [],
                                                              dtype=torch.float64)])
            value[node] = float(beta * torch.logsumexp(terms, 0))
    targets, branches = [], []
    for g, action in zip(groups, rows):
        targets.append([value[(g, action[: j + 1])] for j in range(len(action))])
        row = []
        for j in range(len(action)):
            kids = children[(g, action[:j])]
            if unwritten == "node" and len(kids) < 2:
                row.append(None)
                continue
            tokens = list(kids)
            row.append((tokens, [value[(g, action[:j] + (t,))] for t in tokens],
                        value[(g, action[:j])] if unwritten == "node" else 0.0))
        branches.append(row)
    return TreeBackup(targets, branches, value)


def tree_targets(
    groups: Sequence[Hashable],
    actions: Sequence[Sequence[int]],
    log_ref_taken: Sequence[Sequence[float]],
    leaf_values: Sequence[float],
    beta: float,
    unwritten: str = "node",
) -> list[list[float]]:
    """The per-token targets of :func:`tree_backup`: one list per row."""
    return tree_backup(groups, actions, log_ref_taken, leaf_values, beta, unwritten).targets


@torch.no_grad()
def branch_q(q_logits: torch.Tensor, branch_mask: torch.Tensor, branch_value: torch.Tensor,
             written_index: torch.Tensor, written_q: torch.Tensor) -> torch.Tensor:
    """Soft Q for the policy step where the tree says more than the critic (docs/method.md, section 4a): at every
    position of ``branch_mask [B, L]`` the row of ``q_logits [B, L, V]`` becomes the tree's -- ``branch_value [B, L]``
    (the Q of a token not written there) for every token, then the soft-optimal Q of each written continuation:
    ``written_index [K, 3]`` holds (row, position, token) and ``written_q [K]`` its Q. With the node value for the
    unwritten tokens, pi* = pi_bar exp(Q / beta) / Z of such a row moves mass between the written continuations by
    their values and leaves every other token at pi_bar's probability (the written ones' pi*-mass equals their
    pi_bar-mass). Other rows are returned as given."""
    q = torch.where(branch_mask.unsqueeze(-1), branch_value.unsqueeze(-1).to(q_logits.dtype), q_logits)
    if written_index.numel():
        q = q.index_put((written_index[:, 0], written_index[:, 1], written_index[:, 2]), written_q.to(q.dtype))
    return q


@torch.no_grad()
def behaviour_log_probs(logits: torch.Tensor, actions: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                        top_p: float = 1.0) -> torch.Tensor:
    """``log mu(w | ctx)`` of the taken tokens under the sampling distribution that drew them: softmax of
    ``logits / temperature``, restricted to the ``top_k`` largest and then to the smallest set of tokens whose
    probability reaches ``top_p`` (transformers' sampling warpers, in their order). ``-inf`` for a token outside
    the kept set (possible only through float rounding at the boundary)."""
    scores = _upcast(logits) / float(temperature)
    if top_k and top_k < scores.shape[-1]:
        kth = torch.topk(scores, int(top_k), dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=False)
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        remove_sorted = cumulative <= (1.0 - top_p)
        remove_sorted[..., -1] = False  # the most likely token always stays
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        scores = scores.masked_fill(remove, float("-inf"))
    return F.log_softmax(scores, dim=-1).gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def trace_coefficients(policy_log_probs: torch.Tensor, behaviour_log_probs_: torch.Tensor | None,
                       max_trace: float = 1.0) -> torch.Tensor:
    """Retrace's ``c = min(max_trace, pi / mu)`` per taken token; all ones when ``behaviour_log_probs_`` is None
    (the tokens were sampled from pi itself)."""
    if behaviour_log_probs_ is None:
        return torch.ones_like(policy_log_probs)
    ratio = torch.exp((policy_log_probs - behaviour_log_probs_).clamp(max=30.0))
    return ratio.clamp(max=max_trace)


@torch.no_grad()
def token_targets(
    target_q_logits: torch.Tensor,
    pi_logits: torch.Tensor,
    ref_logits: torch.Tensor,
    mask: torch.Tensor,
    rewards: torch.Tensor,
    dones: torch.Tensor,
    next_values: torch.Tensor,
    beta: float,
    gamma: float,
    discount_within_action: bool = False,
) -> torch.Tensor:
    """Eq. 6: the regression target of every taken action token, ``[B, L]``.

    ``V(ctx_j)`` is the exact soft value of row ``j`` under the target network ``target_q_logits``, the current
    policy ``pi_logits`` and the reference ``ref_logits`` (:func:`soft_value`); the targets are then
    :func:`targets_from_values`. No gradient flows out of it.
    """
    values, _ = soft_value(target_q_logits, pi_logits, ref_logits, beta)
    return targets_from_values(values, mask, rewards, dones, next_values, gamma, discount_within_action)


def _reduce(per_token: torch.Tensor, mask: torch.Tensor, reduction: str) -> torch.Tensor:
    weighted = per_token * mask.to(per_token.dtype)
    if reduction == "sum":
        return weighted.sum()
    if reduction == "mean":
        return weighted.sum() / mask.sum().clamp(min=1).to(per_token.dtype)
    if reduction == "none":
        return weighted
    raise ValueError(f"unknown reduction {reduction!r}; choose 'mean', 'sum' or 'none'")


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over the real tokens of ``mask``."""
    return _reduce(_upcast(values), mask, "mean")


def soft_q_regression(
    q_taken: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    huber_delta: float | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """The soft Bellman regression on the taken tokens (Eq. 6): mean over real tokens of ``(Q(ctx_j, w_j) - y_j)^2``
    from ``q_taken[B, L]`` (Q of the taken token only: no vocabulary-sized tensor is needed for this loss).

    With ``huber_delta`` the squared error is replaced by the Huber loss (``0.5 e^2`` for ``|e| <= delta``,
    ``delta (|e| - delta / 2)`` beyond). ``reduction='sum'`` returns the sum over real tokens."""
    q_taken = _upcast(q_taken)
    targets = targets.detach().to(q_taken.dtype)
    if huber_delta is None:
        per_token = (q_taken - targets).pow(2)
    else:
        per_token = F.huber_loss(q_taken, targets, reduction="none", delta=huber_delta)
    return _reduce(per_token, mask, reduction)


def critic_loss(
    q_logits: torch.Tensor,
    actions: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    huber_delta: float | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """:func:`soft_q_regression` on the taken tokens of vocabulary-sized Q-values ``q_logits[B, L, V]``."""
    q_taken = _upcast(q_logits).gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)
    return soft_q_regression(q_taken, targets, mask, huber_delta, reduction)


def policy_loss(
    pi_logits: torch.Tensor,
    ref_logits: torch.Tensor,
    q_logits: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    reduction: str = "mean",
    scale_by_beta: bool = True,
    divergence: str = "reverse",
) -> torch.Tensor:
    """Eq. 7: mean over real tokens of ``KL(pi_theta(.|ctx) || pi_bar(.|ctx) exp(Q(ctx,.)/beta) / Z(ctx))``.

    Q and the reference are detached: only the policy receives gradient. The KL is computed exactly, ``log Z``
    included, so the loss is non-negative and zero exactly at the optimal soft policy. By default the KL is
    multiplied by ``beta`` (``scale_by_beta``): the same minimiser, with gradients on the scale of Q rather than
    ``Q / beta`` (docs/method.md, section 6).

    ``divergence="forward"`` (beyond the paper): ``KL(pi* || pi_theta)`` instead, the cross-entropy to pi* less its
    entropy -- the same minimiser (pi_theta = pi*), with the gradient ``pi_theta - pi*`` on the logits: bounded,
    and not dominated by the mass pi_theta leaves on tokens that pi* all but rules out (whose log-ratios reach
    ``Q / beta``, hundreds of nats at a small beta; docs/results/soft_optimal.md, section 8).
    """
    if divergence not in ("reverse", "forward"):
        raise ValueError(f"divergence must be 'reverse' (Eq. 7) or 'forward', got {divergence!r}")
    log_pi = _log_probs(pi_logits)
    log_target = optimal_policy_logits(ref_logits.detach(), q_logits.detach(), beta)
    if divergence == "forward":
        target = log_target.exp()
        # the entropy term from log_target itself (no second log over the vocabulary); 0 log 0 = 0 where pi* is 0
        kl = (torch.where(target > 0, target * log_target, 0.0) - target * log_pi).sum(-1)
    else:
        pi = log_pi.exp()
        kl = (pi * (log_pi - log_target)).sum(-1)
    if scale_by_beta:
        kl = beta * kl
    return _reduce(kl, mask, reduction)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy of ``softmax(logits)`` over the last dimension."""
    log_p = _log_probs(logits)
    return -(log_p.exp() * log_p).sum(-1)
