"""Sampling actions from a view with the KV cache; a prompt prefix shared by the whole batch is prefilled once.

Rollout batches usually start from one task prompt (every first attempt reads the same few hundred tokens), and
reflection prompts share their head. Plain ``generate`` prefills every row's prompt on its own; here the longest
prefix common to all rows is run once (batch 1), its key/value cache is repeated for the batch, and ``generate``
continues from it with the rows laid out as ``[shared prefix][padding][rest of the prompt]`` -- the attention mask
hides the padding and positions are counted in real tokens, so every row sees exactly its own prompt.

With ``BackboneConfig.fast_generation`` (the default) the prompt is prefilled by these same calls and the decoding
runs on :mod:`~modules.shared_base.fast_decoding` instead of ``generate``: static key/value buffers, the shared
prefix read once per step, a CUDA graph of the step on CUDA, the same sampling; ``fast_generation: false`` keeps
``generate`` all the way.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = ["Generation", "GenerationMixin"]

#: below this many shared tokens the separate prefill is not worth its overhead
MIN_SHARED_PREFIX = 16


@dataclass
class Generation:
    """A batch of sampled actions (all tensors on the CPU, dtype long).

    prompt_ids    [B, P]  left-padded prompt tokens (exactly what the model was conditioned on)
    prompt_mask   [B, P]  1 for real prompt tokens
    action_ids    [B, L]  generated tokens, right-padded with the pad id; L <= max_new_tokens
    action_mask   [B, L]  1 up to and including the first EOS (or everything when no EOS was produced)
    texts         B decoded actions (special tokens, hence the EOS, removed)
    finished      [B] bool: an EOS was produced (False: cut by max_new_tokens)
    behaviour_log_probs  [B, L] float32 log mu of each action token under the distribution it was drawn from
                  (temperature / top-k / top-p applied; what ``modules.losses.etpo.behaviour_log_probs`` recomputes),
                  0 after the action; only when asked for (``record_log_probs``, fast path), else None
    views         the view each row was sampled from, when the rows were drawn from more than one (``generate``
                  with a list of views), else None
    """

    prompt_ids: Tensor
    prompt_mask: Tensor
    action_ids: Tensor
    action_mask: Tensor
    texts: list[str]
    finished: Tensor
    behaviour_log_probs: Optional[Tensor] = None
    views: Optional[list[str]] = None

    @property
    def lengths(self) -> Tensor:
        """Number of action tokens of every row, [B]."""
        return self.action_mask.sum(1)


def _interleave(parts: Sequence[tuple[list[int], Generation]], pad_id: int, views: list[str]) -> Generation:
    """One :class:`Generation` of ``len(views)`` rows from ``parts``: ``(rows, generation)`` pairs, generation ``k``'s
    row ``j`` going to row ``rows[j]``; prompts re-padded on the left, actions on the right (``pad_id``, mask 0)."""
    n = len(views)
    prompt_w = max(g.prompt_ids.shape[1] for _, g in parts)
    action_w = max(g.action_ids.shape[1] for _, g in parts)
    prompt_ids = torch.full((n, prompt_w), int(pad_id), dtype=torch.long)
    prompt_mask = torch.zeros((n, prompt_w), dtype=torch.long)
    action_ids = torch.full((n, action_w), int(pad_id), dtype=torch.long)
    action_mask = torch.zeros((n, action_w), dtype=torch.long)
    finished = torch.zeros(n, dtype=torch.bool)
    texts: list[str] = [""] * n
    with_log_probs = all(g.behaviour_log_probs is not None for _, g in parts)
    log_probs = torch.zeros((n, action_w), dtype=torch.float32) if with_log_probs else None
    for rows, g in parts:
        p, a = g.prompt_ids.shape[1], g.action_ids.shape[1]
        index = torch.tensor(rows, dtype=torch.long)
        prompt_ids[index, prompt_w - p:] = g.prompt_ids
        prompt_mask[index, prompt_w - p:] = g.prompt_mask
        action_ids[index, :a] = g.action_ids
        action_mask[index, :a] = g.action_mask
        finished[index] = g.finished
        if log_probs is not None:
            log_probs[index, :a] = g.behaviour_log_probs
        for j, row in enumerate(rows):
            texts[row] = g.texts[j]
    return Generation(prompt_ids=prompt_ids, prompt_mask=prompt_mask, action_ids=action_ids, action_mask=action_mask,
                      texts=texts, finished=finished, behaviour_log_probs=log_probs, views=list(views))


def _cache_keyword() -> str:
    # transformers 5.x renamed generate's `past_key_values` to `cache`
    from transformers import GenerationMixin as _HF

    return "cache" if "cache" in inspect.signature(_HF.prepare_inputs_for_generation).parameters else "past_key_values"


class GenerationMixin:
    """Generation methods of :class:`~modules.shared_base.SharedBaseLM`."""

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], max_new_tokens: int = 256, temperature: float = 1.0,
                 top_k: Optional[int] = 0, top_p: float = 1.0, do_sample: bool = True,
                 view: str | Sequence[str] = "policy", stop_strings: Optional[Sequence[str]] = None) -> Generation:
        """Sample one action per prompt from ``view`` (the policy by default; ``reference`` for an untrained
        baseline) with the KV cache. ``top_k`` 0/None and ``top_p`` 1.0 disable those filters; ``do_sample=False``
        is greedy. Generation stops at EOS (:attr:`eos_token_ids`) or after ``max_new_tokens``.
        Seed with ``torch.manual_seed`` for reproducible sampling. ``stop_strings`` end a sequence as soon as its
        text contains one of them (the stop string is kept in the action), e.g. the start of a new top-level block
        after the function an environment asked for: the rest would be discarded by the environment anyway.

        ``view`` may also name one view per prompt: the rows of each view are then sampled together, one batch per
        view in the order the views first appear (each row exactly as a batch of that view alone would sample it),
        and returned in the prompts' order with :attr:`Generation.views` set."""
        if not isinstance(view, str):
            views = list(view)
            if len(views) != len(prompts):
                raise ValueError(f"generate: {len(views)} views for {len(prompts)} prompts (one view per prompt, or "
                                 "one view for all)")
            if len(set(views)) > 1:
                order = list(dict.fromkeys(views))
                parts = []
                for v in order:
                    rows = [i for i, w in enumerate(views) if w == v]
                    parts.append((rows, self.generate([prompts[i] for i in rows], max_new_tokens, temperature, top_k,
                                                      top_p, do_sample, v, stop_strings)))
                return _interleave(parts, self.pad_token_id, views)
            view = views[0] if views else "policy"
        ids, mask = self.encode_prompts(prompts)
        return self.generate_from_ids(ids, mask, max_new_tokens, temperature, top_k, top_p, do_sample, view,
                                      stop_strings)

    @torch.no_grad()
    def generate_from_ids(self, prompt_ids: Tensor, prompt_mask: Tensor, max_new_tokens: int = 256,
                          temperature: float = 1.0, top_k: Optional[int] = 0, top_p: float = 1.0,
                          do_sample: bool = True, view: str = "policy",
                          stop_strings: Optional[Sequence[str]] = None,
                          share_prefix: Optional[bool] = None, fast: Optional[bool] = None,
                          record_log_probs: bool = False) -> Generation:
        """:meth:`generate` for prompts already encoded (left-padded ``[B, P]`` ids and mask). ``share_prefix``
        (default ``config.prefix_sharing``) prefills the prefix common to every row once. ``fast`` (default
        ``config.fast_generation``) decodes on :mod:`~modules.shared_base.fast_decoding` where the model allows it
        (:func:`~modules.shared_base.fast_decoding.fast_path_unsupported`), else through ``generate``.
        ``record_log_probs`` (fast path only) fills :attr:`Generation.behaviour_log_probs`."""
        from transformers import GenerationConfig

        from modules.shared_base.fast_decoding import fast_path_unsupported

        self._check_prompt(prompt_ids, prompt_mask)
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        eos = self.eos_token_ids
        # Every sampling field is explicit: fields left None would be filled from the checkpoint's
        # generation_config.json (some ship temperature / top_p / repetition_penalty defaults).
        # (Greedy decoding ignores them, and transformers warns about those set anyway.)
        sampling = dict(temperature=float(temperature), top_k=int(top_k or 0), top_p=float(top_p)) if do_sample else {}
        gen_cfg = GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=do_sample, repetition_penalty=1.0, num_beams=1,
            pad_token_id=self.pad_token_id, eos_token_id=eos, use_cache=True,
            stop_strings=list(stop_strings) if stop_strings else None, **sampling,
        )
        share = self.config.prefix_sharing if share_prefix is None else share_prefix
        fast = self.config.fast_generation if fast is None else fast
        unsupported = fast_path_unsupported(self) if fast or record_log_probs else None
        if record_log_probs and (not fast or unsupported):
            raise ValueError(f"record_log_probs needs the fast generation path ({unsupported or 'off'})")
        fast = fast and unsupported is None
        was_training = self.training
        # eval: no LoRA dropout while sampling, and gradient checkpointing (active only in training mode) would
        # otherwise switch the KV cache off.
        self.eval()
        log_probs = None
        try:
            if fast:
                out, width, log_probs = self._generate_fast(prompt_ids, prompt_mask, max_new_tokens, do_sample,
                                                            float(temperature), int(top_k or 0), float(top_p), view,
                                                            stop_strings, share, record_log_probs)
            else:
                with self.use_view(view):
                    inputs = self._prefilled_inputs(prompt_ids, prompt_mask) if share else None
                    if inputs is None:
                        inputs = {"input_ids": prompt_ids.to(self.device),
                                  "attention_mask": prompt_mask.to(self.device)}
                    width = inputs["input_ids"].shape[1]
                    out = self.peft_model.generate(**inputs, generation_config=gen_cfg,
                                                   tokenizer=self.tokenizer if stop_strings else None)
        finally:
            self.train(was_training)
        new = out[:, width:].cpu()
        is_eos = torch.isin(new, torch.tensor(eos, dtype=new.dtype))
        # Valid = no EOS strictly before this position; the first EOS itself is part of the action.
        before = is_eos.long().cumsum(1) - is_eos.long()
        action_mask = (before == 0).long()
        if stop_strings:
            action_mask = self._mask_after_stop_strings(new, action_mask, is_eos, stop_strings)
        action_ids = new.masked_fill(action_mask == 0, self.pad_token_id)
        texts = self.tokenizer.batch_decode(
            [row[m.bool()].tolist() for row, m in zip(action_ids, action_mask)], skip_special_tokens=True
        )
        if log_probs is not None:
            log_probs = log_probs.float().cpu().masked_fill(action_mask == 0, 0.0)
        return Generation(prompt_ids=prompt_ids.cpu().long(), prompt_mask=prompt_mask.cpu().long(),
                          action_ids=action_ids, action_mask=action_mask, texts=texts, finished=is_eos.any(1),
                          behaviour_log_probs=log_probs)

    def _generate_fast(self, prompt_ids: Tensor, prompt_mask: Tensor, max_new_tokens: int, do_sample: bool,
                       temperature: float, top_k: int, top_p: float, view: str,
                       stop_strings: Optional[Sequence[str]], share: bool, record_log_probs: bool):
        """The fast path's sampling (:class:`~modules.shared_base.fast_decoding.FastDecoder`): the view's adapter
        merged into the weights for a float32 model, applied as LoRA otherwise. Returns what ``generate`` would:
        (ids ``[B, P' + n]``, the prompt width ``P'``) and the log-probs or None."""
        from modules.shared_base.fast_decoding import FastDecoder, Sampler, fused_step_unsupported, merged_adapter

        sampler = Sampler(do_sample, temperature, top_k, top_p, log_probs=record_log_probs)
        float32 = self.dtype == torch.float32
        fuse = float32 and self.config.fused_decoding and fused_step_unsupported(self) is None
        if fuse:  # the view's weights merged (reference: copied) into fused [q; k; v] and [gate; up] tensors
            context = merged_adapter(self, None if view == "reference" else view, fuse=True)
        elif view != "reference" and float32:
            context = merged_adapter(self, view)
        else:
            context = self.use_view(view)
        with context as fused:
            return FastDecoder(self, fused=fused).run(prompt_ids, prompt_mask, max_new_tokens, sampler,
                                                      self.eos_token_ids, stop_strings, share)

    def _shared_prefix(self, prompt_ids: Tensor, prompt_mask: Tensor) -> tuple[list[Tensor], int]:
        """The unpadded rows and how many tokens at their start every row shares: 0 when fewer than
        :data:`MIN_SHARED_PREFIX` (or a single row) would be shared; every row keeps at least one token of its own."""
        rows = [r[m.bool()] for r, m in zip(prompt_ids.cpu(), prompt_mask.cpu())]
        if len(rows) < 2:
            return rows, 0
        shortest = min(len(r) for r in rows)
        first = rows[0]
        same = torch.stack([r[:shortest] == first[:shortest] for r in rows]).all(0)
        shared = int(same.long().cumprod(0).sum())
        shared = min(shared, shortest - 1)  # every row keeps at least one token for generate's own prefill
        return rows, shared if shared >= MIN_SHARED_PREFIX else 0

    def _prefix_layout(self, rows: Sequence[Tensor], shared: int) -> tuple[Tensor, Tensor]:
        """``[shared prefix][padding][rest of the prompt]`` ids and mask (CPU) of ``rows``."""
        rest = [r[shared:] for r in rows]
        width = max(len(r) for r in rest)
        ids = torch.full((len(rows), shared + width), int(self.pad_token_id), dtype=torch.long)
        mask = torch.zeros_like(ids)
        ids[:, :shared] = rows[0][:shared]
        mask[:, :shared] = 1
        for i, r in enumerate(rest):
            ids[i, shared + width - len(r):] = r
            mask[i, shared + width - len(r):] = 1
        return ids, mask

    def _prefilled_inputs(self, prompt_ids: Tensor, prompt_mask: Tensor) -> Optional[dict]:
        """Inputs for ``generate`` that continue from a once-computed cache of the prefix all rows share, or None
        when fewer than :data:`MIN_SHARED_PREFIX` tokens (or a single row) would be shared."""
        rows, shared = self._shared_prefix(prompt_ids, prompt_mask)
        if not shared:
            return None
        cache = self._prefix_cache(rows[0][:shared])
        cache.batch_repeat_interleave(len(rows))
        ids, mask = self._prefix_layout(rows, shared)
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device), _cache_keyword(): cache}

    def _prefix_cache(self, prefix: Tensor):
        """A ``DynamicCache`` (batch 1) of the view's keys and values over the 1-D token ids ``prefix``."""
        from transformers import DynamicCache

        ids = prefix.unsqueeze(0).to(self.device)
        cache = DynamicCache(config=self.base_model.config)
        # the decoder alone: no logits are needed over the prefix (the adapters of the view apply inside it)
        self._decoder(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, **{_cache_keyword(): cache})
        return cache

    def _mask_after_stop_strings(self, new: Tensor, action_mask: Tensor, is_eos: Tensor,
                                 stop_strings: Sequence[str]) -> Tensor:
        """A sequence that ended on a stop string was padded by ``generate`` after it: those positions (pad
        tokens, or an EOS-valued pad) were never sampled and are not part of the action."""
        mask = action_mask.clone()
        for i in range(new.shape[0]):
            n = int(mask[i].sum())
            has_eos = n > 0 and bool(is_eos[i, n - 1])
            body = new[i, : n - 1] if has_eos else new[i, :n]
            text = self.tokenizer.decode(body.tolist(), skip_special_tokens=True)
            if not any(stop in text for stop in stop_strings):
                continue
            if has_eos:  # the "EOS" after the stop string is padding
                mask[i, n - 1] = 0
            # and any pad run after the last sampled token (pad distinct from EOS)
            tail = (new[i, : len(body)] == self.pad_token_id).flip(0).long().cumprod(0).sum()
            if tail:
                mask[i, len(body) - int(tail): len(body)] = 0
        return mask
