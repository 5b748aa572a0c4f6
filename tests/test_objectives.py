"""ETPO math (modules/losses/etpo.py) against independent references: plain loops, brute-force enumeration of a
small MDP (Appendix A consistency), and gradient descent to the closed-form optimal soft policy."""

from __future__ import annotations

import itertools
import math

import numpy as np
from scipy.special import rel_entr
import pytest
import torch

from modules.losses.etpo import (
    behaviour_log_probs,
    critic_loss,
    optimal_policy_logits,
    policy_loss,
    q_from_critic,
    soft_q_regression,
    soft_value,
    targets_from_values,
    token_targets,
    trace_coefficients,
    trace_targets,
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


def _loop_kls(b, beta, forward):
    """Per real token, KL(pi || pi*) (or KL(pi* || pi)) by a numpy loop over the vocabulary."""
    kls = []
    for i in range(len(b["mask"])):
        for j in range(int(b["mask"][i].sum())):
            pl = b["pi"][i, j].numpy()
            p = np.exp(pl - np.logaddexp.reduce(pl))
            t = b["ref"][i, j].numpy() - np.logaddexp.reduce(b["ref"][i, j].numpy()) + b["target_q"][i, j].numpy() / beta
            t = np.exp(t - np.logaddexp.reduce(t))
            # scipy's x log(x / y), 0 where x is 0: a pi* that rules a token out adds nothing to KL(pi* || pi)
            kls.append(np.sum(rel_entr(t, p) if forward else rel_entr(p, t)))
    return kls


def test_policy_loss_zero_at_optimum_and_matches_loop():
    b = _random_batch()
    beta = 0.2
    opt = optimal_policy_logits(b["ref"], b["target_q"], beta)
    at_opt = policy_loss(opt, b["ref"], b["target_q"], b["mask"], beta)
    assert at_opt.item() == pytest.approx(0.0, abs=1e-12)
    got = policy_loss(b["pi"], b["ref"], b["target_q"], b["mask"], beta, scale_by_beta=False)
    kls = _loop_kls(b, beta, forward=False)
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


def test_the_forward_policy_divergence_matches_a_loop_and_its_gradient_is_pi_minus_pi_star():
    """divergence="forward": KL(pi* || pi) per token (a numpy loop over the vocabulary), zero at pi*, the logit
    gradient beta (pi - pi*) per token (over the mean's count), and a target of exactly 0 where pi* underflows."""
    b = _random_batch()
    beta = 0.2
    opt = optimal_policy_logits(b["ref"], b["target_q"], beta)
    assert policy_loss(opt, b["ref"], b["target_q"], b["mask"], beta, divergence="forward").item() == \
        pytest.approx(0.0, abs=1e-12)
    got = policy_loss(b["pi"], b["ref"], b["target_q"], b["mask"], beta, scale_by_beta=False, divergence="forward")
    kls = _loop_kls(b, beta, forward=True)
    assert got.item() == pytest.approx(np.mean(kls), rel=1e-10)
    pi = b["pi"].clone().requires_grad_(True)
    policy_loss(pi, b["ref"], b["target_q"], b["mask"], beta, divergence="forward").backward()
    n = float(b["mask"].sum())
    want = beta * (pi.detach().softmax(-1) - opt.exp()) * b["mask"].unsqueeze(-1) / n
    assert torch.allclose(pi.grad, want, atol=1e-12)
    # a pi* that rules tokens out entirely (Q = -inf there): their 0 log 0 terms are 0, not nan
    q = b["target_q"].clone()
    q[..., 0] = float("-inf")
    pi = b["pi"].clone().requires_grad_(True)
    ruled_out = policy_loss(pi, b["ref"], q, b["mask"], beta, scale_by_beta=False, divergence="forward")
    assert ruled_out.item() == pytest.approx(np.mean(_loop_kls({**b, "target_q": q}, beta, forward=True)), rel=1e-10)
    ruled_out.backward()
    assert torch.isfinite(pi.grad).all()
    with pytest.raises(ValueError, match="divergence"):
        policy_loss(b["pi"], b["ref"], q, b["mask"], beta, divergence="both")


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


# ---------------------------------------------------------------------------------------------------------------
# Token-level soft TD(lambda) in Retrace form (trace_targets), the behaviour policy, the traces
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("disc", [False, True])
def test_trace_targets_match_plain_loop(lam, disc):
    b = _random_batch(seed=3)
    g = torch.Generator().manual_seed(4)
    B, L, _ = b["pi"].shape
    values = torch.randn(B, L, generator=g, dtype=torch.float64)
    q_taken = torch.randn(B, L, generator=g, dtype=torch.float64)
    traces = torch.rand(B, L, generator=g, dtype=torch.float64)
    gamma = 0.9
    got = trace_targets(values, q_taken, traces, b["mask"], b["rewards"], b["dones"], b["next_values"], gamma, lam,
                        discount_within_action=disc)
    expected = np.zeros((B, L))
    for i in range(B):
        n = int(b["mask"][i].sum())
        y = float(b["rewards"][i] + gamma * (1 - b["dones"][i]) * b["next_values"][i])
        expected[i, n - 1] = y
        for j in range(n - 2, -1, -1):
            y = float(values[i, j + 1] + lam * traces[i, j + 1] * (y - q_taken[i, j + 1]))
            y = gamma * y if disc else y
            expected[i, j] = y
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-12)
    if lam == 0.0:  # Eq. 6 exactly
        eq6 = targets_from_values(values, b["mask"], b["rewards"], b["dones"], b["next_values"], gamma, disc)
        assert torch.allclose(got, eq6, atol=1e-12)


