#!/usr/bin/env python
"""Peak GPU memory of one ETPO update for a Llama-7B-shaped model, on one GPU and under FSDP, next to the
reference implementation's four-full-copies design. Pure Python (no torch) unless ``--measure``.

    python tools/memory_model.py                       # the table for 8 sequences of 768 tokens (markdown)
    python tools/memory_model.py --sequences 16        # the paper's 16 transitions per update
    python tools/memory_model.py --no-prefix-sharing   # every view reads every row's whole prompt
    python tools/memory_model.py --measure             # re-derive the measured constants on CPU (needs torch)

The update it models is ``ETPOModule.learn`` (modules/etpo.py), phase by phase:

1. **targets**, no gradient: one forward each of the reference, target and policy views over the batch's plan;
   the action-aligned hidden states ``[B, L, H]`` of the three are kept for the chunked soft values, and the
   reference's stay alive for the policy step; vocabulary-sized tensors one ``[B, chunk, V]`` chunk at a time;
2. **critic step**: ONE autograd graph (the critic view); the loss reads only the taken token's logit
   (``SharedBaseLM.head_rows``) -- no vocabulary-sized tensor; backward, AdamW step, gradients freed;
3. **policy step**: a no-grad critic forward, ONE autograd graph (the policy view), the full-vocabulary KL chunk by
   chunk reduced to ``dL/dh``; backward, AdamW step, gradients freed;
4. the rollout before it: generation with the KV cache, the prompt prefix every row shares prefilled once.

Tokens per view forward: with prefix sharing (``backbone.prefix_sharing``, the default) the plan packs the
sequences into a prefix tree, so a prompt shared by the rows of a rank is computed once per view; without it every
row is computed in full (left-padded to one width). Every number is a prediction from the formulas below; none was
measured on a GPU. Measured exactly on CPU (``--measure``; tests/test_scale.py): the bytes autograd saves per
decoder layer, the number of live vocabulary-sized tensors in each phase of ``learn``, and the token count of a
plan. Assumptions are listed in docs/memory-model.md and in the docstrings here. Bytes are printed in GB (1e9).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, replace
from typing import Optional

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
    tokens: prompt + action tokens of a first attempt (its prompt = the task prompt, ``tokens - action_tokens``);
    action_tokens: L, the action part (rows of the vocabulary-sized work);
    reflection_rows: sequences whose prompt is a reflection (the task prompt followed by ``reflection_tokens`` of
        its own: the previous attempt and its error); None = a quarter of the sequences (a rollout of envs x 2 steps
        in which half of the first attempts fail);
    next_prompts: next-state prompts scored with the batch (episodes that go on after the batch's last step; they
        are reflections too); None = a quarter of the sequences;
    reflection_tokens: tokens a reflection prompt adds after the task prompt;
    prefix_sharing: the task prompt is computed once per view and rank (``backbone.prefix_sharing``), else every row
        in full; view_tokens, view_rows: tokens one view forward computes per GPU (padding included) in how many rows,
        given directly (a plan's ``tokens_computed`` and rows, as tools/gpu_smoke.py does) instead of derived from
        the fields above;
    chunk: ``token_chunk_size`` of ETPOModule; lora_r: adapter rank; checkpointing: per-decoder-layer recompute;
    vocab_tensors_targets / vocab_tensors_policy: float32 ``[B, chunk, V]`` tensors alive at once in the chunk loops
        of the targets and of the policy step (measured on CPU: 10 and 8, none in the critic step; see
        :func:`measure_vocab_tensors`); recompute_factor: backward working set of one recomputed layer as a multiple
        of its saved activations (assumption: 1.5 = the saved tensors plus half as much again in gradient
        temporaries); envs: parallel environments = the generation batch of the rollout (global; split over GPUs
        under FSDP).
    """

    sequences: int = 8
    tokens: int = 768
    action_tokens: int = 256
    reflection_rows: Optional[int] = None
    next_prompts: Optional[int] = None
    reflection_tokens: int = 288
    prefix_sharing: bool = True
    view_tokens: Optional[int] = None
    view_rows: int = 1
    chunk: int = 64
    lora_r: int = 16
    checkpointing: bool = True
    vocab_tensors_targets: float = 10.0
    vocab_tensors_policy: float = 8.0
    recompute_factor: float = 1.5
    envs: int = 8

    @property
    def prompt_tokens(self) -> int:
        return self.tokens - self.action_tokens

    @property
    def reflections(self) -> int:
        return self.sequences // 4 if self.reflection_rows is None else self.reflection_rows

    @property
    def next_states(self) -> int:
        return self.sequences // 4 if self.next_prompts is None else self.next_prompts


