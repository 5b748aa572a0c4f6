"""Shared prompt prefixes computed once: token sequences packed into prefix trees (pure torch, no model).

Most tokens of a rollout batch are prompt tokens that several rows share -- the task prompt of every first attempt,
the worked examples at the head of every reflection prompt. A causal LM's output at a token depends only on the
tokens before it, so a token shared by several sequences *as part of a common prefix* has one output for all of
them. :func:`pack_sequences` inserts the sequences into a prefix tree (a trie) and lays its nodes out as one row:
every distinct prefix token appears once, its position id is its depth, and an attention mask lets each node see
exactly its ancestors. One forward over that row gives, for every token of every sequence, the same hidden state
as a forward over the sequence alone (up to float rounding: the same sums in another order), while the shared
tokens are computed -- and, for trainable views, back-propagated through -- once.

Packing everything into one row is not always cheaper: attention over a row of ``T`` nodes costs ``~T^2`` (masked
entries are computed too), so sequences that share little are better kept apart. The sequences are therefore cut
into several packs (rows of a batch, padded to one width) by a cost model that adds a sequence to the current
pack only when that costs less than giving it a pack of its own (:func:`plan_packs`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["PackedBatch", "pack_sequences", "plan_packs"]


@dataclass
class PackedBatch:
    """Sequences packed into ``n`` prefix-tree rows of width ``T``.

    input_ids       [n, T] long   node tokens (0 on padding nodes)
    position_ids    [n, T] long   node depth = position of the token in every sequence through it
    allowed         [n, T, T] bool  ``allowed[r, i, j]``: node ``j`` is an ancestor of node ``i`` or ``i`` itself
                                   (padding nodes see only themselves, so no attention row is empty)
    token_index     list of [len_s] long: flat index ``row * T + column`` of every token of sequence ``s``
    """

    input_ids: Tensor
    position_ids: Tensor
    allowed: Tensor
    token_index: list[Tensor]

    @property
    def num_nodes(self) -> int:
        """Real (non-padding) nodes over all rows: the tokens a forward actually has to compute."""
        return int(torch.unique(torch.cat(self.token_index)).numel())

    def attention_mask(self, kind: str, dtype: torch.dtype) -> Tensor:
        """The ``[n, 1, T, T]`` mask in the form an attention implementation takes: ``bool`` (True = attend; sdpa,
        flex) or ``additive`` (0 / the dtype's minimum; eager)."""
        mask = self.allowed.unsqueeze(1)
        if kind == "bool":
            return mask
        if kind == "additive":
            return torch.zeros(mask.shape, dtype=dtype).masked_fill_(~mask, torch.finfo(dtype).min)
        raise ValueError(f"unknown mask kind {kind!r}")

    def to(self, device: torch.device | str) -> "PackedBatch":
        return PackedBatch(self.input_ids.to(device), self.position_ids.to(device), self.allowed.to(device),
                           [ix.to(device) for ix in self.token_index])


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def plan_packs(sequences: Sequence[Sequence[int]], attention_cost_per_key: float) -> list[list[int]]:
    """Which sequences share a pack: lists of sequence indices, every index in exactly one list.

    Sequences are visited in lexicographic order, where the longest prefix a sequence shares with any earlier one
    is the one it shares with its predecessor. A pack of ``T`` nodes is modelled to cost ``T * (1 + a * T)`` token
    units (``a = attention_cost_per_key``: the attention work per key relative to the rest of a layer's work per
    token); a sequence joins the current pack when the pack's cost grows by less than the sequence would cost alone
    (``len * (1 + a * len)``). With ``a = 0`` everything goes into one pack.
    """
    if attention_cost_per_key < 0:
        raise ValueError("attention_cost_per_key must be >= 0")
    order = sorted(range(len(sequences)), key=lambda i: list(sequences[i]))
    a = float(attention_cost_per_key)
    cost = lambda t: t * (1.0 + a * t)  # noqa: E731
    packs: list[list[int]] = []
    nodes = 0
    previous: Sequence[int] | None = None
    for i in order:
        seq = sequences[i]
        shared = _common_prefix(previous, seq) if (previous is not None and packs) else 0
        new_nodes = len(seq) - shared
        if packs and cost(nodes + new_nodes) - cost(nodes) <= cost(len(seq)):
            packs[-1].append(i)
            nodes += new_nodes
        else:
            packs.append([i])
            nodes = len(seq)
        previous = seq
    return packs


def pack_sequences(sequences: Sequence[Sequence[int]], attention_cost_per_key: float = 0.0) -> PackedBatch:
    """Pack ``sequences`` (lists of token ids, each non-empty) into prefix-tree rows (see the module docstring)."""
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("pack_sequences needs at least one sequence and no empty sequence")
    packs = plan_packs(sequences, attention_cost_per_key)
    rows: list[tuple[list[int], list[int], list[int]]] = []  # per pack: tokens, depths, parents
    node_of: list[list[int]] = [[] for _ in sequences]
    for pack in packs:
        tokens: list[int] = []
        depths: list[int] = []
        parents: list[int] = []
        children: list[dict[int, int]] = [{}]  # children[0] = the (virtual) root; node k is children index k + 1
        for s in pack:
            here = 0
            path = []
            for depth, tok in enumerate(sequences[s]):
                nxt = children[here].get(tok)
                if nxt is None:
                    nxt = len(tokens) + 1
                    children[here][tok] = nxt
                    children.append({})
                    tokens.append(int(tok))
                    depths.append(depth)
                    parents.append(here - 1)
                here = nxt
                path.append(nxt - 1)
            node_of[s] = path
        rows.append((tokens, depths, parents))
    width = max(len(t) for t, _, _ in rows)
    n = len(rows)
    input_ids = torch.zeros((n, width), dtype=torch.long)
    position_ids = torch.zeros((n, width), dtype=torch.long)
    allowed = torch.zeros((n, width, width), dtype=torch.bool)
    allowed[:, torch.arange(width), torch.arange(width)] = True  # every node (padding too) sees itself
    token_index: list[Tensor] = [torch.empty(0, dtype=torch.long)] * len(sequences)
    for r, (pack, (tokens, depths, _)) in enumerate(zip(packs, rows)):
        input_ids[r, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        position_ids[r, : len(tokens)] = torch.tensor(depths, dtype=torch.long)
        for s in pack:
            path = torch.tensor(node_of[s], dtype=torch.long)
            # along one root-to-leaf path, node path[k] sees path[:k + 1]; entries off the path stay as they are,
            # and on the path "j is above i" holds for exactly the lower triangle
            allowed[r][path.unsqueeze(1), path.unsqueeze(0)] = torch.ones(len(path), len(path), dtype=torch.bool).tril()
            token_index[s] = r * width + path
    return PackedBatch(input_ids, position_ids, allowed, token_index)
