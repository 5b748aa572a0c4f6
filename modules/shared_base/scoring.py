"""Scoring: hidden states and logits of any view over (prompt, action) batches, with shared prefixes computed once.

Conventions shared by every scoring method:

* prompts are **left**-padded: ``prompt_ids [B, P]`` with ``prompt_mask [B, P]`` (1 = real token), so that
  column ``P - 1`` is the last real prompt token of every row;
* actions are **right**-padded: ``action_ids [B, L]`` with ``action_mask [B, L]``;
* row ``j`` of an action-aligned tensor ``[B, L, ...]`` is the model output at the position just *before* action
  token ``j``, i.e. the distribution over the choice of action token ``j`` given the prompt and action tokens
  ``< j``; rows where ``action_mask == 0`` hold meaningless values and must be masked by the caller;
* positions are counted in real tokens, so padding never changes a result; masks are never derived from token ids
  (the pad token may equal EOS).

Memory: the full ``[B, L, V]`` logits of a long batch are large, so scoring comes in two layers: forwards that
return final-norm hidden states (``[B, L, H]``) and the shared frozen vocabulary head (:meth:`ScoringMixin.head`)
that callers apply chunk by chunk (:meth:`ScoringMixin.head_chunks`, the one chunking helper).

Speed: :meth:`ScoringMixin.plan` lays a batch out for the forwards. With ``config.prefix_sharing`` (and an
attention implementation that takes an arbitrary mask: sdpa or eager) the sequences are packed into prefix trees
(:mod:`modules.shared_base.packing`): a token shared by several rows as part of a common prefix is computed once
per view; otherwise every sequence is one left-padded row (the plain computation, kept as the reference).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from modules.shared_base.packing import PackedBatch, pack_sequences
from modules.shared_base.views import FROZEN_VIEWS

__all__ = ["ScoringMixin", "ScoringPlan", "token_chunks"]

#: attention implementations that accept a custom 4D mask, and the form they take it in
_MASK_KIND = {"sdpa": "bool", "eager": "additive"}


def token_chunks(length: int, chunk_size: int) -> Iterator[slice]:
    """Consecutive slices of at most ``chunk_size`` positions covering ``range(length)``."""
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    for start in range(0, length, chunk_size):
        yield slice(start, min(length, start + chunk_size))


@dataclass
class ScoringPlan:
    """How one batch is laid out for the forwards of every view, and where each output row sits.

    ``packed`` (prefix trees) or ``ids``/``mask`` (one left-padded row per sequence) is the forward's input;
    ``action_index [B, L]`` and ``extra_index [K]`` are flat indices into the forward's ``[rows * width, H]`` output:
    the hidden state that chooses action token ``j`` of row ``b``, and the last token of extra prompt ``k``."""

    action_index: Tensor
    action_mask: Tensor
    extra_index: Optional[Tensor]
    packed: Optional[PackedBatch] = None
    ids: Optional[Tensor] = None
    mask: Optional[Tensor] = None
    sequence_tokens: int = 0  # real tokens of all rows' sequences: what the plain computation runs without padding

    @property
    def tokens_computed(self) -> int:
        """Token positions one forward over this plan computes (padding included)."""
        source = self.packed.input_ids if self.packed is not None else self.ids
        return int(source.numel())


class ScoringMixin:
    """Scoring methods of :class:`~modules.shared_base.SharedBaseLM`."""

    # ---- tokenisation ------------------------------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Tokenise prompts exactly as :meth:`generate` does: ``(prompt_ids [B, P], prompt_mask [B, P])``, long,
        left-padded, on the CPU. Applies the chat template when ``config.use_chat_template`` and left-truncates to
        ``config.max_prompt_tokens``. Use it for ``next_prompt_ids`` so that s_{t+1} is encoded like s_t."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a sequence of strings, not a string")
        tok = self.tokenizer
        texts = list(prompts)
        add_special = True
        if self.config.use_chat_template:
            texts = [
                tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                for p in texts
            ]
            add_special = False  # the template already contains BOS where the model wants one
        limit = self.config.max_prompt_tokens
        enc = tok(texts, padding=True, truncation=limit is not None, max_length=limit,
                  add_special_tokens=add_special, return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"]
        if ids.shape[1] == 0 or (mask.sum(1) == 0).any():
            raise ValueError("every prompt must encode to at least one token")
        return ids.long(), mask.long()

    def encode_actions(self, actions: Sequence[str], append_eos: bool = True) -> tuple[Tensor, Tensor]:
        """Tokenise action strings without special tokens (plus EOS when ``append_eos``), right-padded:
        ``(action_ids [B, L], action_mask [B, L])`` long on the CPU. For scoring given texts (e.g. tests,
        demonstrations); generated actions come with their ids in :class:`Generation`."""
        rows = [self.tokenizer(a, add_special_tokens=False)["input_ids"] for a in actions]
        if append_eos:
            rows = [r + [self.tokenizer.eos_token_id] for r in rows]
        length = max(1, max(len(r) for r in rows))
        ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
        return ids, mask

    # ---- forwards ----------------------------------------------------------------------------------------------
    def _decode(self, view: str, **inputs) -> Tensor:
        """Final-norm hidden states of ``view``; target and reference never build a graph."""
        grad = torch.no_grad() if view in FROZEN_VIEWS else contextlib.nullcontext()
        with self.use_view(view), grad:
            out = self._decoder(use_cache=False, **inputs)
        return out.last_hidden_state

    def _hidden(self, view: str, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Final-norm hidden states [B, T, H] of ``view`` over a left-padded batch."""
        input_ids = input_ids.to(self.device, torch.long)
        attention_mask = attention_mask.to(self.device, torch.long)
        # Position of every token = number of real tokens before it, so a left-padded row sees the same
        # positions as the same row unpadded.
        position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
        return self._decode(view, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)

    @staticmethod
    def _check_prompt(prompt_ids: Tensor, prompt_mask: Tensor) -> None:
        if prompt_ids.dim() != 2 or prompt_ids.shape != prompt_mask.shape:
            raise ValueError(f"prompt_ids {tuple(prompt_ids.shape)} and prompt_mask {tuple(prompt_mask.shape)}")
        if not bool(prompt_mask[:, -1].bool().all()):
            raise ValueError("prompts must be left-padded: the last column of prompt_mask must be all ones")

    def _check_actions(self, prompt_ids: Tensor, action_ids: Tensor, action_mask: Tensor) -> None:
        if action_ids.dim() != 2 or action_ids.shape != action_mask.shape or action_ids.shape[0] != prompt_ids.shape[0]:
            raise ValueError(f"action_ids {tuple(action_ids.shape)} / action_mask {tuple(action_mask.shape)} "
                             f"do not match prompt batch {prompt_ids.shape[0]}")
        if action_ids.shape[1] == 0:
            raise ValueError("actions must have at least one column")

    # ---- planning: shared prefixes once ------------------------------------------------------------------------
    @property
    def shares_prefixes(self) -> bool:
        """Whether :meth:`plan` packs shared prefixes: ``config.prefix_sharing`` and an attention implementation
        that takes a custom mask (flash-attention does not: then every sequence is its own row)."""
        return bool(self.config.prefix_sharing) and self._attn_implementation in _MASK_KIND

    @property
    def _attn_implementation(self) -> str:
        return str(getattr(self.base_model.config, "_attn_implementation", "eager"))

    def attention_cost_per_key(self) -> float:
        """Attention work per (query, key) pair relative to the other work of a layer per token, from the model
        config (``~3e-4`` for SmolLM2-135M, ``~4e-5`` for a 7B Llama): the cost model of prefix packing."""
        cfg = self.base_model.config
        try:
            hidden = cfg.hidden_size
            heads = cfg.num_attention_heads
            head_dim = getattr(cfg, "head_dim", None) or hidden // heads
            kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
            linear = hidden * heads * head_dim * 2 + 2 * hidden * kv_heads * head_dim + 3 * hidden * cfg.intermediate_size
        except (AttributeError, TypeError, ZeroDivisionError):
            return 0.0
        return 2.0 * heads * head_dim / float(linear)

    def plan(self, prompt_ids: Tensor, prompt_mask: Tensor, action_ids: Tensor, action_mask: Tensor,
             extra_prompt_ids: Optional[Tensor] = None, extra_prompt_mask: Optional[Tensor] = None,
             share_prefixes: Optional[bool] = None) -> ScoringPlan:
        """Lay out ``B`` (prompt, action) rows -- and optionally ``K`` extra bare prompts whose last-token states are
        wanted (e.g. the next states of transitions) -- for one forward per view (:meth:`plan_hidden`).

        The sequence of row ``b`` is its real prompt tokens followed by its action tokens but the last (which
        predicts nothing needed). ``share_prefixes`` overrides :attr:`shares_prefixes`."""
        self._check_prompt(prompt_ids, prompt_mask)
        self._check_actions(prompt_ids, action_ids, action_mask)
        pm, am = prompt_mask.cpu().bool(), action_mask.cpu().bool()
        prompts = [row[m].tolist() for row, m in zip(prompt_ids.cpu(), pm)]
        lengths = am.long().sum(1).tolist()
        actions = [row[: n].tolist() for row, n in zip(action_ids.cpu(), lengths)]
        sequences = [p + a[:-1] for p, a in zip(prompts, actions)]
        extras: list[list[int]] = []
        if extra_prompt_ids is not None and extra_prompt_ids.shape[0] > 0:
            self._check_prompt(extra_prompt_ids, extra_prompt_mask)
            extras = [row[m.bool()].tolist() for row, m in zip(extra_prompt_ids.cpu(), extra_prompt_mask.cpu())]
        all_sequences = sequences + extras
        width_l = action_ids.shape[1]
        share = self.shares_prefixes if share_prefixes is None else bool(share_prefixes) and \
            self._attn_implementation in _MASK_KIND
        if share:
            packed = pack_sequences(all_sequences, self.attention_cost_per_key())
            positions = packed.token_index
            ids = mask = None
        else:
            packed = None
            width = max(len(s) for s in all_sequences)
            ids = torch.full((len(all_sequences), width), int(self.pad_token_id), dtype=torch.long)
            mask = torch.zeros((len(all_sequences), width), dtype=torch.long)
            positions = []
            for r, s in enumerate(all_sequences):
                ids[r, width - len(s):] = torch.tensor(s, dtype=torch.long)
                mask[r, width - len(s):] = 1
                positions.append(r * width + torch.arange(width - len(s), width))
        action_index = torch.empty((len(sequences), width_l), dtype=torch.long)
        for b, (p, n) in enumerate(zip(prompts, lengths)):
            pos = positions[b]
            # token j of the action is chosen at the sequence position len(p) - 1 + j (the last prompt token for
            # j = 0); padding columns repeat a real position and are masked by the caller
            cols = torch.arange(width_l).clamp(max=max(n, 1) - 1)
            action_index[b] = pos[len(p) - 1 + cols]
        extra_index = torch.stack([positions[len(sequences) + k][-1] for k in range(len(extras))]) if extras else None
        device = self.device
        return ScoringPlan(action_index=action_index.to(device), action_mask=action_mask.to(device),
                           extra_index=None if extra_index is None else extra_index.to(device),
                           packed=None if packed is None else packed.to(device),
                           ids=None if ids is None else ids.to(device), mask=None if mask is None else mask.to(device),
                           sequence_tokens=sum(len(seq) for seq in all_sequences))

    def plan_hidden(self, view: str, plan: ScoringPlan) -> tuple[Tensor, Optional[Tensor]]:
        """One forward of ``view`` over ``plan``: action-aligned hidden states ``[B, L, H]`` and the last-token
        states of the extra prompts ``[K, H]`` (None without extra prompts); model dtype, on the model device."""
        if plan.packed is not None:
            pk = plan.packed
            out = self._decode(view, input_ids=pk.input_ids,
                               attention_mask=pk.attention_mask(_MASK_KIND[self._attn_implementation], self.dtype),
                               position_ids=pk.position_ids)
        else:
            out = self._hidden(view, plan.ids, plan.mask)
        flat = out.reshape(-1, out.shape[-1])
        extra = flat[plan.extra_index] if plan.extra_index is not None else None
        return flat[plan.action_index], extra

    # ---- hidden states and logits ------------------------------------------------------------------------------
    def action_hidden(self, view: str, prompt_ids: Tensor, prompt_mask: Tensor, action_ids: Tensor,
                      action_mask: Tensor, share_prefixes: Optional[bool] = None) -> Tensor:
        """Hidden states (after the final norm) aligned to the action tokens: ``[B, L, H]`` in the model dtype,
        on the model device. Row j = output at the position before action token j (see module docstring).
        No vocabulary-sized tensor is computed. ``share_prefixes=False`` forces the plain computation."""
        plan = self.plan(prompt_ids, prompt_mask, action_ids, action_mask, share_prefixes=share_prefixes)
        return self.plan_hidden(view, plan)[0]

    def head(self, hidden: Tensor) -> Tensor:
        """The shared, frozen vocabulary head: ``[..., H] -> [..., V]`` float32 logits.

        For a 16-bit model with ``config.head_fp32`` the matmul produces float32 output directly (CUDA, no grad)
        or runs on float32 copies of its operands: rounding logits to bf16 would quantise Q-values to ~0.1 at
        magnitude 16, which exp(Q / beta) with beta = 0.01 turns into factors of e^10.
        """
        lm_head = self._lm_head
        w, b = lm_head.weight, getattr(lm_head, "bias", None)
        if hidden.dtype == torch.float32 and w.dtype == torch.float32:
            return F.linear(hidden, w, b)
        if not self.config.head_fp32:
            return F.linear(hidden.to(w.dtype), w, b).float()
        flat = hidden.reshape(-1, hidden.shape[-1]).to(w.dtype)
        out = None
        # torch.mm(..., out_dtype=float32) has no autograd formula, so it serves only grad-free calls.
        if flat.is_cuda and not (torch.is_grad_enabled() and flat.requires_grad):
            try:
                out = torch.mm(flat, w.t(), out_dtype=torch.float32)
            except (RuntimeError, TypeError, NotImplementedError):
                out = None
        if out is None:
            out = flat.float() @ w.t().float()
        if b is not None:
            out = out + b.float()
        return out.reshape(*hidden.shape[:-1], w.shape[0])

    def head_rows(self, hidden: Tensor, token_ids: Tensor) -> Tensor:
        """``head(hidden)[..., token_ids]`` without the vocabulary-sized product: the logit of one given token per
        position (float32, differentiable w.r.t. ``hidden``). E.g. Q of the taken token for a critic loss."""
        w = self._lm_head.weight
        b = getattr(self._lm_head, "bias", None)
        rows = w[token_ids.to(w.device).long()].float()
        out = (hidden.float() * rows).sum(-1)
        if b is not None:
            out = out + b.float()[token_ids.long()]
        return out

    def head_chunks(self, hidden: Tensor, chunk_size: int = 64) -> Iterator[tuple[slice, Tensor]]:
        """``(positions, head(hidden[:, positions]))`` for consecutive chunks of the sequence dimension: the one
        helper through which the project evaluates vocabulary-sized tensors (float32 ``[B, c, V]``, c <= chunk_size),
        so that no ``[B, L, V]`` tensor has to exist at once."""
        for sl in token_chunks(hidden.shape[1], chunk_size):
            yield sl, self.head(hidden[:, sl])

    def chunked_head_loss(self, hidden: Tensor, chunk_loss: Callable[[slice, Tensor], Tensor],
                          chunk_size: int = 64) -> Tensor:
        """``sum over chunks of chunk_loss(positions, head(hidden[:, positions]))`` as a surrogate whose value is that
        sum and whose gradient is its gradient -- without ever holding more than one chunk's vocabulary-sized graph.

        Each chunk's loss is built in a small local graph (the head only) and reduced at once to ``dL/dh``
        (``[B, c, H]``); one backward of ``sum(h * dL/dh)`` then carries the exact gradient through the transformer
        (the standard chunked-loss technique). ``chunk_loss`` returns a scalar; statistics it wants can be taken
        from its detached inputs."""
        grad = torch.zeros_like(hidden, dtype=torch.float32)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for sl in token_chunks(hidden.shape[1], chunk_size):
            leaf = hidden[:, sl].detach().requires_grad_(hidden.requires_grad)
            with torch.enable_grad():
                loss = chunk_loss(sl, self.head(leaf))
                if hidden.requires_grad:
                    grad[:, sl] = torch.autograd.grad(loss, leaf)[0].float()
            total = total + loss.detach().float()
        surrogate = (hidden.float() * grad).sum()
        return surrogate - surrogate.detach() + total

    def action_logits(self, view: str, prompt_ids: Tensor, prompt_mask: Tensor, action_ids: Tensor,
                      action_mask: Tensor) -> Tensor:
        """``head(action_hidden(...))``: float32 ``[B, L, V]``. Row j = logits over the choice of action token j.
        Large; prefer :meth:`head_chunks` for long batches."""
        return self.head(self.action_hidden(view, prompt_ids, prompt_mask, action_ids, action_mask))

    def action_logprobs(self, view: str, prompt_ids: Tensor, prompt_mask: Tensor, action_ids: Tensor,
                        action_mask: Tensor, chunk_size: int = 128) -> Tensor:
        """Log-probability of every taken action token under ``view``: float32 ``[B, L]``, 0 where
        ``action_mask == 0``. Computed chunk by chunk."""
        hidden = self.action_hidden(view, prompt_ids, prompt_mask, action_ids, action_mask)
        return self.taken_logprobs(hidden, action_ids, chunk_size) * action_mask.to(self.device, torch.float32)

    def taken_logprobs(self, hidden: Tensor, action_ids: Tensor, chunk_size: int = 128) -> Tensor:
        """``log pi(w_j | ctx_j)`` of the taken tokens from a view's action hidden states, the head applied chunk
        by chunk: float32 ``[B, L]``, padding positions not masked. Differentiable when ``hidden`` is."""
        ids = action_ids.to(hidden.device)
        parts = [torch.log_softmax(logits, -1).gather(-1, ids[:, sl, None]).squeeze(-1)
                 for sl, logits in self.head_chunks(hidden, chunk_size)]
        return torch.cat(parts, 1)

    def prompt_last_hidden(self, view: str, prompt_ids: Tensor, prompt_mask: Tensor) -> Tensor:
        """Final-norm hidden state at the last prompt token: ``[B, H]`` (model dtype) -- the state from which the
        first action token is chosen (e.g. for a scalar value head)."""
        self._check_prompt(prompt_ids, prompt_mask)
        return self._hidden(view, prompt_ids, prompt_mask)[:, -1]

    def first_token_logits(self, view: str, prompt_ids: Tensor, prompt_mask: Tensor) -> Tensor:
        """float32 logits ``[B, V]`` over the first action token after each prompt (e.g. V(s_{t+1}))."""
        return self.head(self.prompt_last_hidden(view, prompt_ids, prompt_mask))