def test_lambda_one_is_the_soft_return_when_pi_is_soft_greedy_for_the_target():
    """With lambda = 1 and no trace cuts, each target is r + gamma (1 - done) V(s') - beta * the later tokens'
    log(pi / pi_bar), token for token, when pi is the optimal soft policy of the target network."""
    b = _random_batch(seed=5)
    beta, gamma = 0.3, 0.9
    pi = optimal_policy_logits(b["ref"], b["target_q"], beta)
    values, _ = soft_value(b["target_q"], pi, b["ref"], beta)
    taken = b["actions"].unsqueeze(-1)
    q_taken = b["target_q"].gather(-1, taken).squeeze(-1)
    got = trace_targets(values, q_taken, torch.ones_like(values), b["mask"], b["rewards"], b["dones"],
                        b["next_values"], gamma, 1.0)
    log_ratio = (pi.log_softmax(-1) - b["ref"].log_softmax(-1)).gather(-1, taken).squeeze(-1)
    B, L = values.shape
    for i in range(B):
        n = int(b["mask"][i].sum())
        final = float(b["rewards"][i] + gamma * (1 - b["dones"][i]) * b["next_values"][i])
        for j in range(n):
            soft_return = final - beta * float(log_ratio[i, j + 1:n].sum())
            assert got[i, j].item() == pytest.approx(soft_return, abs=1e-9)


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.5, 0, 1.0), (0.7, 4, 1.0), (1.0, 0, 0.8), (0.5, 5, 0.9)])
def test_behaviour_log_probs_equal_transformers_sampling_warpers(temperature, top_k, top_p):
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    g = torch.Generator().manual_seed(6)
    logits = torch.randn(3, 4, 11, generator=g) * 2
    actions = torch.randint(0, 11, (3, 4), generator=g)
    got = behaviour_log_probs(logits, actions, temperature, top_k, top_p)
    flat = logits.reshape(-1, 11)
    scores = TemperatureLogitsWarper(temperature)(None, flat.clone())
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    want = scores.log_softmax(-1).gather(-1, actions.reshape(-1, 1)).reshape(3, 4)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-5, atol=1e-6)
    assert torch.equal(trace_coefficients(got, None), torch.ones_like(got))
    assert (trace_coefficients(torch.zeros_like(got), got) <= 1).all()


def test_soft_q_regression_equals_critic_loss_on_gathered_q():
    b = _random_batch()
    targets = torch.randn(4, 6, dtype=torch.float64)
    q_taken = b["target_q"].gather(-1, b["actions"].unsqueeze(-1)).squeeze(-1)
    for delta in (None, 0.5):
        assert soft_q_regression(q_taken, targets, b["mask"], delta).item() == pytest.approx(
            critic_loss(b["target_q"], b["actions"], targets, b["mask"], delta).item(), rel=1e-12)


