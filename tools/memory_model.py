#!/usr/bin/env python
"""Peak GPU memory of one ETPO update for a Llama-7B-shaped model, on one GPU and under FSDP, next to the
reference implementation's four-full-copies design. Pure Python (no torch) unless ``--measure``.

    python tools/memory_model.py                       # the table for 8 sequences of 768 tokens (markdown)
    python tools/memory_model.py --sequences 16        # the paper's 16 transitions per update
    python tools/memory_model.py --measure             # re-derive the per-layer constants with autograd on CPU

Every number is a prediction from the formulas below; none was measured on a GPU. The per-decoder-layer activation
constants were measured exactly on CPU by counting the tensors autograd saves (``--measure``; tests/test_scale.py),
and the number of live vocabulary-sized chunk tensors by tracking live storages during ``ETPOModule.update_loss``.
Assumptions are listed in docs/memory-model.md and in the docstrings here. Bytes are printed in GB (1e9).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, replace

GB = 1e9

# ----------------------------------------------------------------------------------------------------------------
# shapes
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """A Llama architecture (defaults: CodeLlama-7B)."""

    hidden: int = 4096
    layers: int = 32
    heads: int = 32
    kv_heads: int = 32
    intermediate: int = 11008
    vocab: int = 32016
    tied_embeddings: bool = False

    @property
    def kv_dim(self) -> int:
        return self.hidden * self.kv_heads // self.heads

    @property
    def layer_params(self) -> int:
        h, i = self.hidden, self.intermediate
        return 2 * h * h + 2 * h * self.kv_dim + 3 * h * i + 2 * h  # q, o, k, v, gate/up/down, two RMSNorms

    @property
    def root_params(self) -> int:
        """Embeddings, final norm and vocabulary head: the FSDP root unit."""
        emb = self.vocab * self.hidden
        return emb + self.hidden + (0 if self.tied_embeddings else emb)

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.root_params

    def lora_params(self, r: int) -> int:
        """One LoRA adapter of rank r on all seven linear layers of every block: r * (d_in + d_out) each."""
        h, i, kv = self.hidden, self.intermediate, self.kv_dim
        per_layer = (h + h) + (h + kv) + (h + kv) + (h + h) + 2 * (h + i) + (i + h)
        return r * per_layer * self.layers


@dataclass(frozen=True)
class Workload:
    """One ETPO update (and the rollout that precedes it).

    sequences: transitions in the update batch (global, split over the GPUs under FSDP);
    tokens: prompt + action tokens per sequence (the forward sees tokens - 1);
    action_tokens: L, the action part (rows of the vocabulary-sized work);
    chunk: ``token_chunk_size`` of ETPOModule; lora_r: adapter rank; checkpointing: per-decoder-layer recompute;
    vocab_tensors: fp32 [B, chunk, V] tensors alive at once in the chunk loop (measured on CPU: 11-13, see
    :func:`measure_vocab_tensors`), plus two float32 copies of the [V, H] head weight (the grad-enabled head calls of a
    bf16 model); recompute_factor: backward working set of one recomputed layer as a multiple of
    its saved activations (assumption: 1.5 = the saved tensors plus half as much again in gradient temporaries);
    envs: parallel environments = the generation batch of the rollout (global; split over GPUs under FSDP).
    """

    sequences: int = 8
    tokens: int = 768
    action_tokens: int = 256
    chunk: int = 64
    lora_r: int = 16
    checkpointing: bool = True
    vocab_tensors: float = 12.0
    recompute_factor: float = 1.5
    envs: int = 8


# ----------------------------------------------------------------------------------------------------------------
# per-decoder-layer activations (bytes autograd keeps), measured on CPU with saved-tensor hooks
# ----------------------------------------------------------------------------------------------------------------

def lora_layer_bytes(shape: Shape, s: int, r: int) -> float:
    """Saved tensors of one LoRA'd Llama layer, bf16 frozen base, float32 adapters (peft keeps them float32 and casts
    each adapted linear's input to float32: six [s, h] copies and one [s, i]), SDPA / flash attention (q, k, v,
    output and a float32 log-sum-exp are saved, no [T, T] matrix), s = tokens in the batch:
    ``40 s h + 10 s i + 28 s r + 4 s heads + 8 s`` (exact on CPU for any shape; frozen linears save no inputs)."""
    h, i = shape.hidden, shape.intermediate
    return s * (40 * h + 10 * i + 28 * r + 4 * shape.heads + 8)


def lora_bf16_layer_bytes(shape: Shape, s: int, r: int) -> float:
    """The same layer when the adapters are computed in bf16 (FSDP mixed precision with ``param_dtype`` bf16):
    ``20 s h + 8 s i + 14 s r + 4 s heads + 8 s`` (measured)."""
    h, i = shape.hidden, shape.intermediate
    return s * (20 * h + 8 * i + 14 * r + 4 * shape.heads + 8)


def full_eager_layer_bytes(shape: Shape, s: int, seq_len: int) -> float:
    """A fully fine-tuned 16-bit Llama layer with eager attention (transformers 4.33, the reference
    implementation: softmax in float32, then a 16-bit copy, both saved): ``24 s h + 8 s i + 6 s heads T + 8 s``."""
    h, i = shape.hidden, shape.intermediate
    return s * (24 * h + 8 * i + 6 * shape.heads * seq_len + 8)


# ----------------------------------------------------------------------------------------------------------------
# ETPO (this project): one frozen bf16 base, LoRA policy / critic / target, reference = adapters off
# ----------------------------------------------------------------------------------------------------------------

def etpo_breakdown(shape: Shape = Shape(), wl: Workload = Workload(), gpus: int = 1,
                   adapters: str = "replicate") -> dict[str, float]:
    """Per-GPU bytes of one ETPO update. ``gpus > 1``: FSDP FULL_SHARD over ``gpus`` ranks with the global batch split
    (each rank ``ceil(sequences / gpus)`` sequences); ``adapters``: ``replicate`` (modules.shared_base.fsdp default: LoRA
    FSDP-ignored, float32) or ``shard`` (everything flattened: float32 storage, bf16 compute, gradient shards for
    the frozen weights too)."""
    n = max(1, int(gpus))
    b = math.ceil(wl.sequences / n)
    s = b * wl.tokens
    h, V, L = shape.hidden, shape.vocab, wl.action_tokens
    lora = shape.lora_params(wl.lora_r)
    sharded = n > 1
    flat = sharded and adapters == "shard"
    out: dict[str, float] = {}

    # persistent state
    if not sharded:
        out["base weights"] = 2.0 * shape.params
        out["FSDP gathered (root + 2 layers)"] = 0.0
    else:
        storage = 4.0 if flat else 2.0  # shard mode needs one dtype per unit: float32 storage
        out["base weights"] = storage * shape.params / n
        out["FSDP gathered (root + 2 layers)"] = 2.0 * (shape.root_params + 2 * shape.layer_params)
    out["adapters (policy, critic, target)"] = 3 * 4.0 * lora / (n if flat else 1)
    out["optimizer states"] = 2 * 2 * 4.0 * lora / (n if flat else 1)
    if flat:  # FSDP1 allocates a gradient for the whole flat parameter (frozen weights included), sharded
        out["gradients"] = 4.0 * shape.layers * shape.layer_params / n + 2.0 * shape.layer_params
    else:
        out["gradients"] = 2 * 4.0 * lora * (2 if sharded else 1)  # + the flat all-reduce buffer under FSDP

    # two autograd graphs (critic view, policy view) held until the one backward
    layer = lora_bf16_layer_bytes(shape, s, wl.lora_r) if flat else lora_layer_bytes(shape, s, wl.lora_r)
    tail = 2 * (4.0 * s * h + 2.0 * s * h)  # final RMSNorm float32 copy + final hidden states, per graph
    if wl.checkpointing:
        out["activations (2 graphs)"] = 2 * shape.layers * 2.0 * s * h + tail
        recompute = wl.recompute_factor * layer
    else:
        out["activations (2 graphs)"] = 2 * shape.layers * layer + tail
        recompute = 0.0
    views = 2 * 2.0 * s * h  # reference and target hidden states (no grad)
    grad_buffers = 2 * 4.0 * b * L * h  # d loss / d hidden of the critic and policy rows (float32)
    chunks = wl.vocab_tensors * min(wl.chunk, L) * b * V * 4.0
    # SharedBaseLM.head on a bf16 model: grad-enabled calls (the critic and policy chunk graphs) multiply float32
    # copies of the operands (torch.mm's float32 output has no autograd formula), and each graph keeps its copy of
    # the [V, H] weight until its autograd.grad: two float32 head weights alive
    head_copies = 2 * 4.0 * V * h
    out["no-grad views + update buffers"] = views + grad_buffers
    out["vocab-sized logits"] = chunks + head_copies
    out["backward recompute (1 layer)"] = recompute

    persistent = sum(out[k] for k in ("base weights", "FSDP gathered (root + 2 layers)",
                                      "adapters (policy, critic, target)",
                                      "optimizer states"))
    graphs = out["activations (2 graphs)"]
    phase_loss = persistent + graphs + views + grad_buffers + chunks + head_copies
    phase_backward = persistent + graphs + grad_buffers + recompute + out["gradients"]
    # the rollout: generation batch = the rank's environments, prompt + new tokens in the KV cache
    g = math.ceil(wl.envs / n)
    kv = 2 * shape.layers * g * wl.tokens * shape.kv_dim * 2.0
    prompt = wl.tokens - L
    prefill = 10.0 * g * prompt * shape.intermediate  # largest no-grad layer intermediates of the prompt pass
    out["KV cache (rollout)"] = kv
    # gradients of the previous update stay allocated through the rollout (zero_grad runs right before backward)
    phase_generation = persistent + out["gradients"] + kv + prefill
    out["phase: chunked losses"] = phase_loss
    out["phase: backward"] = phase_backward
    out["phase: rollout"] = phase_generation
    out["peak"] = max(phase_loss, phase_backward, phase_generation)
    out["sequences per GPU"] = float(b)
    return out


# ----------------------------------------------------------------------------------------------------------------
# the reference implementation (github.com/morning9393/ETPO): four fp16 copies, full fine-tuning, Lion
# ----------------------------------------------------------------------------------------------------------------

def reference_breakdown(shape: Shape = Shape(), wl: Workload = Workload(), envs: int = 8,
                        steps: int = 2) -> dict[str, float]:
    """Bytes of one update of the reference design, summed over all its GPUs (it spreads the models over 8 GPUs with
    ``device_map="auto"``, a naive layer split, so the sum is what must fit).

    * generator, critic, reference and target: 4 full copies in float16;
    * Lion optimizer (one momentum in the parameter dtype) over all parameters of policy and critic;
    * float16 gradients of both; no activation checkpointing, eager attention (transformers 4.33);
    * the forward returns float32 logits over every position ([B, T, V] in float16 and its ``.float()`` copy) for
      the critic and the policy; the losses add ~3 float32 [B, L, V] tensors;
    * the rollout buffer stores three float32 [ (steps + 1), envs, 256, V ] arrays (value_preds, pi_logits,
      rho_logits) in host memory; the update moves its [B, 256, V] slice of value predictions to the GPU.
    """
    s = wl.sequences * wl.tokens
    P, V, L = shape.params, shape.vocab, wl.action_tokens
    out: dict[str, float] = {}
    out["base weights"] = 4 * 2.0 * P
    out["FSDP gathered (root + 2 layers)"] = 0.0
    out["adapters (policy, critic, target)"] = 0.0
    out["optimizer states"] = 2 * 2.0 * P  # Lion: one fp16 momentum per param
    out["gradients"] = 2 * 2.0 * P
    out["activations (2 graphs)"] = 2 * shape.layers * full_eager_layer_bytes(shape, s, wl.tokens) + 2 * (
        4.0 * s * shape.hidden + 2.0 * s * shape.hidden)
    out["no-grad views + update buffers"] = wl.sequences * L * V * 4.0  # value_preds_batch on the GPU
    # full logits (fp16 + fp32 copy) of two models, and the loss tensors
    out["vocab-sized logits"] = 2 * 6.0 * s * V + 3 * 4.0 * wl.sequences * L * V
    out["backward recompute (1 layer)"] = 0.0
    out["KV cache (rollout)"] = 2 * shape.layers * envs * wl.tokens * shape.kv_dim * 2.0
    update = sum(out[k] for k in ("base weights", "optimizer states", "gradients",
                                  "activations (2 graphs)", "no-grad views + update buffers", "vocab-sized logits"))
    rollout_tensor = (steps + 1) * envs * 256 * V * 4.0
    out["phase: chunked losses"] = update
    out["phase: backward"] = update
    # its rollout moves the three buffer arrays to the GPU to compute KL and values (softmax, log, products: ~9
    # copies); the previous update's gradients are still allocated (zero_grad runs right before backward)
    out["phase: rollout"] = (out["base weights"] + out["optimizer states"] + out["gradients"]
                             + 9 * rollout_tensor)
    out["peak"] = max(update, out["phase: rollout"])
    out["host RAM: rollout buffer"] = 3 * rollout_tensor
    out["sequences per GPU"] = float(wl.sequences)
    return out


# ----------------------------------------------------------------------------------------------------------------
# the table
# ----------------------------------------------------------------------------------------------------------------

ROWS = ["base weights", "FSDP gathered (root + 2 layers)", "adapters (policy, critic, target)",
        "optimizer states", "gradients", "activations (2 graphs)",
        "no-grad views + update buffers", "vocab-sized logits", "backward recompute (1 layer)", "KV cache (rollout)",
        "phase: chunked losses", "phase: backward", "phase: rollout", "peak"]


def columns(shape: Shape = Shape(), wl: Workload = Workload()) -> list[tuple[str, dict[str, float]]]:
    cols = [("1 GPU", etpo_breakdown(shape, wl, 1)),
            ("1 GPU, no ckpt", etpo_breakdown(shape, replace(wl, checkpointing=False), 1))]
    for n in (2, 4, 8):
        cols.append((f"FSDP {n}", etpo_breakdown(shape, wl, n)))
    cols.append(("FSDP 2, flat adapters", etpo_breakdown(shape, wl, 2, adapters="shard")))
    cols.append(("reference impl. (total)", reference_breakdown(shape, wl)))
    return cols


def render(shape: Shape = Shape(), wl: Workload = Workload()) -> str:
    cols = columns(shape, wl)
    head = "| GB per GPU | " + " | ".join(name for name, _ in cols) + " |"
    sep = "| --- | " + " | ".join("---:" for _ in cols) + " |"
    lines = [head, sep]
    lines.append("| sequences per GPU | " + " | ".join(f"{int(c['sequences per GPU'])}" for _, c in cols) + " |")
    for row in ROWS:
        cells = []
        for _, c in cols:
            v = c.get(row, 0.0)
            cells.append(f"**{v / GB:.1f}**" if row == "peak" else f"{v / GB:.2f}")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    ref = cols[-1][1]
    lora = shape.lora_params(wl.lora_r)
    notes = [
        f"Workload: {wl.sequences} sequences x {wl.tokens} tokens ({wl.action_tokens} action tokens), token_chunk_size "
        f"{wl.chunk}, LoRA r = {wl.lora_r} ({lora / 1e6:.1f}M params per adapter), activation checkpointing "
        f"{'on' if wl.checkpointing else 'off'} unless stated.",
        f"Model: {shape.params / 1e9:.3f}B params (Llama h={shape.hidden}, {shape.layers} layers, {shape.heads} heads, "
        f"i={shape.intermediate}, V={shape.vocab}); bf16 weights = {2 * shape.params / GB:.2f} GB.",
        f"Reference implementation: host RAM for its rollout buffer {ref['host RAM: rollout buffer'] / GB:.2f} GB; "
        "optimizer states: AdamW (2 fp32 moments) of the policy and critic LoRA for ETPO, Lion (1 fp16 momentum) of "
        "all policy and critic weights for the reference; vocab-sized logits: ETPO's live [B, chunk, V] fp32 chunk "
        "tensors and two fp32 copies of the head weight, the reference's full [B, T, V] fp16 + fp32 logits of two models and its loss tensors; "
        f"its column is the total over the GPUs it spreads the models on (>= {math.ceil(ref['peak'] / (80 * GB))} "
        "x 80 GB if perfectly balanced).",
    ]
    return "\n".join(lines) + "\n\n" + "\n".join(f"* {n}" for n in notes) + "\n"


def per_layer_line(shape: Shape = Shape(), wl: Workload = Workload()) -> str:
    s = 1
    return (f"per token per decoder layer: LoRA (fp32 adapters, SDPA/flash) "
            f"{lora_layer_bytes(shape, s, wl.lora_r):,.0f} B; "
            f"LoRA computed in bf16 {lora_bf16_layer_bytes(shape, s, wl.lora_r):,.0f} B; full fine-tuning with eager "
            f"attention at T = {wl.tokens} {full_eager_layer_bytes(shape, s, wl.tokens):,.0f} B; "
            f"with checkpointing {2 * shape.hidden:,} B (the layer input)")


# ----------------------------------------------------------------------------------------------------------------
# measurements on CPU (torch needed): the constants above, re-derived
# ----------------------------------------------------------------------------------------------------------------

def measure_layer_saved_bytes(hidden: int = 64, intermediate: int = 176, heads: int = 4, batch: int = 2,
                              seq: int = 24, r: int = 8, mode: str = "lora", attn: str = "sdpa") -> int:
    """Bytes of the distinct storages autograd saves in one Llama decoder layer's forward (CPU, bf16 base).
    ``mode``: ``lora`` (frozen base, float32 adapters as peft keeps them), ``lora_bf16`` (adapters in bf16) or
    ``full`` (all weights trainable). Parameters, the layer input and the rotary tables are not counted."""
    import warnings

    import torch
    from peft import LoraConfig, inject_adapter_in_model
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    warnings.filterwarnings("ignore")
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=heads,
                      num_key_value_heads=heads, num_hidden_layers=1, vocab_size=64)
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    layer = LlamaDecoderLayer(cfg, 0).to(torch.bfloat16)
    if mode in ("lora", "lora_bf16"):
        layer.requires_grad_(False)
        lc = LoraConfig(r=r, lora_alpha=2 * r,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        layer = inject_adapter_in_model(lc, layer)
        dtype = torch.float32 if mode == "lora" else torch.bfloat16
        for name, p in layer.named_parameters():
            if "lora_" in name:
                p.data = p.data.to(dtype)
                p.requires_grad_(True)
    elif mode != "full":
        raise ValueError(mode)
    rope = LlamaRotaryEmbedding(cfg)
    x = torch.randn(batch, seq, hidden, dtype=torch.bfloat16, requires_grad=True)
    pos = torch.arange(seq)[None].expand(batch, seq)
    cos, sin = rope(x, pos)
    skip = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    skip |= {t.untyped_storage().data_ptr() for t in (x, cos, sin)}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, attention_mask=None, position_ids=pos, position_embeddings=(cos, sin))
    return sum(seen.values())


def measure_vocab_tensors(vocab: int = 2048, batch: int = 2, action_tokens: int = 64,
                          chunks: tuple[int, int] = (32, 64)) -> float:
    """How many float32 [B, chunk, V] tensors are alive at once in ``ETPOModule.update_loss``: the slope of its peak
    live-storage bytes (tracked on CPU with a dispatch mode) between two chunk sizes, in units of B * chunk * V * 4."""
    peaks = [_update_peak(vocab, batch, action_tokens, c) for c in chunks]
    return (peaks[1] - peaks[0]) / ((chunks[1] - chunks[0]) * batch * vocab * 4.0)


def _update_peak(vocab: int, batch: int, action_tokens: int, chunk: int) -> int:
    import warnings

    import torch
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    from modules.etpo import ETPOModule
    from modules.shared_base import BackboneConfig

    warnings.filterwarnings("ignore")

    class LivePeak(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.live: dict[int, tuple] = {}
            self.cur = self.peak = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                    st = t.untyped_storage()
                    key = st.data_ptr()
                    if key and key not in self.live:
                        self.live[key] = (StorageWeakRef(st), st.nbytes())
                        self.cur += st.nbytes()
            for key in [k for k, (w, _) in self.live.items() if w.expired()]:
                self.cur -= self.live.pop(key)[1]
            self.peak = max(self.peak, self.cur)
            return out

    alphabet = "".join(chr(0x4E00 + k) for k in range(vocab - 4))  # + 4 special tokens = vocab
    torch.manual_seed(0)
    module = ETPOModule(BackboneConfig(source="tiny", tiny_alphabet=alphabet, tiny_hidden_size=32, tiny_num_layers=2,
                                       lora_r=4, device="cpu"), token_chunk_size=chunk)
    module.configure_model()
    P = 8
    g = torch.Generator().manual_seed(0)
    batch_dict = {"prompt_ids": torch.randint(4, vocab, (batch, P), generator=g),
                  "prompt_mask": torch.ones(batch, P, dtype=torch.long),
                  "action_ids": torch.randint(4, vocab, (batch, action_tokens), generator=g),
                  "action_mask": torch.ones(batch, action_tokens, dtype=torch.long),
                  "rewards": torch.zeros(batch), "dones": torch.ones(batch),
                  "next_index": torch.full((batch,), -1), "next_needed": torch.zeros(0, dtype=torch.long)}
    mode = LivePeak()
    with mode:
        module.update_loss(batch_dict)
    return mode.peak


def measure_report() -> str:
    """Measured constants next to the formulas (small shapes, CPU)."""
    lines = []
    shapes = [(64, 176, 4, 2, 24), (96, 256, 4, 3, 40)]
    for hidden, inter, heads, batch, seq in shapes:
        shape = Shape(hidden=hidden, intermediate=inter, heads=heads, kv_heads=heads, layers=1)
        s = batch * seq
        for mode, attn, formula in (("lora", "sdpa", lora_layer_bytes(shape, s, 8)),
                                    ("lora_bf16", "sdpa", lora_bf16_layer_bytes(shape, s, 8)),
                                    ("full", "eager", full_eager_layer_bytes(shape, s, seq))):
            got = measure_layer_saved_bytes(hidden, inter, heads, batch, seq, 8, mode, attn)
            lines.append(f"layer {mode:9s} {attn:5s} h={hidden} i={inter} s={s}: measured {got} B, formula "
                         f"{formula:.0f} B")
    lines.append(f"vocab-sized float32 chunk tensors alive at once in update_loss: {measure_vocab_tensors():.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sequences", type=int, default=8, help="sequences in one update (paper: 16 transitions)")
    parser.add_argument("--tokens", type=int, default=768, help="prompt + action tokens per sequence")
    parser.add_argument("--action-tokens", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=64, help="ETPOModule.token_chunk_size")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--measure", action="store_true", help="re-derive the constants on CPU (needs torch)")
    args = parser.parse_args(argv)
    wl = Workload(sequences=args.sequences, tokens=args.tokens, action_tokens=args.action_tokens, chunk=args.chunk,
                  lora_r=args.lora_r)
    print(render(Shape(), wl))
    print(per_layer_line(Shape(), wl))
    if args.measure:
        print()
        print(measure_report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
