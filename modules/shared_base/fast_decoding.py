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
* **A float32 model's step written out** (``BackboneConfig.fused_decoding``, the default): the merged q/k/v and
  gate/up weights are built as one ``[q; k; v]`` and one ``[gate; up]`` tensor per layer (the base linears hold
  views of them: no extra memory), and :class:`FusedDecoder` runs the rows' own prompt tokens and every decoding
  step over them -- two matmuls where transformers' layers run five, the rotary embedding of queries and keys in one
  go, torch's one-call RMSNorm -- without transformers' per-layer module calls, keyword plumbing and mask
  construction; its matmuls and the head's on the weights reordered once per generation for oneDNN, whose kernels
  stream them ~3x faster than ``F.linear`` for a few rows (the gain: docs/results/gpu/rollout.md). Where it does
  not apply (biased linears, a 16-bit model), transformers' layers run the steps.

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

__all__ = ["ATTENTION_NAME", "FastDecoder", "FusedDecoder", "fast_path_unsupported", "fused_step_unsupported",
           "merged_adapter", "static_prefix_attention"]

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
def merged_adapter(model, adapter: Optional[str], fuse: bool = False) -> Iterator[Optional[list["FusedLayer"]]]:
    """Within the block ``model``'s base linears hold ``W + scaling * B @ A`` of ``adapter`` (peft's
    ``get_delta_weight``) with every adapter switched off: the bare decoder computes the view. The original weight
    tensors are put back afterwards, untouched (a swap, not an in-place merge and unmerge, which would round).

    ``fuse`` (Llama decoders, :func:`fused_step_unsupported`): each layer's q/k/v weights are merged into one
    ``[q; k; v]`` tensor and gate/up into one ``[gate; up]`` tensor, and the base linears hold views of them -- the
    same memory as merging them one by one; the block yields the layers' weights (:class:`FusedLayer`) for
    :class:`FusedDecoder` (one matmul where transformers' decoder runs three, and two). ``adapter`` None: the
    reference view (no delta; with ``fuse`` the fused tensors are copies of the base weights). Yields None when not
    fused."""
    from peft.tuners.lora import LoraLayer

    swapped = []

    def merged(module) -> tuple[torch.nn.Module, Tensor]:
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            if adapter is not None and adapter in module.lora_A:
                return base, base.weight + module.get_delta_weight(adapter).to(base.weight.dtype)
            return base, base.weight
        return module, module.weight

    def swap(base: torch.nn.Module, weight: Tensor) -> None:
        swapped.append((base, base.weight))
        base.weight = torch.nn.Parameter(weight, requires_grad=False)

    fused: Optional[list[FusedLayer]] = None
    try:
        with torch.no_grad():
            if fuse:
                fused = []
                for layer in model._decoder.layers:
                    attn, mlp = layer.self_attn, layer.mlp
                    groups = []
                    for names in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
                        parts = [merged(getattr(module, name)) for module in (attn if "q_proj" in names else mlp,)
                                 for name in names]
                        joined = torch.cat([weight for _, weight in parts])  # a new tensor: originals untouched
                        start = 0
                        for base, weight in parts:
                            swap(base, joined[start: start + weight.shape[0]])
                            start += weight.shape[0]
                        groups.append(joined)
                    out_proj, down_proj = (merged(m) for m in (attn.o_proj, mlp.down_proj))
                    for base, weight in (out_proj, down_proj):
                        if adapter is not None and weight is not base.weight:
                            swap(base, weight)
                    fused.append(FusedLayer(layer.input_layernorm.weight, groups[0], out_proj[0].weight,
                                            layer.post_attention_layernorm.weight, groups[1], down_proj[0].weight))
            elif adapter is not None:
                for module in model.peft_model.modules():
                    if isinstance(module, LoraLayer) and adapter in module.lora_A:
                        base, weight = merged(module)
                        swap(base, weight)
        with model.use_view("reference"):
            yield fused
    finally:
        for base, original in reversed(swapped):
            base.weight = original


class FusedLayer:
    """One Llama decoder layer's weights for :class:`FusedDecoder`: the two RMSNorm weights, ``[q; k; v]``, the
    output projection, ``[gate; up]`` and the down projection (``[out, in]`` each, as ``nn.Linear`` holds them)."""

    __slots__ = ("norm_in", "qkv", "out", "norm_post", "gate_up", "down")

    def __init__(self, norm_in, qkv, out, norm_post, gate_up, down):
        self.norm_in, self.qkv, self.out = norm_in, qkv, out
        self.norm_post, self.gate_up, self.down = norm_post, gate_up, down


