"""ETPO math (etpo/objectives.py) against independent references: plain loops, brute-force enumeration of a
small MDP (Appendix A consistency), and gradient descent to the closed-form optimal soft policy."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from etpo.objectives import (
    critic_loss,
    optimal_policy_logits,
    policy_loss,
    q_from_critic,
    soft_value,
    targets_from_values,
    token_targets,
)


def _random_batch(seed=0, B=4, L=6, V=7, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([L, 1, 3, 5])[:B]
    mask = (torch.arange(L)[None, :] < lengths[:, None]).to(dtype)
    return dict(
        target_q=torch.randn(B, L, V, generator=g, dtype=dtype),
        pi=torch.randn(B, L, V, generator=g, dtype=dtype),
        ref=torch.randn(B, L, V, generator=g, dtype=dtype),
        mask=mask,
        actions=torch.randint(0, V, (B, L), generator=g),
        rewards=torch.randn(B, generator=g, dtype=dtype),
        dones=torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=dtype)[:B],
        next_values=torch.randn(B, generator=g, dtype=dtype),
    )


def _loop_value(q, pi_logits, ref_logits, beta):
    pi = np.exp(pi_logits - np.logaddexp.reduce(pi_logits))
    log_pi = np.log(pi)
    log_ref = ref_logits - np.logaddexp.reduce(ref_logits)
    kl = sum(pi[w] * (log_pi[w] - log_ref[w]) for w in range(len(q)))
    return sum(pi[w] * q[w] for w in range(len(q))) - beta * kl, kl


@pytest.mark.parametrize("discount_within_action", [False, True])
def test_token_targets_match_plain_loop(discount_within_action):
    b = _random_batch()
    beta, gamma = 0.1, 0.9
    got = token_targets(
        b["target_q"], b["pi"], b["ref"], b["mask"], b["rewards"], b["dones"], b["next_values"], beta, gamma,
        discount_within_action=discount_within_action,
    )
    B, L, _ = b["pi"].shape
    expected = np.zeros((B, L))
    for i in range(B):
        n = int(b["mask"][i].sum())
        for j in range(n):
            if j < n - 1:
                v, _ = _loop_value(b["target_q"][i, j + 1].numpy(), b["pi"][i, j + 1].numpy(), b["ref"][i, j + 1].numpy(), beta)
                expected[i, j] = gamma * v if discount_within_action else v
            else:
                expected[i, j] = b["rewards"][i] + gamma * (1 - b["dones"][i]) * b["next_values"][i]
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-12)
    assert not got.requires_grad


def test_token_targets_carry_no_gradient():
    b = _random_batch(dtype=torch.float32)
    q = b["target_q"].clone().requires_grad_(True)
    pi = b["pi"].clone().requires_grad_(True)
    out = token_targets(q, pi, b["ref"], b["mask"], b["rewards"], b["dones"], b["next_values"], 0.01, 0.99)
    assert out.grad_fn is None and not out.requires_grad


def test_soft_value_matches_loop_and_kl_is_nonnegative():
    b = _random_batch()
    value, kl = soft_value(b["target_q"], b["pi"], b["ref"], beta=0.3)
    for i, j in itertools.product(range(4), range(6)):
        v, k = _loop_value(b["target_q"][i, j].numpy(), b["pi"][i, j].numpy(), b["ref"][i, j].numpy(), 0.3)
        assert value[i, j].item() == pytest.approx(v, abs=1e-12)
        assert kl[i, j].item() == pytest.approx(k, abs=1e-12)
    assert (kl >= -1e-12).all()
    # pi == pi_bar  =>  KL = 0 and V = E_pi[Q]
    value, kl = soft_value(b["target_q"], b["ref"], b["ref"], beta=0.3)
    assert torch.allclose(kl, torch.zeros_like(kl), atol=1e-12)


def test_critic_loss_is_masked_mean_of_squared_error_and_huber():
    b = _random_batch()
    targets = torch.randn(4, 6, dtype=torch.float64)
    got = critic_loss(b["target_q"], b["actions"], targets, b["mask"])
    errs = []
    for i in range(4):
        for j in range(int(b["mask"][i].sum())):
            errs.append(b["target_q"][i, j, b["actions"][i, j]].item() - targets[i, j].item())
    errs = np.array(errs)
    assert got.item() == pytest.approx(np.mean(errs**2), rel=1e-12)
    delta = 0.5
    huber = np.where(np.abs(errs) <= delta, 0.5 * errs**2, delta * (np.abs(errs) - 0.5 * delta))
    got_h = critic_loss(b["target_q"], b["actions"], targets, b["mask"], huber_delta=delta)
    assert got_h.item() == pytest.approx(huber.mean(), rel=1e-12)
    # sum reduction divided by the token count equals the mean (chunked evaluation relies on it)
    total = critic_loss(b["target_q"], b["actions"], targets, b["mask"], reduction="sum")
    assert (total / b["mask"].sum()).item() == pytest.approx(got.item(), rel=1e-12)


def test_q_parameterisations():
    crit, ref = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    assert torch.equal(q_from_critic(crit, ref, "logits"), crit)
    assert torch.allclose(q_from_critic(crit, ref, "zero"), crit - ref)
    # "zero" form at initialisation (critic == reference): Q = 0, so the optimal soft policy is the reference
    q0 = q_from_critic(ref, ref, "zero")
    assert torch.allclose(optimal_policy_logits(ref, q0, 0.01).exp(), ref.softmax(-1), atol=1e-6)
    with pytest.raises(ValueError, match="unknown Q parameterisation"):
        q_from_critic(crit, ref, "nope")


def test_policy_loss_zero_at_optimum_and_matches_loop():
    b = _random_batch()
    beta = 0.2
    opt = optimal_policy_logits(b["ref"], b["target_q"], beta)
    at_opt = policy_loss(opt, b["ref"], b["target_q"], b["mask"], beta)
    assert at_opt.item() == pytest.approx(0.0, abs=1e-12)
    got = policy_loss(b["pi"], b["ref"], b["target_q"], b["mask"], beta, scale_by_beta=False)
    kls = []
    for i in range(4):
        for j in range(int(b["mask"][i].sum())):
            pl = b["pi"][i, j].numpy()
            p = np.exp(pl - np.logaddexp.reduce(pl))
            t = b["ref"][i, j].numpy() - np.logaddexp.reduce(b["ref"][i, j].numpy()) + b["target_q"][i, j].numpy() / beta
            t = np.exp(t - np.logaddexp.reduce(t))
            kls.append(np.sum(p * (np.log(p) - np.log(t))))
    assert got.item() == pytest.approx(np.mean(kls), rel=1e-10)
    scaled = policy_loss(b["pi"], b["ref"], b["target_q"], b["mask"], beta)
    assert scaled.item() == pytest.approx(beta * np.mean(kls), rel=1e-10)


def test_policy_loss_gradient_reaches_policy_only():
    b = _random_batch(dtype=torch.float32)
    pi = b["pi"].clone().requires_grad_(True)
    ref = b["ref"].clone().requires_grad_(True)
    q = b["target_q"].clone().requires_grad_(True)
    policy_loss(pi, ref, q, b["mask"], 0.1).backward()
    assert pi.grad is not None and pi.grad.abs().sum() > 0
    assert ref.grad is None and q.grad is None
    # padding rows get no gradient
    assert torch.all(pi.grad[1, 1:] == 0)


def test_gradient_descent_on_policy_loss_converges_to_optimal_soft_policy():
    torch.manual_seed(0)
    B, L, V, beta = 2, 3, 5, 0.5
    ref = torch.randn(B, L, V)
    q = torch.randn(B, L, V)
    mask = torch.ones(B, L)
    logits = torch.zeros(B, L, V, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.1)
    for _ in range(3000):
        opt.zero_grad()
        policy_loss(logits, ref, q, mask, beta).backward()
        opt.step()
    expected = torch.softmax(ref.log_softmax(-1) + q / beta, -1)
    assert torch.allclose(logits.softmax(-1), expected, atol=1e-4)


def test_targets_reject_empty_actions():
    with pytest.raises(ValueError, match="at least one real token"):
        targets_from_values(torch.zeros(1, 3), torch.zeros(1, 3), torch.zeros(1), torch.zeros(1), torch.zeros(1), 0.9)


# ---------------------------------------------------------------------------------------------------------------
# Appendix A: the per-token decomposition is consistent with the action-level soft Bellman equation.
# A small MDP, enumerated exactly: vocabulary {0, 1, EOS}, actions of at most MAX_LEN tokens (ended by EOS or the
# length cap), two environment steps (s0 -> one of two second-step states -> terminal).
# ---------------------------------------------------------------------------------------------------------------
VOCAB, EOS, MAX_LEN = 3, 2, 3


class TinyMDP:
    def __init__(self, beta, gamma, seed=0):
        self.beta, self.gamma = beta, gamma
        self.rng = np.random.default_rng(seed)
        self._ref, self._reward = {}, {}

    # --- environment -----------------------------------------------------------------------------------------
    def terminal_after(self, state):
        return state != "s0"

    def next_state(self, state, action):
        return f"s1_{sum(action) % 2}"

    def reward(self, state, action):
        key = (state, action)
        if key not in self._reward:
            self._reward[key] = float(self.rng.normal())
        return self._reward[key]

    def ref_logits(self, state, prefix):
        key = (state, prefix)
        if key not in self._ref:
            self._ref[key] = self.rng.normal(size=VOCAB) * 1.5
        return self._ref[key]

    @staticmethod
    def ends(action):
        return action[-1] == EOS or len(action) == MAX_LEN

    def actions(self):
        out = []
        for n in range(1, MAX_LEN + 1):
            for seq in itertools.product(range(VOCAB), repeat=n):
                if all(w != EOS for w in seq[:-1]) and self.ends(seq):
                    out.append(seq)
        return out

    # --- action level (Eq. 3), by enumeration ------------------------------------------------------------------
    def log_ref_action(self, state, action):
        total = 0.0
        for j, w in enumerate(action):
            lg = self.ref_logits(state, action[:j])
            total += lg[w] - np.logaddexp.reduce(lg)
        return total

    def q_action(self, state, action):
        r = self.reward(state, action)
        if self.terminal_after(state):
            return r
        return r + self.gamma * self.v_action(self.next_state(state, action))

    def v_action(self, state):
        terms = [self.log_ref_action(state, a) + self.q_action(state, a) / self.beta for a in self.actions()]
        return self.beta * np.logaddexp.reduce(terms)

    # --- token level (Eq. 6 with the optimal per-token policy of section 4), plain recursion ---------------------
    def q_token(self, state, prefix, disc):
        q = np.zeros(VOCAB)
        for w in range(VOCAB):
            a = prefix + (w,)
            if self.ends(a):
                nxt = 0.0 if self.terminal_after(state) else self.v_token(self.next_state(state, a), (), disc)
                q[w] = self.reward(state, a) + self.gamma * nxt
            else:
                q[w] = (self.gamma if disc else 1.0) * self.v_token(state, a, disc)
        return q

    def pi_token(self, state, prefix, disc):
        lg = self.ref_logits(state, prefix)
        z = lg - np.logaddexp.reduce(lg) + self.q_token(state, prefix, disc) / self.beta
        return np.exp(z - np.logaddexp.reduce(z))

    def v_token(self, state, prefix, disc):
        q = self.q_token(state, prefix, disc)
        pi = self.pi_token(state, prefix, disc)
        lg = self.ref_logits(state, prefix)
        log_ref = lg - np.logaddexp.reduce(lg)
        return float(np.sum(pi * q) - self.beta * np.sum(pi * (np.log(pi) - log_ref)))


@pytest.mark.parametrize("beta", [0.5, 0.1])
def test_consistency_per_token_equals_action_level(beta):
    mdp = TinyMDP(beta=beta, gamma=0.9, seed=1)
    for state in ("s0", "s1_0", "s1_1"):
        # the per-token value at the first token equals the action-level soft value
        assert mdp.v_token(state, (), disc=False) == pytest.approx(mdp.v_action(state), abs=1e-6)
        # the product of per-token optimal probabilities equals the action-level optimal policy
        v = mdp.v_action(state)
        total = 0.0
        for a in mdp.actions():
            prod = np.prod([mdp.pi_token(state, a[:j], disc=False)[w] for j, w in enumerate(a)])
            action_level = math.exp(mdp.log_ref_action(state, a) + (mdp.q_action(state, a) - v) / beta)
            assert prod == pytest.approx(action_level, abs=1e-6)
            total += prod
        assert total == pytest.approx(1.0, abs=1e-9)


def test_discount_within_action_breaks_consistency():
    mdp = TinyMDP(beta=0.5, gamma=0.9, seed=1)
    assert abs(mdp.v_token("s0", (), disc=True) - mdp.v_action("s0")) > 1e-3
    v = mdp.v_action("s0")
    worst = 0.0
    for a in mdp.actions():
        prod = np.prod([mdp.pi_token("s0", a[:j], disc=True)[w] for j, w in enumerate(a)])
        action_level = math.exp(mdp.log_ref_action("s0", a) + (mdp.q_action("s0", a) - v) / 0.5)
        worst = max(worst, abs(prod - action_level))
    assert worst > 1e-3


@pytest.mark.parametrize("disc", [False, True])
def test_library_targets_are_the_fixed_point_of_the_token_recursion(disc):
    """token_targets / soft_value / optimal_policy_logits from the library, fed with the exact per-token Q of the
    MDP and its optimal policy, reproduce that Q for every taken token of every action of s0 (batched, padded);
    the first-token soft value reproduces the action-level value when disc is off."""
    beta, gamma = 0.5, 0.9
    mdp = TinyMDP(beta=beta, gamma=gamma, seed=2)
    actions = mdp.actions()
    B = len(actions)
    q = torch.zeros(B, MAX_LEN, VOCAB, dtype=torch.float64)
    ref = torch.zeros_like(q)
    mask = torch.zeros(B, MAX_LEN, dtype=torch.float64)
    act = torch.zeros(B, MAX_LEN, dtype=torch.long)
    rewards, next_values = torch.zeros(B, dtype=torch.float64), torch.zeros(B, dtype=torch.float64)
    for i, a in enumerate(actions):
        for j, w in enumerate(a):
            q[i, j] = torch.from_numpy(mdp.q_token("s0", a[:j], disc))
            ref[i, j] = torch.from_numpy(mdp.ref_logits("s0", a[:j]))
            mask[i, j], act[i, j] = 1.0, w
        rewards[i] = mdp.reward("s0", a)
        s1 = mdp.next_state("s0", a)
        q1 = torch.from_numpy(mdp.q_token(s1, (), disc))
        ref1 = torch.from_numpy(mdp.ref_logits(s1, ()))
        next_values[i] = soft_value(q1, optimal_policy_logits(ref1, q1, beta), ref1, beta)[0]
    pi = optimal_policy_logits(ref, q, beta)
    y = token_targets(q, pi, ref, mask, rewards, torch.zeros(B, dtype=torch.float64), next_values, beta, gamma,
                      discount_within_action=disc)
    q_taken = q.gather(-1, act.unsqueeze(-1)).squeeze(-1) * mask
    assert torch.allclose(y, q_taken, atol=1e-9)
    assert critic_loss(q, act, y, mask).item() == pytest.approx(0.0, abs=1e-12)
    v0 = soft_value(q[0, 0], pi[0, 0], ref[0, 0], beta)[0].item()
    if disc:
        assert abs(v0 - mdp.v_action("s0")) > 1e-3
    else:
        assert v0 == pytest.approx(mdp.v_action("s0"), abs=1e-6)