class PolicyMDP(TinyMDP):
    """TinyMDP with an arbitrary (not soft-optimal) token policy pi, a behaviour mu != pi (pi at temperature 0.5),
    and pi's exact soft Q by the token-level recursion -- the fixed point TD(lambda) must keep."""

    def __init__(self, beta, gamma, seed=0):
        super().__init__(beta, gamma, seed)
        self._pi = {}

    def pi_logits(self, state, prefix):
        key = (state, prefix)
        if key not in self._pi:
            self._pi[key] = self.rng.normal(size=VOCAB) * 1.5
        return self._pi[key]

    def probs(self, state, prefix, temperature=1.0):
        z = self.pi_logits(state, prefix) / temperature
        return np.exp(z - np.logaddexp.reduce(z))

    def q_pi(self, state, prefix):
        q = np.zeros(VOCAB)
        for w in range(VOCAB):
            a = prefix + (w,)
            if self.ends(a):
                nxt = 0.0 if self.terminal_after(state) else self.v_pi(self.next_state(state, a), ())
                q[w] = self.reward(state, a) + self.gamma * nxt
            else:
                q[w] = self.v_pi(state, a)
        return q

    def v_pi(self, state, prefix):
        pi = self.probs(state, prefix)
        lg = self.ref_logits(state, prefix)
        log_ratio = np.log(pi) - (lg - np.logaddexp.reduce(lg))
        return float(np.sum(pi * (self.q_pi(state, prefix) - self.beta * log_ratio)))


def _expected_trace_targets(mdp, state, lam, temperature, traces_kind, perturb=0.0):
    """E_mu[y_j | ctx_j, w_j] for every (prefix, token) of ``state``, by enumerating every continuation under mu
    (pi at ``temperature``), with y from the library's trace_targets. Qbar = pi's exact soft Q (plus ``perturb``
    noise: a lagging target network), V = the soft values of Qbar under pi. ``traces_kind``: ``none`` (c = 1),
    ``retrace`` (min(1, pi / mu)) or ``importance`` (pi / mu, untruncated)."""
    rng = np.random.default_rng(11)
    noise = {}

    def qbar(prefix):
        if prefix not in noise:
            noise[prefix] = perturb * rng.normal(size=VOCAB)
        return mdp.q_pi(state, prefix) + noise[prefix]

    def vbar(prefix):
        pi = mdp.probs(state, prefix)
        lg = mdp.ref_logits(state, prefix)
        return float(np.sum(pi * (qbar(prefix) - mdp.beta * (np.log(pi) - (lg - np.logaddexp.reduce(lg))))))

    actions = mdp.actions()
    B = len(actions)
    values = torch.zeros(B, MAX_LEN, dtype=torch.float64)
    q_taken = torch.zeros_like(values)
    traces = torch.ones_like(values)
    mask = torch.zeros_like(values)
    rewards = torch.zeros(B, dtype=torch.float64)
    next_values = torch.zeros(B, dtype=torch.float64)
    done = 1.0 if mdp.terminal_after(state) else 0.0
    for i, a in enumerate(actions):
        for j, w in enumerate(a):
            values[i, j] = vbar(a[:j])
            q_taken[i, j] = qbar(a[:j])[w]
            ratio = mdp.probs(state, a[:j])[w] / mdp.probs(state, a[:j], temperature)[w]
            traces[i, j] = {"none": 1.0, "retrace": min(1.0, ratio), "importance": ratio}[traces_kind]
            mask[i, j] = 1.0
        rewards[i] = mdp.reward(state, a)
        if not done:
            next_values[i] = mdp.v_pi(mdp.next_state(state, a), ())
    y = trace_targets(values, q_taken, traces, mask, rewards, torch.full((B,), done, dtype=torch.float64),
                      next_values, mdp.gamma, lam)
    expected = {}
    for i, a in enumerate(actions):
        for j in range(len(a)):
            weight = np.prod([mdp.probs(state, a[:k], temperature)[a[k]] for k in range(j + 1, len(a))])
            key = a[: j + 1]
            expected[key] = expected.get(key, 0.0) + weight * float(y[i, j])
    return expected


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("state", ["s0", "s1_1"])
@pytest.mark.parametrize("traces_kind", ["none", "retrace"])
def test_the_soft_q_of_pi_stays_the_fixed_point_of_td_lambda_under_a_behaviour_policy(lam, state, traces_kind):
    """Appendix-A MDP, enumerated: with Qbar = Q^pi and V = V^pi, the expected TD(lambda) target of every taken
    token under the sampling policy mu (pi at temperature 0.5) is Q^pi of that token -- for every lambda, with or
    without trace cuts (the Retrace form's corrections y - Qbar(w) have mean zero given the token)."""
    mdp = PolicyMDP(beta=0.4, gamma=0.9, seed=7)
    for temperature in (0.5, 1.0):
        expected = _expected_trace_targets(mdp, state, lam, temperature, traces_kind)
        for key, value in expected.items():
            assert value == pytest.approx(mdp.q_pi(state, key[:-1])[key[-1]], abs=1e-9), (temperature, key)


