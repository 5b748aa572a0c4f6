"""The fast generation path (issue 33): static key/value buffers, the shared prompt prefix kept once, a captured step.

``SharedBaseLM.generate_from_ids`` takes this path when ``BackboneConfig.fast_generation`` is on (the default) and
the model allows it (:func:`fast_path_unsupported`). What it changes against transformers' ``generate`` with a
growing ``DynamicCache`` (the plain path, still there with ``fast_generation: false``):

* **The shared prefix once, prefilled and read.** The prefix every row shares is run once (batch 1, through the
  model's own attention, as the plain path runs it) and its keys and values stay one ``[1, kv_heads, S, d]``
  copy; every row's own tokens (the rest of its prompt, then what it generates) live in a static buffer allocated
  once for ``rest + max_new_tokens`` columns. The rows' own prompt tokens (in chunks) and every decoding step
  attend over both through :func:`static_prefix_attention`, an attention function registered with transformers'
  ``AttentionInterface`` (the decoder, norms, MLPs and the rotary embedding stay transformers' own): 8 rows of the
  quickstart's 513-token task prompt no longer read 8 copies of it every step, nor hold them (transformers'
  ``StaticCache`` keeps one copy per row, which is why it is not used here). The attention is computed as
  transformers' eager attention computes it (one float32 softmax; the products in float32 where CUDA's
  ``bmm(out_dtype=float32)`` exists, as SDPA's kernels keep them, else in the model's dtype), so its rounding
  differs from the plain path's SDPA kernels by float error only.
* **No per-step growth, host work or syncs on CUDA.** Buffers, the key mask and positions are updated in place on
  the device, so on CUDA the whole decoding step -- every layer, the LoRA adapters and the vocabulary head -- is
  captured once per generation in a ``torch.cuda.CUDAGraph`` (the step's eager kernels, replayed: the same arithmetic
  without a launch per kernel). EOS and stop strings are checked on the device (transformers' ``EosTokenCriteria``
  and ``StopStringCriteria``, which match token ids, not decoded text); the host reads the "all rows finished"
  flag one step late on CUDA (no wait for the step in flight; one extra step of pad tokens is dropped) and at once on
  the CPU.
* **The same sampling.** transformers' own temperature, top-k and top-p warpers in transformers' order, then
  ``torch.multinomial`` (or ``argmax`` when greedy) once per step for every row, as ``generate`` draws: a seed gives
  the same random stream, so where the logits agree the tokens do (tests/test_fast_generation.py).
* **A float32 model samples from merged weights.** The view's LoRA adapter is folded into copies of the base
  weights for the generation (peft's ``get_delta_weight``; the originals are put back untouched), so a step runs
  the bare decoder: W x + s B A x becomes (W + s B A) x, equal up to float32 rounding. A 16-bit model keeps its
  adapters unmerged (rounding W + s B A to bf16 would move the sampled distribution off the policy that the update
  scores; in a CUDA graph the unmerged adapters cost no launch overhead).

Where the tokens can differ from the plain path: the attention and (float32) the merged weights round differently,
so under greedy decoding (or sampling) a row can take another token where two candidates are within float error of
each other. ``tools/bench_rollout.py`` reports how often that happens (docs/results/gpu/rollout.md).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["ATTENTION_NAME", "FastDecoder", "fast_path_unsupported", "merged_adapter", "static_prefix_attention"]

#: the name :func:`static_prefix_attention` is registered under with transformers' ``AttentionInterface``
ATTENTION_NAME = "etpo_static_prefix"
#: decoder families whose attention layers take any registered attention function, with no sliding window or soft
#: capping (what :func:`static_prefix_attention` computes)
SUPPORTED_MODEL_TYPES = ("llama",)
#: bytes of float32 attention scores one prefill chunk may hold (rows x heads x chunk x keys x 4)
PREFILL_SCORE_BYTES = 256 * 2**20

_ACTIVE: list["StaticKV"] = []  # the buffers the registered attention function writes to and reads (one at a time)
_REGISTERED = False


def _register_attention() -> None:
    global _REGISTERED
    if not _REGISTERED:
        from transformers import AttentionInterface

        AttentionInterface.register(ATTENTION_NAME, static_prefix_attention)
        _REGISTERED = True


def fast_path_unsupported(model) -> Optional[str]:
    """Why ``model`` (a :class:`~modules.shared_base.SharedBaseLM`) cannot take the fast path, or None when it can."""
    config = model.base_model.config
    if getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        return f"model type {getattr(config, 'model_type', None)!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
    if getattr(config, "sliding_window", None):
        return "a sliding attention window"
    # FSDP gathers a sharded layer's weights inside its own forward; swapping or capturing them is not possible
    if any("FullyShardedDataParallel" in type(m).__name__ or "FSDP" in type(m).__name__ for m in model.modules()):
        return "the model is sharded (FSDP)"
    return None


def static_prefix_attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask, scaling=None,
                            dropout: float = 0.0, **kwargs) -> tuple[Tensor, None]:
    """transformers attention function (``AttentionInterface``): store the new keys/values of the forward's tokens
    in the active :class:`StaticKV` buffers and attend over the shared prefix and the row's own columns. ``query``
    ``[B, heads, q, d]``, ``key``/``value`` ``[B, kv_heads, q, d]`` (rotary applied); returns ``[B, q, heads, d]``."""
    kv = _ACTIVE[-1]
    layer = module.layer_idx
    kv.write(layer, key, value)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    return kv.attend(layer, query, scaling), None


class StaticKV:
    """Key/value buffers of one generation: the shared prefix once (``[1, kv_heads, S, d]`` per layer, or none)
    and every row's own columns (``[B, kv_heads, width, d]``: its prompt after the prefix, left-padded, then the
    tokens it generates), allocated at the first write of each layer (its heads, size and dtype are the keys').
    ``key_valid [B, width]`` marks real tokens (every generated column is valid; causality hides those not yet
    written); ``column`` (a device scalar) is the next column a forward writes."""

    def __init__(self, prefix: Optional[Sequence[tuple[Tensor, Tensor]]], own_mask: Tensor, width: int,
                 layers: int, dtype: torch.dtype):
        device = own_mask.device
        self.width = width
        self.prefix_keys = [k for k, _ in prefix] if prefix else None
        self.prefix_values = [v for _, v in prefix] if prefix else None
        self.keys: list[Optional[Tensor]] = [None] * layers
        self.values: list[Optional[Tensor]] = [None] * layers
        self.key_valid = torch.ones(own_mask.shape[0], width, dtype=torch.bool, device=device)
        self.key_valid[:, : own_mask.shape[1]] = own_mask.bool()
        self.column = torch.zeros((), dtype=torch.long, device=device)
        self.columns = torch.arange(width, device=device)
        self.float32_products = _float32_products(device, dtype)
        self.fill = torch.finfo(torch.float32 if self.float32_products else dtype).min
        self.write_columns: Tensor = self.column.reshape(1)
        self.query_mask: Tensor = self.key_valid[:, None, None, :]

    def write(self, layer: int, key: Tensor, value: Tensor) -> None:
        """Store the keys/values of the forward's tokens at :attr:`write_columns`."""
        if self.keys[layer] is None:
            rows, heads, _, dim = key.shape
            self.keys[layer] = torch.zeros(rows, heads, self.width, dim, dtype=key.dtype, device=key.device)
            self.values[layer] = torch.zeros(rows, heads, self.width, value.shape[-1], dtype=value.dtype,
                                             device=value.device)
        self.keys[layer].index_copy_(2, self.write_columns, key)
        self.values[layer].index_copy_(2, self.write_columns, value)

    def begin(self, length: int) -> None:
        """Set up a forward of ``length`` new tokens per row at ``column``: where they are written and what each
        query may see -- real tokens up to its own column, and itself (a padding query then attends to something)."""
        self.write_columns = self.column + torch.arange(length, device=self.column.device)
        before = self.columns[None, :] <= self.write_columns[:, None]  # [q, width]
        itself = self.columns[None, :] == self.write_columns[:, None]
        self.query_mask = ((self.key_valid[:, None, :] & before) | itself)[:, None]  # [B, 1, q, width]

    def _bmm(self, a: Tensor, b: Tensor) -> Tensor:
        # float32 results from 16-bit operands where CUDA offers it (as SDPA's kernels accumulate and keep scores)
        return torch.bmm(a, b, out_dtype=torch.float32) if self.float32_products else torch.bmm(a, b)

    def attend(self, layer: int, query: Tensor, scaling: float) -> Tensor:
        """Softmax attention of ``query [B, heads, q, d]`` over the prefix and the own columns with one softmax over
        both (float32, as transformers' eager attention; scores and weighted sums in float32 where CUDA's
        ``bmm(out_dtype=float32)`` exists, else in the model's dtype); returns ``[B, q, heads, d]``."""
        rows, heads, length, dim = query.shape
        keys, values = self.keys[layer], self.values[layer]
        kv_heads, width = keys.shape[1], keys.shape[2]
        group = heads // kv_heads  # query heads j * group ... share key/value head j (transformers' repeat_kv)
        per_head = query.reshape(rows * kv_heads, group * length, dim)
        own = self._bmm(per_head, keys.view(rows * kv_heads, width, dim).transpose(1, 2)) * scaling
        own = own.view(rows, kv_heads, group, length, width).masked_fill(~self.query_mask[:, None], self.fill)
        shared = 0
        if self.prefix_keys is not None:
            # every row's queries against the one copy of the prefix: [kv_heads, rows * group * q, S]
            stacked = query.reshape(rows, kv_heads, group * length, dim).transpose(0, 1)
            stacked = stacked.reshape(kv_heads, rows * group * length, dim)
            prefix_keys = self.prefix_keys[layer][0]
            shared = prefix_keys.shape[1]
            pre = self._bmm(stacked, prefix_keys.transpose(1, 2)) * scaling
            pre = pre.view(kv_heads, rows, group, length, shared).transpose(0, 1)
            scores = torch.cat([pre.to(own.dtype), own], dim=-1)
        else:
            scores = own
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        out = self._bmm(probs[..., shared:].reshape(rows * kv_heads, group * length, width),
                        values.view(rows * kv_heads, width, dim)).view(rows, kv_heads, group * length, dim)
        if shared:
            pre_probs = probs[..., :shared].transpose(0, 1).reshape(kv_heads, rows * group * length, shared)
            from_prefix = self._bmm(pre_probs, self.prefix_values[layer][0])
            out = out + from_prefix.view(kv_heads, rows, group * length, dim).transpose(0, 1)
        out = out.reshape(rows, kv_heads, group, length, dim).permute(0, 3, 1, 2, 4)
        return out.reshape(rows, length, heads, dim).to(query.dtype)


def _float32_products(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.bmm(..., out_dtype=torch.float32)`` runs for ``dtype`` operands on ``device`` (CUDA, recent
    torch); probed once per generation, outside any CUDA-graph capture."""
    if dtype == torch.float32:
        return False
    probe = torch.ones(1, 1, 1, dtype=dtype, device=device)
    try:
        torch.bmm(probe, probe, out_dtype=torch.float32)
        return True
    except (RuntimeError, TypeError, NotImplementedError):
        return False


@contextlib.contextmanager
def active_attention(config, kv: StaticKV) -> Iterator[None]:
    """Within the block the decoder's attention layers run :func:`static_prefix_attention` on ``kv``."""
    _register_attention()
    previous = config._attn_implementation
    _ACTIVE.append(kv)
    config._attn_implementation = ATTENTION_NAME
    try:
        yield
    finally:
        config._attn_implementation = previous
        _ACTIVE.pop()


@contextlib.contextmanager
def merged_adapter(model, adapter: str) -> Iterator[None]:
    """Within the block ``model``'s base linears hold ``W + scaling * B @ A`` of ``adapter`` (peft's
    ``get_delta_weight``) with every adapter switched off: the bare decoder computes the view. The original weight
    tensors are put back afterwards, untouched (a swap, not an in-place merge and unmerge, which would round)."""
    from peft.tuners.lora import LoraLayer

    swapped = []
    try:
        with torch.no_grad():
            for module in model.peft_model.modules():
                if isinstance(module, LoraLayer) and adapter in module.lora_A:
                    base = module.get_base_layer()
                    original = base.weight
                    merged = original + module.get_delta_weight(adapter).to(original.dtype)
                    base.weight = torch.nn.Parameter(merged, requires_grad=False)
                    swapped.append((base, original))
        with model.use_view("reference"):
            yield
    finally:
        for base, original in swapped:
            base.weight = original


class CapturedStep:
    """A CUDA graph of ``step`` (which advances ``state`` tensors in place and returns its output tensor): one
    eager warm-up on a side stream (cuBLAS workspaces, the allocator), ``state`` put back, then capture; each call
    replays the step's kernels as they were recorded and returns the same output tensor, overwritten."""

    def __init__(self, step: Callable[[], Tensor], state: Sequence[Tensor]):
        saved = [t.clone() for t in state]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(side):
                step()
        finally:
            torch.cuda.current_stream().wait_stream(side)
            for tensor, value in zip(state, saved):
                tensor.copy_(value)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = step()

    def __call__(self) -> Tensor:
        self.graph.replay()
        return self.output


class StopFlag:
    """Whether every row has finished. Read at once on the CPU. Deferred (the default on CUDA): the flag of step
    ``t`` is copied to the host without waiting (pinned memory, an event) and read at step ``t + 1``, while the step
    in flight keeps the device busy; the loop may then run one step too many, which ``overshoot`` says (that
    step's column holds pad tokens only and is dropped; its sampling has drawn from the random stream)."""

    def __init__(self, device: torch.device, deferred: Optional[bool] = None):
        self.deferred = device.type == "cuda" if deferred is None else deferred
        cuda = device.type == "cuda"
        self.overshoot = 0
        self.steps = 0
        self.slots = [(torch.zeros((), dtype=torch.bool, pin_memory=cuda), torch.cuda.Event() if cuda else None)
                      for _ in range(2)]

    def all_finished(self, unfinished: Tensor) -> bool:
        if not self.deferred:
            return not bool(unfinished.any())
        flag, event = self.slots[self.steps % 2]
        flag.copy_(~unfinished.any(), non_blocking=True)
        if event is not None:
            event.record()
        self.steps += 1
        if self.steps < 2:
            return False
        before, before_event = self.slots[self.steps % 2]
        if before_event is not None:
            before_event.synchronize()
        if bool(before):
            self.overshoot = 1
            return True
        return False


class Sampler:
    """One token per row from float32 logits as transformers' ``generate`` picks it: temperature, top-k and top-p
    warpers (``transformers.generation``, in the order ``_get_logits_processor`` adds them, each only when it does
    anything), then softmax and ``torch.multinomial``; ``argmax`` when greedy. ``log_probs``: also return
    ``log mu`` of each drawn token under the warped distribution (what the update's ``behaviour_log_probs``
    recomputes)."""

    def __init__(self, do_sample: bool, temperature: float, top_k: int, top_p: float, log_probs: bool = False):
        from transformers.generation import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        self.do_sample = do_sample
        self.log_probs = log_probs
        self.warpers = []
        if do_sample:
            if temperature != 1.0:
                self.warpers.append(TemperatureLogitsWarper(temperature))
            if top_k:
                self.warpers.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
            if top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))

    def __call__(self, ids: Tensor, logits: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        scores = logits
        for warp in self.warpers:
            scores = warp(ids, scores)
        if self.do_sample:
            tokens = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        else:
            tokens = torch.argmax(scores, dim=-1)
        taken = None
        if self.log_probs:
            taken = torch.log_softmax(scores, dim=-1).gather(-1, tokens[:, None]).squeeze(1)
        return tokens, taken


def _layer_kv(cache, layer: int) -> tuple[Tensor, Tensor]:
    # transformers >= 4.56 keeps a DynamicCache's tensors per layer object; older releases in key_cache/value_cache
    if hasattr(cache, "layers"):
        return cache.layers[layer].keys, cache.layers[layer].values
    return cache.key_cache[layer], cache.value_cache[layer]


class FastDecoder:
    """Runs one generation on the fast path for :meth:`SharedBaseLM.generate_from_ids` (which owns the view, the
    model's mode and the post-processing). ``graph``: capture the decoding step in a CUDA graph; ``deferred_stop``:
    read the "all finished" flag one step late (:class:`StopFlag`); both default to on CUDA only."""

    def __init__(self, model, graph: Optional[bool] = None, deferred_stop: Optional[bool] = None):
        self.model = model
        self.graph = model.device.type == "cuda" if graph is None else graph
        self.deferred_stop = deferred_stop

    def _capture(self, step: Callable[[], Tensor], state: Sequence[Tensor]) -> Callable[[], Tensor]:
        """The step as a CUDA graph; should the capture fail (an operation a graph cannot hold, in some library
        version), the eager step with one warning: slower, the same tokens."""
        try:
            return CapturedStep(step, state)
        except RuntimeError as err:
            warnings.warn(f"fast generation: the decoding step could not be captured in a CUDA graph ({err}); "
                          "decoding eagerly", RuntimeWarning, stacklevel=3)
            self.graph = False
            return step

    def forward(self, kv: StaticKV, ids: Tensor, positions: Tensor) -> Tensor:
        """Final hidden states ``[B, q, H]`` of ``ids [B, q]`` at ``positions``, written to ``kv`` at its column."""
        kv.begin(ids.shape[1])
        hidden = self.model._decoder(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state
        kv.column.add_(ids.shape[1])
        return hidden

    def prefill(self, prompt_ids: Tensor, prompt_mask: Tensor, share: bool, max_new_tokens: int):
        """The shared prefix once (batch 1, through the model's own attention, as the plain path prefills it), then
        every row's own prompt tokens through the static buffers, in chunks that bound the attention scores to
        :data:`PREFILL_SCORE_BYTES`. Returns (ids ``[B, P']`` as laid out, the first logits ``[B, V]`` float32, the
        :class:`StaticKV`, each row's number of real prompt tokens); enter :func:`active_attention` on the
        :class:`StaticKV` for the decoding steps."""
        model = self.model
        device = model.device
        rows, shared = model._shared_prefix(prompt_ids, prompt_mask) if share else ([], 0)
        prefix = None
        if shared:
            cache = model._prefix_cache(rows[0][:shared])
            prefix = [_layer_kv(cache, i) for i in range(len(cache))]
            ids, mask = model._prefix_layout(rows, shared)
        else:
            ids, mask = prompt_ids.cpu().long(), prompt_mask.cpu().long()
        ids, mask = ids.to(device), mask.to(device)
        # the positions transformers' generate gives: real tokens before each one (padding: 1)
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        config = model._decoder.config
        width = ids.shape[1] - shared + max_new_tokens
        kv = StaticKV(prefix, mask[:, shared:], width, config.num_hidden_layers, model.dtype)
        per_column = ids.shape[0] * config.num_attention_heads * (shared + width) * 4
        chunk = max(1, PREFILL_SCORE_BYTES // per_column)
        with active_attention(config, kv):
            for start in range(shared, ids.shape[1], chunk):
                part = slice(start, min(ids.shape[1], start + chunk))
                hidden = self.forward(kv, ids[:, part], positions[:, part])
        logits = model._lm_head(hidden[:, -1]).float()
        return ids, logits, kv, mask.sum(1)

    def run(self, prompt_ids: Tensor, prompt_mask: Tensor, max_new_tokens: int, sampler: Sampler, eos: Sequence[int],
            stop_strings: Optional[Sequence[str]], share: bool) -> tuple[Tensor, int, Optional[Tensor]]:
        """Sample up to ``max_new_tokens`` per row; returns (ids ``[B, P' + n]``: the prompt as laid out and the
        ``n`` generated columns, the prompt width ``P'``, the log-probs ``[B, n]`` or None)."""
        from transformers.generation import EosTokenCriteria, StopStringCriteria

        model = self.model
        device = model.device
        config = model._decoder.config
        ids, logits, kv, lengths = self.prefill(prompt_ids, prompt_mask, share, max_new_tokens)
        width = ids.shape[1]
        seq = torch.full((ids.shape[0], width + max_new_tokens), int(model.pad_token_id), dtype=torch.long,
                         device=device)
        seq[:, :width] = ids
        criteria = [EosTokenCriteria(eos_token_id=list(eos))]
        if stop_strings:
            criteria.append(StopStringCriteria(model.tokenizer, list(stop_strings)))
        tokens = torch.zeros(ids.shape[0], 1, dtype=torch.long, device=device)
        positions = lengths.reshape(-1, 1).clone()
        pad = torch.tensor(int(model.pad_token_id), device=device)

        def step() -> Tensor:
            hidden = self.forward(kv, tokens, positions)
            positions.add_(1)
            return model._lm_head(hidden[:, -1]).float()

        unfinished = torch.ones(ids.shape[0], dtype=torch.bool, device=device)
        stop = StopFlag(device, self.deferred_stop)
        taken = []
        n = 0
        with active_attention(config, kv):
            decode: Callable[[], Tensor] = step
            for t in range(max_new_tokens):
                picked, log_mu = sampler(seq[:, : width + n], logits)
                picked = torch.where(unfinished, picked, pad)
                seq[:, width + n] = picked
                n += 1
                if log_mu is not None:
                    taken.append(log_mu)
                for criterion in criteria:
                    unfinished = unfinished & ~criterion(seq[:, : width + n], None)
                if t == max_new_tokens - 1 or stop.all_finished(unfinished):
                    break
                tokens.copy_(picked[:, None])
                if self.graph and decode is step:
                    decode = self._capture(step, [kv.column, positions])
                logits = decode()
        n -= stop.overshoot
        log_probs = torch.stack(taken[:n], dim=1) if taken else None
        return seq[:, : width + n], width, log_probs