@dataclass(frozen=True)
class Layout:
    """How one view forward lays out a rank's share of the batch: ``rows`` of ``width`` token positions
    (``tokens = rows * width`` computed, padding included)."""

    rows: int
    width: int

    @property
    def tokens(self) -> int:
        return self.rows * self.width


def view_layout(wl: Workload, gpus: int = 1) -> Layout:
    """The forward of one view per GPU, as ``SharedBaseLM.plan`` lays it out.

    A sequence is its prompt and its action but the last token (which predicts nothing). With prefix sharing all
    of a rank's sequences and next prompts go into one prefix tree (one row; the planner keeps one pack when
    attention is cheap next to the rest of a layer, as at 7B shapes): the task prompt once, every action's own
    ``L - 1`` tokens, every reflection's own ``reflection_tokens``. Without it every sequence and next prompt is a
    row of its own, left-padded to the longest. Exact against the planner (tests/test_scale.py)."""
    n = max(1, int(gpus))
    if wl.view_tokens is not None:
        return Layout(wl.view_rows, int(wl.view_tokens) // max(1, wl.view_rows))
    b = math.ceil(wl.sequences / n)
    r = min(b, math.ceil(wl.reflections / n))
    k = math.ceil(wl.next_states / n)
    P, L, R = wl.prompt_tokens, wl.action_tokens, wl.reflection_tokens
    if wl.prefix_sharing:
        return Layout(1, P + b * (L - 1) + (r + k) * R)
    widths = [P + L - 1] if b > r else []
    widths += [P + R + L - 1] if r else []
    widths += [P + R] if k else []
    return Layout(b + k, max(widths))


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

def forward_working_bytes(shape: Shape, s: int) -> float:
    """Transient bytes of one decoder layer's forward that keeps nothing for backward (no-grad views, the
    checkpointed forward of a trainable view, generation's prefill) over ``s`` tokens: the MLP's bf16 ``[s, i]``
    intermediates and peft's float32 copy of ``down_proj``'s input (``10 s i``), plus the residual stream and the
    layer output (``4 s h``). An assumption (not measured)."""
    return 10.0 * s * shape.intermediate + 4.0 * s * shape.hidden


def etpo_breakdown(shape: Shape = Shape(), wl: Workload = Workload(), gpus: int = 1,
                   adapters: str = "replicate") -> dict[str, Optional[float]]:
    """Per-GPU bytes of one ETPO update (``ETPOModule.learn``), phase by phase, and of the rollout before it.

    ``gpus > 1``: FSDP FULL_SHARD over ``gpus`` ranks with the global batch split (each rank ``ceil(sequences /
    gpus)`` sequences, its own prefix tree); ``adapters``: ``replicate`` (modules.shared_base.fsdp default: LoRA
    FSDP-ignored, float32) or ``shard`` (everything flattened: float32 storage, bf16 compute, gradient shards for
    the frozen weights too). Component rows are what a phase adds to the persistent state; the ``phase:`` rows sum
    what is alive at the worst moment of each phase."""
    n = max(1, int(gpus))
    b = math.ceil(wl.sequences / n)
    layout = view_layout(wl, n)
    s = layout.tokens
    h, V, L = shape.hidden, shape.vocab, wl.action_tokens
    lora = shape.lora_params(wl.lora_r)
    sharded = n > 1
    flat = sharded and adapters == "shard"
    out: dict[str, Optional[float]] = {}

    # persistent state
    if not sharded:
        out["base weights"] = 2.0 * shape.params
        out["FSDP gathered (root + 2 layers)"] = 0.0
    else:
        storage = 4.0 if flat else 2.0  # shard mode needs one dtype per unit: float32 storage
        out["base weights"] = storage * shape.params / n
        out["FSDP gathered (root + 2 layers)"] = 2.0 * (shape.root_params + 2 * shape.layer_params)
    out["adapters (policy, critic, target)"] = 3 * 4.0 * lora / (n if flat else 1)
    out["optimizer states"] = 2 * 2 * 4.0 * lora / (n if flat else 1)  # two AdamW, two fp32 moments each
    persistent = sum(out[k] for k in ("base weights", "FSDP gathered (root + 2 layers)",
                                      "adapters (policy, critic, target)", "optimizer states"))

    # gradients exist only from a step's backward to its optimizer step (zero_grad(set_to_none) before and after):
    # one adapter's at a time
    if flat:  # FSDP1 allocates a gradient for the whole flat parameter (frozen weights included), sharded
        grads = 4.0 * shape.layers * shape.layer_params / n + 2.0 * shape.layer_params
    else:  # + the flat all-reduce buffer of the replicated adapters' gradients under FSDP
        grads = 4.0 * lora * (2 if sharded else 1)
    out["gradients"] = grads

    # the plan: packed rows carry a [T, T] boolean tree mask (kept for the whole update); plain rows get the 4D
    # padding mask transformers builds from the 2D one, [rows, 1, W, W] booleans per forward
    mask = float(layout.rows * layout.width * layout.width)
    out["attention mask"] = mask

    # one autograd graph at a time (critic view in step 2, policy view in step 3)
    layer = lora_bf16_layer_bytes(shape, s, wl.lora_r) if flat else lora_layer_bytes(shape, s, wl.lora_r)
    tail = 4.0 * s * h + 2.0 * s * h  # final RMSNorm float32 copy + final hidden states
    if wl.checkpointing:
        graph = shape.layers * 2.0 * s * h + tail  # each layer's input
        recompute = wl.recompute_factor * layer
        forward_graph = forward_working_bytes(shape, s)  # the checkpointed forward keeps its intermediates briefly
    else:
        graph = shape.layers * layer + tail
        recompute = 0.0
        forward_graph = 0.0  # intermediates are what the graph saves
    out["activations (graphs)"] = graph
    forward_nograd = forward_working_bytes(shape, s)
    out["forward working set"] = forward_nograd

    hidden = 2.0 * b * L * h  # one view's action-aligned hidden states [B, L, H], bf16
    f32 = 4.0 * b * L * h  # a float32 [B, L, H] tensor
    unit = min(wl.chunk, L) * b * V * 4.0  # one float32 [B, chunk, V] tensor
    chunks_targets = wl.vocab_tensors_targets * unit
    # SharedBaseLM.head on a bf16 model: the grad-enabled policy chunk multiplies a float32 copy of the [V, H] head
    # weight (torch.mm's float32 output has no autograd formula), alive until the chunk's autograd.grad
    chunks_policy = wl.vocab_tensors_policy * unit + 4.0 * V * h
    out["vocab-sized: targets (chunks)"] = chunks_targets
    out["vocab-sized: loss phase"] = chunks_policy
    out["hidden states + dL/dh buffers"] = 3 * hidden + 2 * f32  # the policy step's (the largest)
    out["backward recompute (1 layer)"] = recompute

    # phase 1: three no-grad forwards one after the other, then the chunk loop over the three kept views
    targets = persistent + mask + max(2 * hidden + forward_nograd, 3 * hidden + chunks_targets)
    # phase 2: the reference states stay; the critic graph; head_rows keeps the taken tokens' head rows and the
    # float32 hidden states ([B, L, H] float32 each) for its backward
    critic = persistent + mask + hidden + graph + 2 * f32 + max(forward_graph, recompute + grads)
    # phase 3: reference and critic states (no grad), the policy graph and its hidden states; the chunk loop adds
    # the float32 dL/dh buffer and the chunks; the surrogate's backward keeps h.float() and the buffer
    policy = persistent + mask + 2 * hidden + max(
        forward_nograd,  # the no-grad critic forward
        graph + forward_graph,
        graph + hidden + f32 + chunks_policy,
        graph + hidden + 2 * f32 + recompute + grads)
    # the rollout: generation batch = the rank's environments, every row left-padded to the longest prompt (a
    # reflection's, in a step after failed attempts) + the new tokens in the KV cache; the shared prefix's cache is
    # computed once and then repeated for every row (it saves compute, not cache memory), after which the prefill
    # runs every row's own tokens
    g = math.ceil(wl.envs / n)
    own = wl.reflection_tokens if wl.reflections else 0
    kv = 2 * shape.layers * g * (wl.tokens + own) * shape.kv_dim * 2.0
    prompt = wl.prompt_tokens
    prefill_tokens = max(prompt, g * max(1, own)) if wl.prefix_sharing else g * (prompt + own)
    prefill = forward_working_bytes(shape, prefill_tokens)
    out["KV cache (rollout)"] = kv
    out["phase 1: targets (no grad)"] = targets
    out["phase 2: critic step"] = critic
    out["phase 3: policy step"] = policy
    out["phase: one update (both graphs)"] = None
    out["phase: rollout"] = persistent + kv + prefill
    out["peak"] = max(targets, critic, policy, out["phase: rollout"])
    out["sequences per GPU"] = float(b)
    out["tokens per view forward"] = float(s)
    return out


# ----------------------------------------------------------------------------------------------------------------
# the reference implementation (github.com/morning9393/ETPO): four fp16 copies, full fine-tuning, Lion
# ----------------------------------------------------------------------------------------------------------------

def reference_breakdown(shape: Shape = Shape(), wl: Workload = Workload(), envs: int = 8,
                        steps: int = 2) -> dict[str, Optional[float]]:
    """Bytes of one update of the reference design, summed over all its GPUs (it spreads the models over 8 GPUs with
    ``device_map="auto"``, a naive layer split, so the sum is what must fit).

    * generator, critic, reference and target: 4 full copies in float16;
    * Lion optimizer (one momentum in the parameter dtype) over all parameters of policy and critic;
    * float16 gradients of both; no activation checkpointing, eager attention (transformers 4.33); one update step
      in which both graphs (policy and critic) are alive at once;
    * every row is computed in full (``sequences x tokens``; no shared prompt);
    * the forward returns float32 logits over every position ([B, T, V] in float16 and its ``.float()`` copy) for
      the critic and the policy; the losses add ~3 float32 [B, L, V] tensors;
    * the rollout buffer stores three float32 [ (steps + 1), envs, 256, V ] arrays (value_preds, pi_logits,
      rho_logits) in host memory; the update moves its [B, 256, V] slice of value predictions to the GPU.
    Rows that have no counterpart in that design are None.
    """
    s = wl.sequences * wl.tokens
    P, V, L = shape.params, shape.vocab, wl.action_tokens
    out: dict[str, Optional[float]] = {}
    out["base weights"] = 4 * 2.0 * P
    out["FSDP gathered (root + 2 layers)"] = 0.0
    out["adapters (policy, critic, target)"] = 0.0
    out["optimizer states"] = 2 * 2.0 * P  # Lion: one fp16 momentum per param
    out["gradients"] = 2 * 2.0 * P
    out["attention mask"] = None
    out["activations (graphs)"] = 2 * shape.layers * full_eager_layer_bytes(shape, s, wl.tokens) + 2 * (
        4.0 * s * shape.hidden + 2.0 * s * shape.hidden)
    out["forward working set"] = None
    out["hidden states + dL/dh buffers"] = None
    out["vocab-sized: targets (chunks)"] = None
    # full logits (fp16 + fp32 copy) of two models, the loss tensors, and value_preds_batch moved to the GPU
    out["vocab-sized: loss phase"] = 2 * 6.0 * s * V + 3 * 4.0 * wl.sequences * L * V + wl.sequences * L * V * 4.0
    out["backward recompute (1 layer)"] = None
    out["KV cache (rollout)"] = 2 * shape.layers * envs * wl.tokens * shape.kv_dim * 2.0
    update = sum(out[k] for k in ("base weights", "optimizer states", "gradients", "activations (graphs)",
                                  "vocab-sized: loss phase"))
    rollout_tensor = (steps + 1) * envs * 256 * V * 4.0
    for phase in ("phase 1: targets (no grad)", "phase 2: critic step", "phase 3: policy step"):
        out[phase] = None
    out["phase: one update (both graphs)"] = update
    # its rollout moves the three buffer arrays to the GPU to compute KL and values (softmax, log, products: ~9
    # copies); the previous update's gradients are still allocated (zero_grad runs right before backward)
    out["phase: rollout"] = (out["base weights"] + out["optimizer states"] + out["gradients"]
                             + 9 * rollout_tensor)
    out["peak"] = max(update, out["phase: rollout"])
    out["host RAM: rollout buffer"] = 3 * rollout_tensor
    out["sequences per GPU"] = float(wl.sequences)
    out["tokens per view forward"] = float(s)
    return out


# ----------------------------------------------------------------------------------------------------------------
# the table
# ----------------------------------------------------------------------------------------------------------------

ROWS = ["base weights", "FSDP gathered (root + 2 layers)", "adapters (policy, critic, target)", "optimizer states",
        "gradients", "attention mask", "activations (graphs)", "forward working set", "hidden states + dL/dh buffers",
        "vocab-sized: targets (chunks)", "vocab-sized: loss phase", "backward recompute (1 layer)",
        "KV cache (rollout)", "phase 1: targets (no grad)", "phase 2: critic step", "phase 3: policy step",
        "phase: one update (both graphs)", "phase: rollout", "peak"]


def columns(shape: Shape = Shape(), wl: Workload = Workload()) -> list[tuple[str, dict[str, Optional[float]]]]:
    other = replace(wl, prefix_sharing=not wl.prefix_sharing)
    cols = [("1 GPU", etpo_breakdown(shape, wl, 1)),
            ("1 GPU, " + ("no prefix sharing" if wl.prefix_sharing else "prefix sharing"),
             etpo_breakdown(shape, other, 1)),
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
    lines.append("| tokens per view forward | " + " | ".join(f"{int(c['tokens per view forward']):,}" for _, c in cols)
                 + " |")
    for row in ROWS:
        cells = []
        for _, c in cols:
            v = c.get(row)
            if v is None:
                cells.append("–")
            else:
                cells.append(f"**{v / GB:.1f}**" if row == "peak" else f"{v / GB:.2f}")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    ref = cols[-1][1]
    lora = shape.lora_params(wl.lora_r)
    notes = [
        f"Workload: {wl.sequences} sequences of a {wl.prompt_tokens}-token task prompt + {wl.action_tokens} action "
        f"tokens, {wl.reflections} of them reflections and {wl.next_states} next-state prompts (each the task prompt "
        f"+ {wl.reflection_tokens} tokens of its own), token_chunk_size {wl.chunk}, LoRA r = {wl.lora_r} "
        f"({lora / 1e6:.1f}M params per adapter), prefix sharing {'on' if wl.prefix_sharing else 'off'} and "
        f"activation checkpointing {'on' if wl.checkpointing else 'off'} unless stated.",
        f"Model: {shape.params / 1e9:.3f}B params (Llama h={shape.hidden}, {shape.layers} layers, {shape.heads} heads, "
        f"i={shape.intermediate}, V={shape.vocab}); bf16 weights = {2 * shape.params / GB:.2f} GB.",
        "Component rows are what a phase adds to the persistent state (weights, adapters, optimizer states); the "
        "phase rows sum what is alive at the worst moment of each phase (ETPO: targets, critic step, policy step, "
        "rollout; the reference design: one update holding both graphs). '–': no such part in that design.",
        "ETPO: gradients of one adapter at a time (freed after its step; under FSDP plus the all-reduce buffer); one "
        "autograd graph at a time; vocab-sized: the targets' and the policy step's live [B, chunk, V] float32 "
        f"chunks ({wl.vocab_tensors_targets:g} and {wl.vocab_tensors_policy:g}, measured), the policy step's plus a "
        "float32 copy of the [V, H] head weight; the critic step has none (taken-token head rows only).",
        f"Reference implementation: host RAM for its rollout buffer {ref['host RAM: rollout buffer'] / GB:.2f} GB; "
        "Lion (1 fp16 momentum) of all policy and critic weights; its full [B, T, V] fp16 + fp32 logits of two "
        "models, its loss tensors and value predictions; "
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


def _tiny_module(vocab: int, chunk: int = 64, **backbone):
    """An ETPOModule over a random 2-layer Llama whose tokenizer has exactly ``vocab`` tokens (CPU)."""
    from modules.etpo import ETPOModule
    from modules.shared_base import BackboneConfig

    alphabet = "".join(chr(0x4E00 + k) for k in range(vocab - 4))  # + 4 special tokens = vocab
    module = ETPOModule(BackboneConfig(source="tiny", tiny_alphabet=alphabet, tiny_hidden_size=32, tiny_num_layers=2,
                                       lora_r=4, device="cpu", **backbone), token_chunk_size=chunk)
    module.configure_model()
    return module


def workload_batch(wl: Workload, vocab: int, seed: int = 0):
    """A ``RolloutBatch`` laid out as ``wl`` describes it: first attempts reading one task prompt, reflection rows and
    next-state prompts = the task prompt + ``reflection_tokens`` of their own, full-length actions. Every action and
    reflection tail is drawn from ids no other row uses, so no two rows share more than the task prompt."""
    import torch

    from datamodules.batch import GenerationConfig, RolloutBatch, RolloutMetrics

    g = torch.Generator().manual_seed(seed)
    B, P, L, R = wl.sequences, wl.prompt_tokens, wl.action_tokens, wl.reflection_tokens
    r, k = wl.reflections, wl.next_states
    fresh = iter(torch.randperm(vocab - 4, generator=g).add(4).tolist())
    task = [next(fresh) for _ in range(P)]
    own = lambda n: [next(fresh) for _ in range(n)]  # noqa: E731
    prompts = [task + own(R) if row >= B - r else list(task) for row in range(B)]
    nexts = [task + own(R) for _ in range(k)]
    actions = torch.tensor([own(L) for _ in range(B)], dtype=torch.long)

    def left_pad(rows):
        width = max(len(x) for x in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, x in enumerate(rows):
            ids[i, width - len(x):] = torch.tensor(x)
            mask[i, width - len(x):] = 1
        return ids, mask

    prompt_ids, prompt_mask = left_pad(prompts)
    next_ids, next_mask = left_pad(nexts) if k else (None, None)
    terminated = torch.tensor([row >= k for row in range(B)])  # the first k go on: their next prompts are given
    return RolloutBatch(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask, action_ids=actions, action_mask=torch.ones_like(actions),
        rewards=torch.rand(B, generator=g), terminated=terminated, truncated=torch.zeros(B, dtype=torch.bool),
        next_index=torch.full((B,), -1), next_needed=torch.arange(k), env_index=torch.arange(B),
        episode_step=torch.ones(B, dtype=torch.long), runnable=torch.ones(B, dtype=torch.bool), policy_version=0,
        sampling=GenerationConfig(max_new_tokens=L), metrics=RolloutMetrics(0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
        next_prompt_ids=next_ids, next_prompt_mask=next_mask)


def measure_view_tokens(wl: Workload, vocab: int = 512) -> dict[str, int]:
    """What ``SharedBaseLM.plan`` makes of a batch laid out as ``wl`` (tiny model, CPU): ``shared`` = real tokens of
    its prefix trees (``PackedBatch.num_nodes``) in ``packs`` rows, ``shared_computed`` = the same with the packs'
    padding, ``plain`` = the plain plan's ``tokens_computed``."""
    import warnings

    warnings.filterwarnings("ignore")
    module = _tiny_module(vocab)
    batch = workload_batch(wl, vocab)
    args = (batch.prompt_ids, batch.prompt_mask, batch.action_ids, batch.action_mask, batch.next_prompt_ids,
            batch.next_prompt_mask)
    shared = module.model.plan(*args, share_prefixes=True)
    plain = module.model.plan(*args, share_prefixes=False)
    return {"shared": shared.packed.num_nodes, "packs": int(shared.packed.input_ids.shape[0]),
            "shared_computed": shared.tokens_computed, "plain": plain.tokens_computed}


#: phases of ETPOModule.learn as measure_vocab_tensors names them, by the loss function each optimizer step takes
_STEP_PHASES = {"critic_loss": "critic step", "policy_loss": "policy step"}


def measure_vocab_tensors(vocab: int = 2048, batch: int = 2, action_tokens: int = 64, chunk: int = 32,
                          **backbone) -> dict[str, float]:
    """The most vocabulary-sized bytes alive at once in each phase of ``ETPOModule.learn`` (``targets``, ``critic
    step``, ``policy step``), in units of one float32 ``[B, chunk, V]`` tensor: every storage of at least that size
    created during ``learn`` (the model's own weights excluded) is tracked while it lives, with a dispatch mode on
    the CPU (forwards, backwards and optimizer steps). ``action_tokens`` is a multiple of ``chunk`` so that every
    chunk is full; ``vocab`` is large next to the tiny model's hidden size, so nothing else reaches that size."""
    import warnings

    import torch
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    if action_tokens % chunk:
        raise ValueError("action_tokens must be a multiple of chunk (full chunks only)")
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    module = _tiny_module(vocab, chunk, **backbone)
    wl = Workload(sequences=batch, tokens=8 + action_tokens, action_tokens=action_tokens, reflection_rows=0,
                  next_prompts=1, reflection_tokens=3)
    rollout = workload_batch(wl, vocab)
    unit = batch * chunk * vocab * 4
    existing = {t.untyped_storage().data_ptr() for t in list(module.parameters()) + list(module.buffers())}

    class VocabSized(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.live: dict[int, tuple] = {}
            self.bytes = 0
            self.phase: Optional[str] = None
            self.peaks: dict[str, int] = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
                self.bytes -= self.live.pop(key)[1]
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                    st = t.untyped_storage()
                    key = st.data_ptr()
                    if key and st.nbytes() >= unit and key not in self.live and key not in existing:
                        self.live[key] = (StorageWeakRef(st), st.nbytes())
                        self.bytes += st.nbytes()
            if self.phase is not None:
                self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), self.bytes)
            return out

    mode = VocabSized()
    compute_targets, optimizer_step_on = module.compute_targets, module.optimizer_step_on

    def targets(*args):
        mode.phase = "targets"
        try:
            return compute_targets(*args)
        finally:
            mode.phase = None

    def step(optimizer, loss_fn, *args):
        mode.phase = _STEP_PHASES[loss_fn.__name__]
        try:
            return optimizer_step_on(optimizer, loss_fn, *args)
        finally:
            mode.phase = None

    module.compute_targets, module.optimizer_step_on = targets, step  # learn looks both up on the instance
    with module.without_trainer(), mode:
        module.learn(rollout)
    return {phase: mode.peaks.get(phase, 0) / unit for phase in ("targets", "critic step", "policy step")}


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
    wl = Workload()
    assumed = {"targets": wl.vocab_tensors_targets, "critic step": 0.0, "policy step": wl.vocab_tensors_policy}
    for ckpt in (False, True):
        counts = measure_vocab_tensors(gradient_checkpointing=ckpt)
        lines.append(f"live float32 [B, chunk, V] tensors in ETPOModule.learn (checkpointing "
                     f"{'on' if ckpt else 'off'}): "
                     + ", ".join(f"{k} {v:.1f} (model: {assumed[k]:g})" for k, v in counts.items()))
    small = Workload(sequences=6, tokens=20, action_tokens=8, reflection_rows=2, next_prompts=2, reflection_tokens=5)
    got = measure_view_tokens(small)
    lines.append(f"tokens per view forward, {small.sequences} sequences ({small.reflections} reflections) + "
                 f"{small.next_states} next prompts: planner {got['shared']} shared ({got['shared_computed']} with "
                 f"pack padding) / {got['plain']} plain; formula {view_layout(small).tokens} / "
                 f"{view_layout(replace(small, prefix_sharing=False)).tokens}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sequences", type=int, default=8, help="sequences in one update (paper: 16 transitions)")
    parser.add_argument("--tokens", type=int, default=768, help="task prompt + action tokens of a first attempt")
    parser.add_argument("--action-tokens", type=int, default=256)
    parser.add_argument("--reflection-rows", type=int, default=None, help="reflection sequences (default: 1/4)")
    parser.add_argument("--next-prompts", type=int, default=None, help="next-state prompts (default: 1/4)")
    parser.add_argument("--reflection-tokens", type=int, default=288, help="a reflection's own tokens")
    parser.add_argument("--no-prefix-sharing", action="store_true", help="every row's prompt computed in full")
    parser.add_argument("--chunk", type=int, default=64, help="ETPOModule.token_chunk_size")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--measure", action="store_true", help="re-derive the constants on CPU (needs torch)")
    args = parser.parse_args(argv)
    wl = Workload(sequences=args.sequences, tokens=args.tokens, action_tokens=args.action_tokens,
                  reflection_rows=args.reflection_rows, next_prompts=args.next_prompts,
                  reflection_tokens=args.reflection_tokens, prefix_sharing=not args.no_prefix_sharing,
                  chunk=args.chunk, lora_r=args.lora_r)
    print(render(Shape(), wl))
    print(per_layer_line(Shape(), wl))
    if args.measure:
        print()
        print(measure_report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