@pytest.mark.parametrize("state", ["s0", "s1_1"])
def test_importance_traces_turn_behaviour_samples_into_on_policy_targets(state):
    """Away from the fixed point (a lagging target network, Qbar != Q^pi) the traces decide what a target
    estimates: per-decision importance weights pi / mu make the expected target under mu the on-policy one (under
    pi), uncut traces (c = 1) do not; Retrace's cut weights min(1, pi / mu) trade that bias for bounded traces."""
    mdp = PolicyMDP(beta=0.4, gamma=0.9, seed=7)
    on_policy = _expected_trace_targets(mdp, state, 1.0, 1.0, "none", perturb=0.5)
    importance = _expected_trace_targets(mdp, state, 1.0, 0.5, "importance", perturb=0.5)
    uncut = _expected_trace_targets(mdp, state, 1.0, 0.5, "none", perturb=0.5)
    retrace = _expected_trace_targets(mdp, state, 1.0, 0.5, "retrace", perturb=0.5)
    gap = lambda x: max(abs(x[k] - on_policy[k]) for k in on_policy)  # noqa: E731
    assert gap(importance) < 1e-9
    assert gap(uncut) > 1e-2 and gap(retrace) > 1e-9


# ---------------------------------------------------------------------------------------------------------------
# The soft-optimal tree backup (tree_targets, docs/method.md section 4a) against enumeration.
# ---------------------------------------------------------------------------------------------------------------
def _tree_inputs(mdp, state, actions):
    """Per action: its tokens, log pi_bar of each token, and its leaf value r + gamma V*(s') (action level)."""
    log_ref = []
    for a in actions:
        row = []
        for j, w in enumerate(a):
            lg = mdp.ref_logits(state, a[:j])
            row.append(float(lg[w] - np.logaddexp.reduce(lg)))
        log_ref.append(row)
    return log_ref, [mdp.q_action(state, a) for a in actions]


@pytest.mark.parametrize("beta", [0.5, 0.1])
def test_tree_targets_on_every_answer_are_the_optimal_soft_q(beta):
    """With every action of a state in the tree (every node holds all its continuations) the backup is exact: each
    target is Q*(ctx_j, w_j) of the per-token optimal soft policy, the root's value is the action-level soft value
    V*(s) = beta log sum_a pi_bar(a) exp(Q(s, a) / beta), and the product of the per-token pi* built from the targets
    is the action-level pi*(a) (Appendix A)."""
    from modules.losses.etpo import tree_targets

    mdp = TinyMDP(beta=beta, gamma=0.9, seed=3)
    for state in ("s0", "s1_1"):
        actions = mdp.actions()
        log_ref, leaves = _tree_inputs(mdp, state, actions)
        targets = tree_targets([state] * len(actions), actions, log_ref, leaves, beta)
        v = mdp.v_action(state)
        for a, row in zip(actions, targets):
            for j, w in enumerate(a):
                assert row[j] == pytest.approx(mdp.q_token(state, a[:j], disc=False)[w], abs=1e-9)
            # pi*(w | ctx) from the targets of the siblings at each node, multiplied along the action
            log_prob = 0.0
            for j, w in enumerate(a):
                q = mdp.q_token(state, a[:j], disc=False)
                lg = mdp.ref_logits(state, a[:j])
                z = lg - np.logaddexp.reduce(lg) + q / beta
                log_prob += z[w] - np.logaddexp.reduce(z)
            assert math.exp(log_prob) == pytest.approx(
                math.exp(mdp.log_ref_action(state, a) + (mdp.q_action(state, a) - v) / beta), abs=1e-9)
        # the root: the soft value of the first token's options (every first token is a child of the root)
        first = {a[0]: row[0] for a, row in zip(actions, targets)}
        lg = mdp.ref_logits(state, ())
        log_ref0 = lg - np.logaddexp.reduce(lg)
        root = beta * np.logaddexp.reduce([log_ref0[w] + q / beta for w, q in first.items()])
        assert root == pytest.approx(v, abs=1e-9)


