"""One frozen base LLM serving the four views ETPO needs (docs/architecture.md, "modules.shared_base").

=============  ===========================================  ==========================================
view           what it is                                   how it is realised
=============  ===========================================  ==========================================
``policy``     pi_theta, trained                            base + LoRA adapter ``"policy"``
``critic``     Q_phi (logits = Q of every next token)       base + LoRA adapter ``"critic"``
``target``     Q_phibar, Polyak average of the critic        base + LoRA adapter ``"target"`` (frozen)
``reference``  pi_bar, frozen                               base with every adapter disabled
=============  ===========================================  ==========================================

LoRA ``B`` matrices start at zero, so at initialisation all four views compute exactly the base model's
logits. The base weights exist once in memory; the adapters add ``3 * r * (d_in + d_out)`` numbers per adapted
linear layer.

Conventions shared by every scoring method:

* prompts are **left**-padded: ``prompt_ids [B, P]`` with ``prompt_mask [B, P]`` (1 = real token), so that
  column ``P - 1`` is the last real prompt token of every row;
* actions are **right**-padded: ``action_ids [B, L]`` with ``action_mask [B, L]``;
* row ``j`` of an action-aligned tensor ``[B, L, ...]`` is the model output at the position just *before* action
  token ``j``, i.e. the distribution over the choice of action token ``j`` given the prompt and action tokens
  ``< j``; rows where ``action_mask == 0`` hold meaningless values and must be masked by the caller;
* position ids are computed from the attention mask, so left padding does not change any result;
* masks are never derived from token ids (the pad token may equal EOS).

Memory: the full ``[B, L, V]`` logits of a long batch are large, so the methods come in two layers: a forward
that returns final-norm hidden states (:meth:`SharedBaseLM.action_hidden`, ``[B, L, H]``) and the shared frozen
vocabulary head (:meth:`SharedBaseLM.head`) that callers apply chunk by chunk
(:meth:`SharedBaseLM.iter_action_logits`, :meth:`SharedBaseLM.reduce_head_chunks`).
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modules.loading import BackboneConfig, load_backbone, prepare_tokenizer, save_backbone_config

VIEWS = ("policy", "critic", "target", "reference")
ADAPTERS = ("policy", "critic", "target")
_FROZEN_VIEWS = ("target", "reference")

__all__ = ["ADAPTERS", "VIEWS", "BackboneConfig", "Generation", "SharedBaseLM", "resident_weight_bytes"]


@dataclass
class Generation:
    """A batch of sampled actions (all tensors on the CPU, dtype long).

    prompt_ids    [B, P]  left-padded prompt tokens (exactly what the model was conditioned on)
    prompt_mask   [B, P]  1 for real prompt tokens
    action_ids    [B, L]  generated tokens, right-padded with the pad id; L <= max_new_tokens
    action_mask   [B, L]  1 up to and including the first EOS (or everything when no EOS was produced)
    texts         B decoded actions (special tokens, hence the EOS, removed)
    finished      [B] bool: an EOS was produced (False: cut by max_new_tokens)
    """

    prompt_ids: Tensor
    prompt_mask: Tensor
    action_ids: Tensor
    action_mask: Tensor
    texts: list[str]
    finished: Tensor

    @property
    def lengths(self) -> Tensor:
        """Number of action tokens of every row, [B]."""
        return self.action_mask.sum(1)


def resident_weight_bytes(module: nn.Module) -> int:
    """Bytes of all parameters and buffers of ``module``, each underlying storage counted once (tied or
    shared weights are not double counted)."""
    seen: dict[tuple, int] = {}
    for t in list(module.parameters()) + list(module.buffers()):
        storage = t.untyped_storage()
        seen[(t.device.type, t.device.index, storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


class SharedBaseLM(nn.Module):
    """The model layer: one frozen base model, LoRA adapters ``policy`` / ``critic`` / ``target``, the reference.

    ``SharedBaseLM(config)`` loads the base as described by :class:`~modules.loading.BackboneConfig`;
    ``SharedBaseLM(config, model=..., tokenizer=...)`` wraps an already loaded transformers causal LM (whose
    parameters are then frozen in place; it must not be used elsewhere afterwards).

    Gradients: ``policy_parameters()`` and ``critic_parameters()`` always have ``requires_grad=True`` -- also
    right after a forward through another view -- so one optimizer with two param groups and one backward
    through losses on both views trains both. ``target`` and base parameters never require grad, and the
    ``target`` / ``reference`` views always run under ``torch.no_grad()``.
    """

    def __init__(self, config: Optional[BackboneConfig] = None, *, model=None, tokenizer=None):
        super().__init__()
        from peft import LoraConfig, get_peft_model

        self.config = config if config is not None else BackboneConfig()
        cfg = self.config
        if model is None:
            model, tokenizer = load_backbone(cfg)
        else:
            if tokenizer is None:
                raise ValueError("pass the tokenizer together with the model")
            model.eval()
            model.requires_grad_(False)
            prepare_tokenizer(tokenizer, model)
        self.tokenizer = tokenizer
        self._active: Optional[str] = None  # the adapter peft has active
        self._view: str = "policy"  # the view forward passes compute right now
        if cfg.gradient_checkpointing:
            self._enable_checkpointing(model)

        lora = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=list(cfg.lora_target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        )
        # The random LoRA-A initialisation is drawn from cfg.seed, not from whatever the global RNG holds.
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            # peft reads the deprecated `is_gradient_checkpointing` attribute of transformers models.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            torch.manual_seed(cfg.seed)
            self.peft_model = get_peft_model(model, lora, adapter_name="policy")
            self.peft_model.add_adapter("critic", lora)
            self.peft_model.add_adapter("target", lora)

        self._params: dict[str, list[tuple[str, nn.Parameter]]] = {a: [] for a in ADAPTERS}
        for name, p in self.named_parameters():
            parts = name.split(".")
            if not any(part.startswith("lora_") for part in parts):
                continue
            roles = [a for a in ADAPTERS if a in parts]
            if len(roles) == 1:
                self._params[roles[0]].append((name, p))
        n = {a: len(v) for a, v in self._params.items()}
        if not n["policy"] or len(set(n.values())) != 1:
            raise RuntimeError(f"unexpected LoRA parameter layout {n}; check lora_target_modules")
        # Pairs (target, critic) by name, for the Polyak update and for syncing.
        critic_by_name = dict(self._params["critic"])
        self._target_pairs = []
        for name, p in self._params["target"]:
            parts = name.split(".")
            parts[parts.index("target")] = "critic"
            self._target_pairs.append((p, critic_by_name[".".join(parts)]))
        self.sync_target()

        self._activate("policy")

        # state_dict bookkeeping (see _state_dict_post_hook): computed before the hooks exist.
        self._adapter_keys = {name for a in ADAPTERS for name, _ in self._params[a]}
        self._base_keys = set(self.state_dict(keep_vars=True).keys()) - self._adapter_keys
        self._load_prefix = ""
        self.register_state_dict_post_hook(SharedBaseLM._state_dict_post_hook)
        self.register_load_state_dict_pre_hook(SharedBaseLM._load_state_dict_pre_hook)
        self.register_load_state_dict_post_hook(SharedBaseLM._load_state_dict_post_hook)

    # ------------------------------------------------------------------------------------------------------------
    # basic properties
    # ------------------------------------------------------------------------------------------------------------

    @property
    def base_model(self):
        """The transformers causal LM (its adapted linear layers are peft LoRA layers)."""
        return self.peft_model.get_base_model()

    @property
    def _decoder(self) -> nn.Module:
        # The inner decoder (e.g. LlamaModel): called directly so that no logits are computed over the prompt.
        base = self.base_model
        return getattr(base, base.base_model_prefix)

    @property
    def _lm_head(self) -> nn.Module:
        return self.base_model.get_output_embeddings()

    @property
    def device(self) -> torch.device:
        return self._lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the base weights (and of hidden states)."""
        return self._lm_head.weight.dtype

    @property
    def vocab_size(self) -> int:
        """Rows of the vocabulary head (may exceed ``len(tokenizer)``)."""
        return self._lm_head.weight.shape[0]

    @property
    def hidden_size(self) -> int:
        return self._lm_head.weight.shape[1]

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def eos_token_ids(self) -> list[int]:
        """Every token id that ends an action: the tokenizer's EOS plus those of the generation config."""
        ids = [self.tokenizer.eos_token_id]
        extra = getattr(getattr(self.base_model, "generation_config", None), "eos_token_id", None)
        if extra is not None:
            ids += extra if isinstance(extra, (list, tuple)) else [extra]
        return sorted({int(i) for i in ids if i is not None})

    # ------------------------------------------------------------------------------------------------------------
    # parameters and views
    # ------------------------------------------------------------------------------------------------------------

    def policy_parameters(self) -> list[nn.Parameter]:
        """The trainable LoRA weights of the policy adapter."""
        return [p for _, p in self._params["policy"]]

    def critic_parameters(self) -> list[nn.Parameter]:
        """The trainable LoRA weights of the critic adapter (disjoint from the policy's)."""
        return [p for _, p in self._params["critic"]]

    def target_parameters(self) -> list[nn.Parameter]:
        """The frozen LoRA weights of the target adapter (changed only by :meth:`polyak_update`)."""
        return [p for _, p in self._params["target"]]

    def _fix_requires_grad(self) -> None:
        # peft's set_adapter / disable_adapter set requires_grad=False on every inactive adapter. A graph built
        # through the policy view would then silently lose its gradients if the critic view is activated before
        # backward (AccumulateGrad skips leaves whose requires_grad is False), so the flags are restored after
        # every switch.
        for a, flag in (("policy", True), ("critic", True), ("target", False)):
            for _, p in self._params[a]:
                if p.requires_grad != flag:
                    p.requires_grad_(flag)

    def _reset_view(self) -> None:
        # After peft touched adapter state behind our back (loading): re-activate the policy from scratch.
        self._active = None
        self._activate("policy")
        self._view = "policy"

    def _activate(self, adapter: str) -> None:
        if self._active != adapter:
            self.peft_model.set_adapter(adapter)
            self._active = adapter
            self._fix_requires_grad()

    @contextlib.contextmanager
    def use_view(self, view: str) -> Iterator[None]:
        """Context in which forward passes of the peft model compute ``view`` (one of :data:`VIEWS`).

        Scoring methods use it internally; it is public for callers that need the raw model (e.g. a custom
        forward). It does not switch off gradients; the scoring methods do that for target and reference.
        An adapter view stays active after the block (harmless: every scoring call activates its own view).
        """
        if view not in VIEWS:
            raise ValueError(f"unknown view {view!r}; use one of {VIEWS}")
        if view == "reference":
            if self._view == "reference":  # nested
                yield
                return
            try:
                with self.peft_model.disable_adapter():
                    self._view = "reference"
                    yield
            finally:
                self._view = self._active
                self._fix_requires_grad()
        else:
            if self._view == "reference":
                # peft keeps every adapter disabled until the reference block ends
                raise RuntimeError(f"cannot compute the {view!r} view inside a use_view('reference') block")
            self._activate(view)
            self._view = view
            yield

    # Gradient checkpointing recomputes each block during backward, when another view may be active (the policy
    # and critic graphs of one step share one backward). torch's non-reentrant checkpoint accepts a context_fn whose
    # second context wraps the recomputation: it re-activates the view that the original forward ran under.

    def _checkpoint_contexts(self):
        return contextlib.nullcontext(), self._replay_view(self._view)

    @contextlib.contextmanager
    def _replay_view(self, view: str) -> Iterator[None]:
        previous = self._view
        if view == previous:
            yield
            return
        with self.use_view(view):
            yield
        if previous != "reference":
            self._activate(previous)
            self._view = previous

    def _enable_checkpointing(self, model) -> None:
        kwargs = {"use_reentrant": False, "context_fn": self._checkpoint_contexts}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    # ------------------------------------------------------------------------------------------------------------
    # tokenisation
    # ------------------------------------------------------------------------------------------------------------

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
        enc = tok(
            texts,
            padding=True,
            truncation=limit is not None,
            max_length=limit,
            add_special_tokens=add_special,
            return_tensors="pt",
        )
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

    # ------------------------------------------------------------------------------------------------------------
    # scoring
    # ------------------------------------------------------------------------------------------------------------

    def _hidden(self, view: str, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Final-norm hidden states [B, T, H] of ``view`` over a left-padded batch."""
        input_ids = input_ids.to(self.device, torch.long)
        attention_mask = attention_mask.to(self.device, torch.long)
        # Position of every token = number of real tokens before it, so a left-padded row sees the same
        # positions as the same row unpadded.
        position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
        grad = contextlib.nullcontext() if view not in _FROZEN_VIEWS else torch.no_grad()
        with self.use_view(view), grad:
            out = self._decoder(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            )
        return out.last_hidden_state

    @staticmethod
    def _check_prompt(prompt_ids: Tensor, prompt_mask: Tensor) -> None:
        if prompt_ids.dim() != 2 or prompt_ids.shape != prompt_mask.shape:
            raise ValueError(f"prompt_ids {tuple(prompt_ids.shape)} and prompt_mask {tuple(prompt_mask.shape)}")
        if not bool(prompt_mask[:, -1].bool().all()):
            raise ValueError("prompts must be left-padded: the last column of prompt_mask must be all ones")

    def action_hidden(
        self, view: str, prompt_ids: Tensor, prompt_mask: Tensor, action_ids: Tensor, action_mask: Tensor
    ) -> Tensor:
        """Hidden states (after the final norm) aligned to the action tokens: ``[B, L, H]`` in the model dtype,
        on the model device. Row j = output at the position before action token j (see module docstring).

        One forward over ``prompt + action[:, :-1]``; no vocabulary-sized tensor is computed.
        """
        self._check_prompt(prompt_ids, prompt_mask)
        if action_ids.dim() != 2 or action_ids.shape != action_mask.shape or action_ids.shape[0] != prompt_ids.shape[0]:
            raise ValueError(f"action_ids {tuple(action_ids.shape)} / action_mask {tuple(action_mask.shape)} "
                             f"do not match prompt batch {prompt_ids.shape[0]}")
        if action_ids.shape[1] == 0:
            raise ValueError("actions must have at least one column")
        p = prompt_ids.shape[1]
        # The last action token predicts nothing we need, so it is not fed.
        ids = torch.cat([prompt_ids.to(self.device), action_ids[:, :-1].to(self.device)], dim=1)
        mask = torch.cat([prompt_mask.to(self.device), action_mask[:, :-1].to(self.device)], dim=1)
        return self._hidden(view, ids, mask)[:, p - 1:]

    def head(self, hidden: Tensor) -> Tensor:
        """The shared, frozen vocabulary head: ``[..., H] -> [..., V]`` float32 logits.

        For a 16-bit model with ``config.head_fp32`` the matmul produces float32 output directly (CUDA, no grad)
        or runs on float32 copies of its operands: rounding logits to bf16 would quantise Q-values to ~0.1 at magnitude 16,
        which exp(Q / beta) with beta = 0.01 turns into factors of e^10.
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

    def action_logits(
        self, view: str, prompt_ids: Tensor, prompt_mask: Tensor, action_ids: Tensor, action_mask: Tensor
    ) -> Tensor:
        """``head(action_hidden(...))``: float32 ``[B, L, V]``. Row j = logits over the choice of action token j.
        Large; prefer :meth:`iter_action_logits` / :meth:`reduce_head_chunks` for long batches."""
        return self.head(self.action_hidden(view, prompt_ids, prompt_mask, action_ids, action_mask))

    def action_logprobs(
        self, view: str, prompt_ids: Tensor, prompt_mask: Tensor, action_ids: Tensor, action_mask: Tensor,
        chunk_size: int = 128,
    ) -> Tensor:
        """Log-probability of every taken action token under ``view``: float32 ``[B, L]``, 0 where
        ``action_mask == 0``. Computed chunk by chunk (e.g. ``old_logprobs`` for PPO)."""
        hidden = self.action_hidden(view, prompt_ids, prompt_mask, action_ids, action_mask)
        return self.taken_logprobs(hidden, action_ids, chunk_size) * action_mask.to(self.device, torch.float32)

    def taken_logprobs(self, hidden: Tensor, action_ids: Tensor, chunk_size: int = 128) -> Tensor:
        """``log pi(w_j | ctx_j)`` of the taken tokens from a view's action hidden states (:meth:`action_hidden`),
        the head applied chunk by chunk so that no ``[B, L, V]`` tensor is kept: float32 ``[B, L]``, padding
        positions not masked. Differentiable when ``hidden`` is."""
        ids = action_ids.to(hidden.device)
        parts = [torch.log_softmax(logits, -1).gather(-1, ids[:, s:s + logits.shape[1], None]).squeeze(-1)
                 for s, logits in self._chunks(hidden, chunk_size)]
        return torch.cat(parts, 1)

    def _chunks(self, hidden: Tensor, chunk_size: int) -> Iterator[tuple[int, Tensor]]:
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        for s in range(0, hidden.shape[1], chunk_size):
            yield s, self.head(hidden[:, s:s + chunk_size])

    def iter_action_logits(
        self, view: str, prompt_ids: Tensor, prompt_mask: Tensor, action_ids: Tensor, action_mask: Tensor,
        chunk_size: int = 128,
    ) -> Iterator[tuple[int, Tensor]]:
        """One forward of ``view``, then the head chunk by chunk: yields ``(start, logits)`` with float32 logits
        ``[B, c, V]`` for action rows ``start : start + c`` (c <= chunk_size).

        Under autograd every yielded chunk stays alive until backward; to keep only one chunk alive use
        :meth:`reduce_head_chunks`, which recomputes each chunk's logits in the backward pass.
        """
        hidden = self.action_hidden(view, prompt_ids, prompt_mask, action_ids, action_mask)
        yield from self._chunks(hidden, chunk_size)

    def reduce_head_chunks(
        self, fn: Callable[..., Tensor], hiddens: Sequence[Tensor], chunk_size: int = 64,
        checkpoint: bool = True,
    ) -> Tensor:
        """``sum over chunks of fn(start, logits_1, ..., logits_k)`` where ``logits_i = head(hiddens[i][:, chunk])``.

        ``hiddens`` are ``[B, L, H]`` tensors from :meth:`action_hidden` of several views (same B, L); ``fn``
        returns a tensor of a fixed shape (e.g. a scalar loss part or a stack of several) and slices its own
        masks / targets with ``start`` and the chunk width ``logits_1.shape[1]``. With ``checkpoint`` (and grad
        enabled) each chunk's logits are freed after ``fn`` and recomputed during backward, so peak memory holds
        one chunk of ``k`` vocabulary-sized tensors instead of the whole batch.
        """
        from torch.utils.checkpoint import checkpoint as ckpt

        length = hiddens[0].shape[1]
        if any(h.shape[:2] != hiddens[0].shape[:2] for h in hiddens):
            raise ValueError("all hiddens must share [B, L]")
        total = None
        for s in range(0, length, chunk_size):
            parts = [h[:, s:s + chunk_size] for h in hiddens]

            def run(*hs, _s=s):
                return fn(_s, *[self.head(h) for h in hs])

            if checkpoint and torch.is_grad_enabled() and any(h.requires_grad for h in parts):
                out = ckpt(run, *parts, use_reentrant=False)
            else:
                out = run(*parts)
            total = out if total is None else total + out
        return total

    def prompt_last_hidden(self, view: str, prompt_ids: Tensor, prompt_mask: Tensor) -> Tensor:
        """Final-norm hidden state at the last prompt token: ``[B, H]`` (model dtype) -- the state from which the
        first action token is chosen (e.g. for a scalar value head)."""
        self._check_prompt(prompt_ids, prompt_mask)
        return self._hidden(view, prompt_ids, prompt_mask)[:, -1]

    def first_token_logits(self, view: str, prompt_ids: Tensor, prompt_mask: Tensor) -> Tensor:
        """float32 logits ``[B, V]`` over the first action token after each prompt (e.g. V(s_{t+1}))."""
        return self.head(self.prompt_last_hidden(view, prompt_ids, prompt_mask))

    # ------------------------------------------------------------------------------------------------------------
    # generation
    # ------------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        max_new_tokens: int = 256,
        temperature: float = 1.0,
        top_k: Optional[int] = 0,
        top_p: float = 1.0,
        do_sample: bool = True,
        view: str = "policy",
        stop_strings: Optional[Sequence[str]] = None,
    ) -> Generation:
        """Sample one action per prompt from ``view`` (the policy by default; ``reference`` for an untrained
        baseline) with the KV cache. ``top_k`` 0/None and ``top_p`` 1.0 disable those filters; ``do_sample=False``
        is greedy. Generation stops at EOS (:attr:`eos_token_ids`) or after ``max_new_tokens``.
        Seed with ``torch.manual_seed`` for reproducible sampling. ``stop_strings`` end a sequence as soon as its
        text contains one of them (the stop string is kept in the action), e.g. the start of a new top-level block
        after the function an environment asked for: the rest would be discarded by the environment anyway."""
        ids, mask = self.encode_prompts(prompts)
        return self.generate_from_ids(ids, mask, max_new_tokens, temperature, top_k, top_p, do_sample, view,
                                      stop_strings)

    @torch.no_grad()
    def generate_from_ids(
        self,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        max_new_tokens: int = 256,
        temperature: float = 1.0,
        top_k: Optional[int] = 0,
        top_p: float = 1.0,
        do_sample: bool = True,
        view: str = "policy",
        stop_strings: Optional[Sequence[str]] = None,
    ) -> Generation:
        """:meth:`generate` for prompts already encoded (left-padded ``[B, P]`` ids and mask)."""
        from transformers import GenerationConfig

        self._check_prompt(prompt_ids, prompt_mask)
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        eos = self.eos_token_ids
        # Every sampling field is explicit: fields left None would be filled from the checkpoint's
        # generation_config.json (some ship temperature / top_p / repetition_penalty defaults).
        # (Greedy decoding ignores them, and transformers warns about those set anyway.)
        sampling = dict(temperature=float(temperature), top_k=int(top_k or 0), top_p=float(top_p)) if do_sample else {}
        gen_cfg = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            repetition_penalty=1.0,
            num_beams=1,
            pad_token_id=self.pad_token_id,
            eos_token_id=eos,
            use_cache=True,
            stop_strings=list(stop_strings) if stop_strings else None,
            **sampling,
        )
        p = prompt_ids.shape[1]
        was_training = self.training
        # eval: no LoRA dropout while sampling, and gradient checkpointing (active only in training mode) would
        # otherwise switch the KV cache off.
        self.eval()
        try:
            with self.use_view(view):
                out = self.peft_model.generate(
                    input_ids=prompt_ids.to(self.device),
                    attention_mask=prompt_mask.to(self.device),
                    generation_config=gen_cfg,
                    tokenizer=self.tokenizer if stop_strings else None,
                )
        finally:
            self.train(was_training)
        new = out[:, p:].cpu()
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
        return Generation(
            prompt_ids=prompt_ids.cpu().long(),
            prompt_mask=prompt_mask.cpu().long(),
            action_ids=action_ids,
            action_mask=action_mask,
            texts=texts,
            finished=is_eos.any(1),
        )

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

    # ------------------------------------------------------------------------------------------------------------
    # target network
    # ------------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def polyak_update(self, rho: Optional[float] = None) -> None:
        """``target <- rho * target + (1 - rho) * critic`` for every LoRA tensor (rho = ``config.polyak_rho``
        = 0.995 by default)."""
        rho = self.config.polyak_rho if rho is None else float(rho)
        for t, c in self._target_pairs:
            t.mul_(rho).add_(c.to(t.dtype), alpha=1.0 - rho)

    @torch.no_grad()
    def sync_target(self) -> None:
        """Copy the critic adapter into the target adapter (done at construction)."""
        for t, c in self._target_pairs:
            t.copy_(c)

    # ------------------------------------------------------------------------------------------------------------
    # persistence
    # ------------------------------------------------------------------------------------------------------------

    def save_adapters(self, directory: Union[str, os.PathLike]) -> None:
        """Write ``directory/{policy,critic,target}`` in peft's format (``adapter_config.json`` +
        ``adapter_model.safetensors``; ``PeftModel.from_pretrained(base, directory / "policy")`` loads the policy)
        and ``directory/backbone.json`` (the :class:`BackboneConfig`, read by ``tools/merge_policy.py``)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        # peft writes every adapter other than "default" to directory/<adapter name>.
        self.peft_model.save_pretrained(str(directory), selected_adapters=list(ADAPTERS))
        save_backbone_config(self.config, directory)

    @torch.no_grad()
    def load_adapters(self, directory: Union[str, os.PathLike], adapters: Sequence[str] = ADAPTERS) -> None:
        """Restore adapters written by :meth:`save_adapters` (or any peft LoRA adapter of the same shape: a
        missing ``target`` folder falls back to a copy of the critic). Raises when rank, alpha or target modules
        differ from this model's."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        directory = Path(directory)
        own = self.peft_model.peft_config["policy"]
        loaded = set()
        for name in adapters:
            folder = directory / name
            if not folder.is_dir():
                if name == "target" and "critic" in loaded:
                    self.sync_target()
                    continue
                raise FileNotFoundError(f"no adapter folder {folder}")
            with open(folder / "adapter_config.json") as f:
                saved = json.load(f)
            mismatch = {
                k: (saved.get(k), v)
                for k, v in (("r", own.r), ("lora_alpha", own.lora_alpha))
                if saved.get(k) != v
            }
            if set(saved.get("target_modules") or []) != set(own.target_modules):
                mismatch["target_modules"] = (saved.get("target_modules"), sorted(own.target_modules))
            if mismatch:
                raise ValueError(f"adapter {folder} does not match this model (saved, expected): {mismatch}")
            weights = folder / "adapter_model.safetensors"
            if weights.is_file():
                state = load_file(str(weights), device=str(self.device))
            else:
                state = torch.load(folder / "adapter_model.bin", map_location=self.device, weights_only=True)
            result = set_peft_model_state_dict(self.peft_model, state, adapter_name=name)
            missing = [k for k in getattr(result, "missing_keys", []) if f".{name}." in k and "lora_" in k]
            if missing:
                raise ValueError(f"adapter {folder} lacks {len(missing)} tensors, e.g. {missing[0]}")
            loaded.add(name)
        self._reset_view()

    def trainable_state_dict(self, prefix: str = "") -> dict[str, Tensor]:
        """The adapter tensors (policy, critic and target), keyed as in ``self.state_dict()`` with ``prefix``
        prepended (e.g. ``"model."`` when this module is the attribute ``model`` of a LightningModule); detached,
        not copied. Everything a checkpoint needs besides the base, which the config reloads."""
        return {prefix + name: p.detach() for a in ADAPTERS for name, p in self._params[a]}

    @torch.no_grad()
    def load_trainable_state_dict(self, state: dict[str, Tensor], strict: bool = True, prefix: str = "") -> None:
        """Copy tensors from :meth:`trainable_state_dict` (called with the same ``prefix``) into the adapters.
        Keys not starting with ``prefix`` are ignored; with ``strict`` every adapter tensor must be present."""
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        params = {name: p for a in ADAPTERS for name, p in self._params[a]}
        unknown = sorted(set(state) - set(params))
        missing = sorted(set(params) - set(state))
        if strict and (unknown or missing):
            raise KeyError(f"trainable state mismatch: {len(missing)} missing (e.g. {missing[:1]}), "
                           f"{len(unknown)} unexpected (e.g. {unknown[:1]})")
        for k, v in state.items():
            if k in params:
                params[k].copy_(v)

    # state_dict hooks: unless config.checkpoint_base_weights, the module's state_dict (and therefore a Lightning
    # checkpoint of any module holding this one) contains only the adapter tensors, and loading such a state dict
    # with strict=True does not complain about the absent base weights, which the config reloads anyway.

    def _state_dict_post_hook(self, state_dict, prefix, local_metadata) -> None:
        if self.config.checkpoint_base_weights:
            return
        n = len(prefix)
        for key in [k for k in state_dict if k.startswith(prefix) and k[n:] in self._base_keys]:
            del state_dict[key]

    def _load_state_dict_pre_hook(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        self._load_prefix = prefix

    def _load_state_dict_post_hook(self, incompatible_keys) -> None:
        prefix, n = self._load_prefix, len(self._load_prefix)
        missing = incompatible_keys.missing_keys
        missing[:] = [k for k in missing if not (k.startswith(prefix) and k[n:] in self._base_keys)]
        self._reset_view()