def fused_step_unsupported(model) -> Optional[str]:
    """Why :class:`FusedDecoder` cannot run ``model``'s decoder (then transformers' layers run the steps), or None:
    it computes a plain Llama layer -- RMSNorm, q/k/v without bias, rotary, attention, o_proj, gated MLP."""
    config = model._decoder.config
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return "linear layers with biases"
    if getattr(config, "pretraining_tp", 1) not in (1, None):
        return "pretraining_tp > 1"
    from transformers.activations import ACT2FN

    if getattr(config, "hidden_act", None) not in ACT2FN:
        return f"activation {getattr(config, 'hidden_act', None)!r}"
    layers = getattr(model._decoder, "layers", None)
    if not layers or not all(hasattr(layer, n) for layer in layers for n in ("self_attn", "mlp", "input_layernorm",
                                                                            "post_attention_layernorm")):
        return "not a Llama layer stack"
    return None


def _rms_norm(hidden: Tensor, weight: Tensor, eps: float) -> Tensor:
    # transformers' LlamaRMSNorm (float32 statistics, the weight applied in the input dtype); in float32 torch's own
    # rms_norm computes the same (one call instead of five; equal bits on this project's CPU, tested to 1e-5)
    dtype = hidden.dtype
    if dtype == torch.float32 and weight.dtype == torch.float32 and hasattr(torch, "rms_norm"):
        return torch.rms_norm(hidden, (hidden.shape[-1],), weight, eps)
    h = hidden.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


_PACKING_WARNED = False  # the "no packed weights" warning is given once per process


