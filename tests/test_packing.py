"""Shared prompt prefixes computed once (modules/shared_base/packing.py and the model layer's plan): the prefix trees
against brute force, and every view's hidden states, gradients and generations against the plain computation."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import tiny_backbone
from modules.shared_base import SharedBaseLM
from modules.shared_base.packing import pack_sequences, plan_packs


def _sequences(seed=0, n=7):
    rng = random.Random(seed)
    heads = [[rng.randrange(5, 12) for _ in range(rng.randrange(3, 9))] for _ in range(2)]
    out = []
    for i in range(n):
        head = heads[i % 2] if i < n - 1 else []  # the last sequence shares nothing
        tail = [rng.randrange(5, 12) for _ in range(rng.randrange(1, 6))]
        out.append(head + tail)
    out.append(list(out[0]))  # an exact duplicate
    out.append(out[1][:2])  # a strict prefix of another sequence
    return out


@pytest.mark.parametrize("cost", [0.0, 0.05, 10.0])
def test_packed_tree_gives_each_token_exactly_its_own_prefix(cost):
    """Brute force over every token of every sequence: the node it maps to holds the token, sits at its position,
    and may attend to exactly the nodes of the sequence's earlier tokens (and itself)."""
    seqs = _sequences()
    packed = pack_sequences(seqs, attention_cost_per_key=cost)
    n, width = packed.input_ids.shape
    flat_ids, flat_pos = packed.input_ids.reshape(-1), packed.position_ids.reshape(-1)
    for s, seq in enumerate(seqs):
        index = packed.token_index[s]
        assert len(index) == len(seq)
        rows = index // width
        assert len(set(rows.tolist())) == 1  # a sequence lives in one pack
        row = int(rows[0])
        for k, tok in enumerate(seq):
            node = int(index[k]) % width
            assert int(flat_ids[index[k]]) == tok and int(flat_pos[index[k]]) == k
            seen = set(torch.nonzero(packed.allowed[row, node]).flatten().tolist())
            assert seen == {int(i) % width for i in index[: k + 1]}
    # shared prefixes are stored once per pack: as many nodes as distinct prefixes of the pack's sequences
    pack_of = [int(packed.token_index[s][0]) // width for s in range(len(seqs))]
    distinct = sum(len({tuple(seq[: k + 1]) for s, seq in enumerate(seqs) if pack_of[s] == r
                        for k in range(len(seq))}) for r in range(n))
    assert packed.num_nodes == distinct
    if cost == 0.0:
        assert n == 1  # without an attention cost everything shares one pack


def test_pack_plan_keeps_sequences_that_share_nothing_apart():
    shared = [[1, 2, 3, 4, 5, 6, 7, 8] + [9 + i] for i in range(4)]
    alone = [[20 + i, 30 + i, 40 + i, 50 + i] for i in range(3)]
    packs = plan_packs(shared + alone, attention_cost_per_key=0.5)
    together = [p for p in packs if set(p) & set(range(4))]
    assert len(together) == 1 and set(together[0]) >= set(range(4))
    assert len(packs) >= 3  # the unrelated sequences do not all join one pack
    assert sorted(i for p in packs for i in p) == list(range(7))


def _model(**kw):
    torch.manual_seed(0)
    model = SharedBaseLM(tiny_backbone(**kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.3 * torch.randn_like(p))
        model.polyak_update(0.5)
    return model


def _mixed_batch(model):
    """Shared and unshared prompts (left-padded), actions of different lengths, and extra prompts (next states)
    that extend a prompt (the shape of a reflection prompt) or share nothing."""
    prompts = ["abcabcabca", "abcabcabca", "abcabcabcb", "hgf", "abcab"]
    actions = ["dd", "ddeef", "a", "bcd", "hhhh"]
    extra = ["abcabcabcaddeef", "gggg"]
    ids, mask = model.encode_prompts(prompts)
    a_ids, a_mask = model.encode_actions(actions)
    x_ids, x_mask = model.encode_prompts(extra)
    return ids, mask, a_ids, a_mask, x_ids, x_mask


@pytest.mark.parametrize("checkpointing", [False, True])
def test_plan_hidden_equals_the_plain_forward_in_values_and_gradients(checkpointing):
    model = _model(gradient_checkpointing=checkpointing)
    model.train()
    ids, mask, a_ids, a_mask, x_ids, x_mask = _mixed_batch(model)
    shared = model.plan(ids, mask, a_ids, a_mask, x_ids, x_mask, share_prefixes=True)
    plain = model.plan(ids, mask, a_ids, a_mask, x_ids, x_mask, share_prefixes=False)
    assert shared.packed is not None and plain.packed is None
    assert shared.tokens_computed < plain.tokens_computed
    real = a_mask.bool()
    g = torch.Generator().manual_seed(1)
    weights = torch.randn(*a_ids.shape, model.hidden_size, generator=g)
    x_weights = torch.randn(x_ids.shape[0], model.hidden_size, generator=g)
    for view in ("reference", "target", "critic", "policy"):
        results = []
        for plan in (shared, plain):
            h, x = model.plan_hidden(view, plan)
            results.append((h, x))
            if view in ("critic", "policy"):
                loss = (h * weights * real[..., None]).sum() + (x * x_weights).sum()
                params = model.critic_parameters() if view == "critic" else model.policy_parameters()
                results[-1] += (torch.autograd.grad(loss, params),)
        (h1, x1, *g1), (h2, x2, *g2) = results
        torch.testing.assert_close(h1[real], h2[real], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x1, x2, rtol=1e-5, atol=1e-5)
        for a, b in zip(g1[0] if g1 else [], g2[0] if g2 else []):
            # float32 sums over ~50 tokens in another order: relative to the gradient's scale
            assert (a - b).abs().max() <= 1e-5 * b.abs().max() + 1e-8
    # the plain path is the model's unbatched forward of each row
    h_plain, _ = model.plan_hidden("policy", plain)
    for b in range(ids.shape[0]):
        p = ids[b][mask[b].bool()]
        n = int(a_mask[b].sum())
        seq = torch.cat([p, a_ids[b, : n - 1]])[None]
        alone = model._hidden("policy", seq, torch.ones_like(seq))[0, len(p) - 1:]
        torch.testing.assert_close(h_plain[b, :n], alone, rtol=1e-5, atol=1e-5)


def test_prefix_sharing_is_off_for_attention_without_custom_masks():
    model = _model()
    ids, mask, a_ids, a_mask, _, _ = _mixed_batch(model)
    assert model.plan(ids, mask, a_ids, a_mask).packed is not None
    model.base_model.config._attn_implementation = "flash_attention_2"  # takes no 4D mask
    assert not model.shares_prefixes
    assert model.plan(ids, mask, a_ids, a_mask).packed is None


def test_generation_with_the_shared_prefix_prefilled_once_equals_plain_generation():
    model = _model()
    model.eval()
    head = "abcdefgh" * 3  # 24 shared characters: above the prefill threshold
    prompts = [head + "a", head + "bc", head + "hhh", head + "ab"]
    ids, mask = model.encode_prompts(prompts)
    assert model._prefilled_inputs(ids, mask) is not None
    greedy = dict(max_new_tokens=6, do_sample=False)
    plain = model.generate_from_ids(ids, mask, share_prefix=False, **greedy)
    shared = model.generate_from_ids(ids, mask, share_prefix=True, **greedy)
    assert torch.equal(plain.action_ids, shared.action_ids) and plain.texts == shared.texts
    assert torch.equal(shared.prompt_ids, ids)  # the prompts as the model read them, left-padded as given
    # sampling: the same seed draws the same tokens (the logits agree to rounding)
    torch.manual_seed(3)
    a = model.generate_from_ids(ids, mask, share_prefix=False, max_new_tokens=6, temperature=1.0)
    torch.manual_seed(3)
    b = model.generate_from_ids(ids, mask, share_prefix=True, max_new_tokens=6, temperature=1.0)
    assert torch.equal(a.action_ids, b.action_ids)
    # no shared prefix worth prefilling: plain generation
    short, short_mask = model.encode_prompts(["ab", "cd"])
    assert model._prefilled_inputs(short, short_mask) is None