def test_tree_targets_on_some_answers_value_unwritten_tokens_at_the_node_value():
    """With only some actions written, every node's value is the fixed point of the full backup in which each token
    never written is worth the node's own value: V = beta log(sum_written pi_bar e^(Q/beta) + (1 - pi_bar(written))
    e^(V/beta)). Rows with the same tokens but another group do not mix; identical rows share their mean leaf."""
    from modules.losses.etpo import tree_targets

    beta = 0.2
    mdp = TinyMDP(beta=beta, gamma=0.9, seed=5)
    rng = np.random.default_rng(0)
    everything = mdp.actions()
    written = [everything[i] for i in rng.choice(len(everything), size=7, replace=False)]
    written.append(written[0])  # a duplicate answer
    log_ref, leaves = _tree_inputs(mdp, "s0", written)
    leaves[-1] = leaves[0] + 1.0  # ... whose two rows disagree: the leaf is their mean
    targets = tree_targets(["s0"] * len(written), written, log_ref, leaves, beta)
    # the node values, read back from the targets (V(child) is the target of the token into it)
    value = {}
    for a, row in zip(written, targets):
        for j in range(len(a)):
            value[a[: j + 1]] = row[j]
    assert value[written[0]] == pytest.approx(leaves[0] + 0.5)
    nodes = {a[:j] for a in written for j in range(len(a))}
    for node in nodes:
        kids = {a[len(node)] for a in written if len(a) > len(node) and a[: len(node)] == node}
        lg = mdp.ref_logits("s0", node)
        log_p = lg - np.logaddexp.reduce(lg)
        v_node = (beta * np.logaddexp.reduce([log_p[w] + value[node + (w,)] / beta for w in kids])
                  - beta * np.logaddexp.reduce([log_p[w] for w in kids]))
        unwritten = 1.0 - sum(math.exp(log_p[w]) for w in kids)
        full = beta * math.log(sum(math.exp(log_p[w] + value[node + (w,)] / beta) for w in kids)
                               + unwritten * math.exp(v_node / beta))
        assert full == pytest.approx(v_node, abs=1e-9)
        if node:  # the node's value is what the token into it was given
            assert value[node] == pytest.approx(v_node, abs=1e-9)
    # a single path is worth its own leaf at every token; another group is a tree of its own
    alone = tree_targets(["other", "s0"], [written[1], written[1]], [log_ref[1]] * 2, [5.0, leaves[1]], beta)
    assert alone[0] == [5.0] * len(written[1]) and alone[1] == [leaves[1]] * len(written[1])


def test_tree_targets_with_a_zero_prior_value_unwritten_tokens_at_zero():
    """unwritten="zero": every node's value is the full backup over the whole vocabulary in which each token never
    written there is worth 0 (the zero-form critic's prior); every node is reported, its unwritten Q 0. With every
    continuation written the prior plays no part (the same values as unwritten="node")."""
    from modules.losses.etpo import tree_backup

    beta = 0.2
    mdp = TinyMDP(beta=beta, gamma=0.9, seed=7)
    everything = mdp.actions()
    written = [everything[i] for i in (0, 3, 5, 8, 13)]
    log_ref, leaves = _tree_inputs(mdp, "s0", written)
    tree = tree_backup(["s0"] * len(written), written, log_ref, leaves, beta, unwritten="zero")

    def full_value(node):  # the backup over all VOCAB tokens, unwritten ones at 0, by plain recursion
        ending = [a for a in written if a == node]
        if ending:
            return leaves[written.index(node)]
        lg = mdp.ref_logits("s0", node)
        log_p = lg - np.logaddexp.reduce(lg)
        terms = []
        for w in range(VOCAB):
            child = node + (w,)
            on_tree = any(a[: len(child)] == child for a in written)
            terms.append(log_p[w] + (full_value(child) if on_tree else 0.0) / beta)
        return beta * np.logaddexp.reduce(terms)

    for a, row, branches in zip(written, tree.targets, tree.branches):
        for j in range(len(a)):
            assert row[j] == pytest.approx(full_value(a[: j + 1]), abs=1e-9)
            tokens, q, unwritten_q = branches[j]
            assert unwritten_q == 0.0 and a[j] in tokens
            assert q[tokens.index(a[j])] == pytest.approx(row[j])
    everything_log_ref, everything_leaves = _tree_inputs(mdp, "s0", everything)
    node = tree_backup(["s0"] * len(everything), everything, everything_log_ref, everything_leaves, beta)
    zero = tree_backup(["s0"] * len(everything), everything, everything_log_ref, everything_leaves, beta,
                       unwritten="zero")
    for a, b in zip(node.targets, zero.targets):
        assert a == pytest.approx(b, abs=1e-9)