def _pack_weight(weight: Tensor, rows: int) -> Tensor:
    """``weight [out, in]`` in oneDNN's blocked layout for ``x @ weight.T`` with about ``rows`` rows of ``x`` (the
    layout torch's inductor gives a frozen CPU linear)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, rows)


def _packed_linear(x: Tensor, packed: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class FusedDecoder:
    """A Llama decoder's forward over :class:`StaticKV` buffers, written out: per layer one ``[q; k; v]`` matmul,
    the rotary embedding of queries and keys in one go, :meth:`StaticKV.attend`, the output projection, one
    ``[gate; up]`` matmul and the down projection, with transformers' RMSNorm and residual order -- the arithmetic of
    transformers' layers with their weights as :func:`merged_adapter` fused them, without the per-layer module calls,
    keyword plumbing and mask construction around it; and the vocabulary head (:meth:`head`).

    ``pack`` (float32 on the CPU): the matmuls' weights -- the four per layer and the head -- are reordered once per
    generation into oneDNN's blocked layout (``torch.ops.mkldnn``, what torch's inductor gives a frozen linear) and
    multiplied by oneDNN: a decoding step of a few rows streams every weight once, and these kernels stream them
    2-3x faster than ``F.linear``'s (``tools/bench_rollout.py --quickstart``). The copies cost the weights' size
    while the generation lasts. Where torch has no such ops (no oneDNN, another CPU) or a probe product disagrees,
    ``F.linear`` runs with one warning per process. Equal to transformers' decoder up to float32 rounding (the
    kernels block their sums differently)."""

    def __init__(self, model, layers: Sequence[FusedLayer], pack: bool = True):
        from transformers.activations import ACT2FN

        decoder = model._decoder
        config = decoder.config
        self.decoder = decoder
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        self.act = ACT2FN[config.hidden_act]
        self.scaling = self.head_dim ** -0.5
        self.norms = [(layer.norm_in, layer.norm_post) for layer in layers]
        self.norm = decoder.norm.weight
        self.intermediate = layers[0].down.shape[1]
        head = model._lm_head
        self.head_bias = getattr(head, "bias", None)
        # [q; k; v], o, [gate; up], down per layer, then the head
        self.weights = [(layer.qkv, layer.out, layer.gate_up, layer.down) for layer in layers]
        self.head_weight = head.weight
        self.linear = torch.nn.functional.linear
        self.pack = pack and self.head_weight.device.type == "cpu" and self.head_weight.dtype == torch.float32
        self.packed = False

    def _pack(self, rows: int) -> None:
        """Reorder the weights for oneDNN (once, at the first forward, when the rows are known)."""
        global _PACKING_WARNED
        self.pack = False
        try:
            weights = [tuple(_pack_weight(w, rows) for w in group) for group in self.weights]
            head = _pack_weight(self.head_weight, rows)
            probe = torch.linspace(-1, 1, rows * self.head_weight.shape[1]).view(rows, -1)
            expected = torch.nn.functional.linear(probe, self.head_weight, self.head_bias)
            torch.testing.assert_close(_packed_linear(probe, head, self.head_bias), expected, rtol=1e-4, atol=1e-4)
        except (AttributeError, RuntimeError, NotImplementedError, AssertionError) as err:
            if not _PACKING_WARNED:
                _PACKING_WARNED = True
                warnings.warn(f"fast generation: no oneDNN-packed weights in this torch build ({str(err)[:200]}); "
                              "the fused decoding step multiplies with F.linear (slower, the same tokens)",
                              RuntimeWarning, stacklevel=4)
            return
        self.weights, self.head_weight, self.linear, self.packed = weights, head, _packed_linear, True

    def head(self, hidden: Tensor) -> Tensor:
        """float32 logits of ``hidden [..., H]`` (final-normed) by the model's vocabulary head."""
        return self.linear(hidden, self.head_weight, self.head_bias).float()

    def __call__(self, kv: StaticKV, ids: Tensor, positions: Tensor) -> Tensor:
        """Final hidden states ``[B, q, H]`` of ``ids [B, q]`` at ``positions``; keys and values written to ``kv``
        at its column (:meth:`StaticKV.begin` done by the caller)."""
        rows, length = ids.shape
        if self.pack:
            self._pack(rows)
        heads, kv_heads, dim, eps = self.heads, self.kv_heads, self.head_dim, self.eps
        linear = self.linear
        rotated = heads + kv_heads
        hidden = self.decoder.embed_tokens(ids)
        cos, sin = self.decoder.rotary_emb(hidden, positions)  # [B, q, d], transformers' own
        cos, sin = cos[:, None], sin[:, None]
        half = dim // 2
        for index, ((qkv_w, out_w, gate_up_w, down_w), (norm_in, norm_post)) in enumerate(zip(self.weights,
                                                                                             self.norms)):
            x = _rms_norm(hidden, norm_in, eps)
            qkv = linear(x, qkv_w).view(rows, length, rotated + kv_heads, dim).transpose(1, 2)
            both = qkv[:, :rotated]  # queries and keys: transformers' apply_rotary_pos_emb, on both at once
            turned = torch.cat((-both[..., half:], both[..., :half]), dim=-1)
            both = both * cos + turned * sin
            kv.write(index, both[:, heads:], qkv[:, rotated:])
            attended = kv.attend(index, both[:, :heads], self.scaling)  # [B, q, heads, d]
            hidden = hidden + linear(attended.reshape(rows, length, heads * dim), out_w)
            x = _rms_norm(hidden, norm_post, eps)
            gate_up = linear(x, gate_up_w)
            gate, up = gate_up[..., : self.intermediate], gate_up[..., self.intermediate:]
            hidden = hidden + linear(self.act(gate) * up, down_w)
        return _rms_norm(hidden, self.norm, eps)


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

    def __init__(self, model, graph: Optional[bool] = None, deferred_stop: Optional[bool] = None,
                 fused: Optional[Sequence[FusedLayer]] = None, pack: bool = True):
        self.model = model
        self.graph = model.device.type == "cuda" if graph is None else graph
        self.deferred_stop = deferred_stop
        # the rows' own prompt tokens and every decoding step through FusedDecoder (the weights merged_adapter fused)
        self.fused = FusedDecoder(model, fused, pack=pack) if fused else None

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

    def head(self, hidden: Tensor) -> Tensor:
        """float32 logits of final hidden states (the fused step's packed head where it runs)."""
        if self.fused is not None:
            return self.fused.head(hidden)
        return self.model._lm_head(hidden).float()

    def forward(self, kv: StaticKV, ids: Tensor, positions: Tensor) -> Tensor:
        """Final hidden states ``[B, q, H]`` of ``ids [B, q]`` at ``positions``, written to ``kv`` at its column."""
        kv.begin(ids.shape[1])
        if self.fused is not None:
            hidden = self.fused(kv, ids, positions)
        else:
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
        logits = self.head(hidden[:, -1])
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
            return self.head(hidden[:, -1])

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
