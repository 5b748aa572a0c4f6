#!/usr/bin/env python
"""Rollout speed: transformers' ``generate`` (the plain path) against the fast generation path, in one run.

    python tools/bench_rollout.py                  # CUDA: a CodeLlama-7B-shaped model, 8 / 32 / 64 rows
                                                   #   -> docs/results/gpu/rollout.json (+ rollout_details.json)
    python tools/bench_rollout.py --quickstart     # CPU: SmolLM2-135M on the quickstart's generation batches
    python tools/bench_rollout.py --quickstart --profile   # ... and where a generation's time goes (torch.profiler)
    python tools/bench_rollout.py --tiny --json OUT.json    # the CUDA measurement's code path, tiny model, CPU
    python tools/bench_rollout.py --tiny --profile          # a 7B step's host side: 32 tiny layers, kernels per step

Both paths are ``SharedBaseLM.generate_from_ids`` on the same model, prompts and seeds -- ``fast=False`` is
transformers' ``generate`` with a growing ``DynamicCache`` and LoRA layers in the sampling path (the project's path
before issue 33), ``fast=True`` is ``modules.shared_base.fast_decoding`` -- called alternately, so that a noisy
machine slows both alike. The policy adapter is perturbed from its zero initialisation (seeded), so its LoRA
weights change the logits as a trained adapter's would (a freshly initialised adapter merges trivially).

**CUDA** (the default; exit 3 without CUDA unless ``--tiny``): the model of ``tools/gpu_smoke.py`` (CodeLlama-7B
shapes, random bf16 weights built on the GPU, nothing downloaded) with that tool's rollout prompts for ``rows``
environments -- a 512-token task prompt, half the rows a reflection of it (its head, 128 tokens of their own, its
final stub), so the rows share a 496-token prefix and are padded differently. For every ``--rows`` value: one sampled
generation of ``--new-tokens`` tokens per path (temperature 0.5, top-k 50; ms per decoding step = the call's wall time,
prefill and -- on the fast path -- the CUDA-graph capture included, over the steps it ran; tokens/s = generated tokens
over the same time), and one greedy generation of ``--greedy-tokens`` per path, whose tokens are compared
(``greedy_tokens_identical``). ``rollout.json`` holds exactly the issue's fields; ``rollout_details.json`` adds the
first greedy divergence of each row and the two candidates' logit gap there, peak memory, and the fast path with the
adapter merged into bf16 weights (not the default: see fast_decoding's docstring).

**CPU, --quickstart**: the quickstart's backbone (configs/model/smollm2.yaml) and its two kinds of generation batch
(``tools/bench_update_layouts.py``'s, from real untrained answers on tic_tac_toe): 8 rows of the few-shot task prompt,
and 8 rows that each carry an earlier answer and its AUC. Sampling as the quickstart samples (96 tokens, temperature
0.5, top-k 50, its stop strings), ``--repeats`` alternate calls per path with the same seed -- three paths: plain,
the fast path with transformers' layers (``fused_decoding`` off) and the fast path as configured (the fused step on
packed weights) -- median wall and CPU seconds, their ratios, and whether each drew plain's tokens (sampled and
greedy).
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
import etpo  # noqa: E402,F401  (before torch: passive OpenMP waits, as in python -m etpo.fit)

EXIT_NO_CUDA = 3
#: the fields of one row of docs/results/gpu/rollout.json, as issue 33 asks for them
ROLLOUT_FIELDS = ("model", "device", "rows", "new_tokens", "ms_per_step_eager", "ms_per_step_fast",
                  "tokens_per_s_eager", "tokens_per_s_fast", "greedy_tokens_identical")
QUICKSTART_STOP_STRINGS = ["\ndef ", '\n"""', "\nclass ", "\nif __name__"]
WARNINGS: list[str] = []  # runtime warnings of the timed calls (rollout_details.json keeps them)


def load_tool(name: str):
    """Another tool of this folder as a module (``tools`` is a namespace package of the repository on sys.path)."""
    return importlib.import_module(f"tools.{name}")


def perturb_policy(model, scale: float, seed: int = 0) -> None:
    """Give the policy adapter's zero-initialised ``B`` matrices seeded random values: the LoRA path then changes
    the logits, as after training."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model._params["policy"]:
            if "lora_B" in name:
                p.copy_((torch.randn(p.shape, generator=g) * scale).to(p.dtype))


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_generation(model, ids, mask, fast, seed: int, **sampling):
    """One ``generate_from_ids`` call: (wall s, CPU s, Generation, decoding steps, peak GB or None). ``fast``: False
    (plain), True (the fast path as configured) or "layers" (the fast path with ``fused_decoding`` off: its decoding
    steps through transformers' layers, as before the fused step)."""
    import torch

    if fast == "layers":
        fused = model.config.fused_decoding
        model.config.fused_decoding = False
        try:
            return timed_generation(model, ids, mask, True, seed, **sampling)
        finally:
            model.config.fused_decoding = fused
    device = model.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(seed)
    _sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        wall, cpu = time.perf_counter(), time.process_time()
        out = model.generate_from_ids(ids, mask, fast=fast, **sampling)
        _sync(device)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    for warning in caught:  # e.g. a decoding step that could not be captured in a CUDA graph: said, and kept
        print(f"warning: {warning.message}", file=sys.stderr)
        WARNINGS.append(str(warning.message))
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    return wall, cpu, out, int(out.action_ids.shape[1]), peak


def greedy_divergence(model, plain, fast) -> list[dict]:
    """Rows whose greedy tokens differ: the first differing position and, there, the plain path's logit of its own
    token minus that of the fast path's token (scored by the model's forward: a gap within float error is a tie)."""
    import torch

    rows = [b for b in range(plain.action_ids.shape[0])
            if not torch.equal(plain.action_ids[b] * plain.action_mask[b], fast.action_ids[b] * fast.action_mask[b])]
    if not rows:
        return []
    with torch.no_grad():
        logits = model.action_logits("policy", plain.prompt_ids, plain.prompt_mask, plain.action_ids,
                                     plain.action_mask)
    found = []
    for b in rows:
        width = min(plain.action_ids.shape[1], fast.action_ids.shape[1])
        differs = (plain.action_ids[b, :width] != fast.action_ids[b, :width]).nonzero()
        j = int(differs[0]) if len(differs) else width
        if j >= logits.shape[1]:
            found.append({"row": b, "position": j, "logit_gap": None})
            continue
        a, f = int(plain.action_ids[b, j]), int(fast.action_ids[b, j])
        found.append({"row": b, "position": j, "logit_gap": float(logits[b, j, a] - logits[b, j, f])})
    return found


# ----------------------------------------------------------------------------------------------------------------
# CUDA (and its --tiny check): rows sweep at CodeLlama-7B shapes
# ----------------------------------------------------------------------------------------------------------------

def rows_prompts(smoke, shape, rows: int):
    """Step-1 prompts of ``tools/gpu_smoke.py``'s synthetic rollout for ``rows`` environments: the task prompt and
    reflections of it, alternating (left-padded to their own width)."""
    from dataclasses import replace

    wide = replace(shape, envs=rows, steps=2)
    batch = smoke.synthetic_batch(wide, seed=0)
    return smoke.step_prompts(batch, wide, 1)


def merged_fast_seconds(model, ids, mask, seed: int, **sampling) -> tuple[float, int]:
    """The fast path with the policy adapter merged into the (16-bit) weights: wall seconds and steps."""
    import torch

    from modules.shared_base.fast_decoding import FastDecoder, Sampler, merged_adapter

    sampler = Sampler(True, sampling["temperature"], sampling["top_k"], 1.0)
    was_training = model.training
    model.eval()
    try:
        torch.manual_seed(seed)
        _sync(model.device)
        wall = time.perf_counter()
        with merged_adapter(model, "policy"), torch.no_grad():
            seq, width, _ = FastDecoder(model).run(ids, mask, sampling["max_new_tokens"], sampler,
                                                   model.eos_token_ids, None, True)
        _sync(model.device)
        return time.perf_counter() - wall, int(seq.shape[1] - width)
    finally:
        model.train(was_training)


def measure_rows(model, smoke, shape, rows_list, new_tokens: int, greedy_tokens: int, label: str, device_name: str,
                 merged: bool = True, say=print) -> tuple[list[dict], list[dict]]:
    """The CUDA measurement (any device): per rows value one sampled and one greedy call per path."""
    import torch

    summary, details = [], []
    sample = dict(max_new_tokens=new_tokens, temperature=0.5, top_k=50, top_p=1.0, do_sample=True)
    greedy = dict(max_new_tokens=greedy_tokens, do_sample=False)
    warm_ids, warm_mask = rows_prompts(smoke, shape, 2)
    for fast in (False, True):  # warm-up: cuBLAS handles, the allocator, the stop-string tables
        timed_generation(model, warm_ids, warm_mask, fast, 0, **dict(sample, max_new_tokens=4))
    for rows in rows_list:
        ids, mask = rows_prompts(smoke, shape, rows)
        eager = timed_generation(model, ids, mask, False, 1, **sample)
        fast = timed_generation(model, ids, mask, True, 1, **sample)
        g_eager = timed_generation(model, ids, mask, False, 2, **greedy)[2]
        g_fast = timed_generation(model, ids, mask, True, 2, **greedy)[2]
        identical = bool(torch.equal(g_eager.action_ids, g_fast.action_ids)
                         and torch.equal(g_eager.action_mask, g_fast.action_mask))
        row = {"model": label, "device": device_name, "rows": rows, "new_tokens": new_tokens,
               "ms_per_step_eager": round(1e3 * eager[0] / eager[3], 3),
               "ms_per_step_fast": round(1e3 * fast[0] / fast[3], 3),
               "tokens_per_s_eager": round(float(eager[2].action_mask.sum()) / eager[0], 2),
               "tokens_per_s_fast": round(float(fast[2].action_mask.sum()) / fast[0], 2),
               "greedy_tokens_identical": identical}
        detail = {"rows": rows, "prompt_width": int(ids.shape[1]), "steps_eager": eager[3], "steps_fast": fast[3],
                  "seconds_eager": eager[0], "seconds_fast": fast[0], "peak_gb_eager": eager[4],
                  "peak_gb_fast": fast[4], "speedup": eager[0] / eager[3] / (fast[0] / fast[3]),
                  "sampled_tokens_identical": bool(torch.equal(eager[2].action_ids, fast[2].action_ids)),
                  "greedy_tokens": greedy_tokens, "greedy_divergence": greedy_divergence(model, g_eager, g_fast)}
        if merged and rows == rows_list[0]:
            seconds, steps = merged_fast_seconds(model, ids, mask, 1, **sample)
            detail["ms_per_step_fast_merged_adapter"] = 1e3 * seconds / steps
        summary.append(row)
        details.append(detail)
        say(f"{rows:>5} rows  eager {row['ms_per_step_eager']:8.2f} ms/step {row['tokens_per_s_eager']:9.1f} tok/s   "
            f"fast {row['ms_per_step_fast']:8.2f} ms/step {row['tokens_per_s_fast']:9.1f} tok/s   "
            f"{detail['speedup']:6.2f}x   greedy identical: {identical}")
    return summary, details


#: profiler events that launch no kernel (views, metadata); the rest, innermost first, are counted as kernels
_NO_KERNEL = {"aten::empty", "aten::empty_strided", "aten::empty_like", "aten::as_strided", "aten::resolve_conj",
              "aten::resolve_neg", "aten::view", "aten::_unsafe_view", "aten::alias", "aten::detach",
              "aten::lift_fresh", "aten::_reshape_alias", "aten::expand", "aten::transpose", "aten::t",
              "aten::permute", "aten::slice", "aten::select", "aten::unsqueeze", "aten::squeeze", "aten::reshape",
              "aten::contiguous", "aten::unflatten", "aten::flatten", "aten::split", "aten::chunk", "aten::narrow",
              "aten::unbind", "aten::to", "aten::result_type", "aten::is_nonzero", "aten::item",
              "aten::_local_scalar_dense", "aten::_has_compatible_shallow_copy_type", "aten::set_", "aten::numpy_T"}


def _kernels(event) -> int:
    inner = sum(_kernels(child) for child in event.cpu_children)
    if inner:
        return inner
    return int(event.name.startswith("aten::") and event.name not in _NO_KERNEL)


def kernel_count(prof) -> int:
    """Operators of a profiled CPU run that would each launch a kernel on a GPU (innermost computing aten ops)."""
    return sum(_kernels(e) for e in prof.events() if e.cpu_parent is None)


def host_model(args) -> int:
    """The CPU model of a 7B decoding step's host side: the CodeLlama-7B layer count (32) with tiny widths, so that
    the arithmetic is nothing and what is left is what the host does per step -- Python in transformers' generate
    and peft, one dispatch per operator -- and how many operators (GPU kernels) a step launches, on the plain path,
    the fast path with LoRA applied (bf16: the CUDA default, whose step is replayed as one graph) and merged."""
    from dataclasses import replace

    import torch
    from torch.profiler import ProfilerActivity, profile

    from modules.shared_base.fast_decoding import FastDecoder, Sampler

    torch.set_num_threads(1)
    smoke = load_tool("gpu_smoke")
    shape = replace(smoke.TINY, layers=32)
    model = smoke.build_shared(shape, torch.device("cpu"), torch.float32, checkpointing=False, attn="sdpa")[0]
    perturb_policy(model, args.lora_scale)
    rows = (args.rows or [8])[0]
    ids, mask = rows_prompts(smoke, shape, rows)
    tokens = args.new_tokens or 32

    def plain():
        return model.generate_from_ids(ids, mask, max_new_tokens=tokens, do_sample=False, fast=False)

    def fast_lora():
        model.eval()
        with torch.no_grad(), model.use_view("policy"):
            FastDecoder(model).run(ids, mask, tokens, Sampler(False, 1.0, 0, 1.0), model.eos_token_ids, None, True)

    def fast_merged():
        return model.generate_from_ids(ids, mask, max_new_tokens=tokens, do_sample=False, fast=True)

    print(f"host side of a decoding step: {shape.layers} layers (CodeLlama-7B's), hidden {shape.hidden}, {rows} rows, "
          f"{tokens} greedy tokens, 1 thread; kernels counted with torch.profiler")
    paths = (("plain (generate, DynamicCache, LoRA layers)", plain),
             ("fast, LoRA applied (bf16 / CUDA default)", fast_lora),
             ("fast, adapter merged (float32 default)", fast_merged))
    seconds: dict[str, list[float]] = {label: [] for label, _ in paths}
    for label, run in paths:  # warm-up
        run()
    for _ in range(args.repeats):  # alternating: a noisy machine slows every path alike
        for label, run in paths:
            started = time.perf_counter()
            run()
            seconds[label].append(time.perf_counter() - started)
    print(f"{'path':<44}{'ms per step':>12}{'kernels per step':>18}")
    for label, run in paths:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run()
        print(f"{label:<44}{1e3 * statistics.median(seconds[label]) / tokens:>12.2f}"
              f"{kernel_count(prof) / tokens:>18.0f}", flush=True)
    return 0


def run_rows(args) -> int:
    import torch

    smoke = load_tool("gpu_smoke")
    if args.tiny:
        torch.set_num_threads(1)  # tiny matmuls: more threads only spin-wait on a shared CPU
        shape, device, dtype = smoke.TINY, torch.device("cpu"), torch.float32
        label = "tiny Llama (random weights, float32)"
    else:
        shape, device, dtype = smoke.CODELLAMA_7B, torch.device("cuda", torch.cuda.current_device()), torch.bfloat16
        label = "CodeLlama-7B-shaped Llama (random weights, bf16)"
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    built = time.perf_counter()
    model, _, attn = smoke.build_shared(shape, device, dtype, checkpointing=False, attn=args.attn)
    perturb_policy(model, args.lora_scale)
    print(f"{label} on {device_name}, attention {attn}, built in {time.perf_counter() - built:.1f} s", flush=True)
    rows = args.rows or ([2, 4] if args.tiny else [8, 32, 64])
    new_tokens = args.new_tokens or (8 if args.tiny else 128)
    greedy_tokens = args.greedy_tokens or (8 if args.tiny else 32)
    summary, details = measure_rows(model, smoke, shape, rows, new_tokens, greedy_tokens, label, device_name,
                                    merged=dtype != torch.float32, say=lambda m: print(m, flush=True))
    out = Path(args.json) if args.json else (None if args.tiny else REPO / "docs" / "results" / "gpu" / "rollout.json")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=2) + "\n")
        extra = {"model": label, "device": device_name, "attention": attn, "torch": torch.__version__,
                 "transformers": _version("transformers"), "peft": _version("peft"), "lora_scale": args.lora_scale,
                 "warnings": sorted(set(WARNINGS)), "rows": details}
        out.with_name(out.stem + "_details.json").write_text(json.dumps(extra, indent=2) + "\n")
        print(f"wrote {out} and {out.with_name(out.stem + '_details.json')}")
    return 0


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


# ----------------------------------------------------------------------------------------------------------------
# CPU: the quickstart's batches
# ----------------------------------------------------------------------------------------------------------------

def quickstart_model():
    import yaml

    from modules.shared_base import BackboneConfig, SharedBaseLM

    preset = yaml.safe_load((REPO / "configs" / "model" / "smollm2.yaml").read_text())
    cache = preset.get("gguf_cache_dir")
    if cache and not Path(cache).is_absolute():
        preset["gguf_cache_dir"] = str(REPO / cache)  # the preset's cache is relative to where the quickstart runs
    return SharedBaseLM(BackboneConfig(**preset))


def run_quickstart(args) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    model = quickstart_model()
    perturb_policy(model, args.lora_scale)
    layouts = load_tool("bench_update_layouts")
    batches = layouts.build_batches(SimpleNamespace(model=model), args.dataset)
    sampling = dict(max_new_tokens=96, temperature=0.5, top_k=50, top_p=1.0, do_sample=True,
                    stop_strings=QUICKSTART_STOP_STRINGS)
    print(f"SmolLM2-135M (float32, {model.base_model.config._attn_implementation} attention), {args.dataset}; "
          f"torch threads "
          f"{torch.get_num_threads()}; policy adapter perturbed (scale {args.lora_scale}); {args.repeats} calls per "
          f"path, alternating, seed {args.seed}")
    if args.profile:
        for name, batch in batches.items():
            profile_generation(model, batch.prompt_ids, batch.prompt_mask, sampling, name, args.seed)
        return 0
    # the paths, alternating: plain generate; the fast path with transformers' layers (before the fused step); the
    # fast path as configured (fused_decoding on by default)
    paths = (("plain", False), ("layers", "layers"), ("fast", True))
    header = (f"{'batch':<24}{'prompt':>7}{'steps':>6}{'tokens':>7}{'plain':>9}{'layers':>9}{'fast':>9}"
              f"{'layers/plain':>14}{'fast/plain':>12}{'fast/layers':>13}{'CPU fast/plain':>16}"
              f"   same tokens as plain (layers: sampled, greedy; fast: sampled, greedy)")
    print(header)
    results = {}
    for name, batch in batches.items():
        ids, mask = batch.prompt_ids, batch.prompt_mask
        for _, how in paths[1:]:  # warm-up
            timed_generation(model, ids, mask, how, args.seed + 99, **dict(sampling, max_new_tokens=4))
        calls = {label: [] for label, _ in paths}
        for _ in range(args.repeats):
            for label, how in paths:
                calls[label].append(timed_generation(model, ids, mask, how, args.seed, **sampling))
        greedy = {label: timed_generation(model, ids, mask, how, args.seed, max_new_tokens=96, do_sample=False,
                                          stop_strings=QUICKSTART_STOP_STRINGS)[2] for label, how in paths}
        same = {}
        for label in ("layers", "fast"):
            same[label] = (all(torch.equal(p[2].action_ids, f[2].action_ids) and torch.equal(p[2].action_mask,
                                                                                             f[2].action_mask)
                               for p, f in zip(calls["plain"], calls[label])),
                           bool(torch.equal(greedy["plain"].action_ids, greedy[label].action_ids)))
        wall = {label: statistics.median(c[0] for c in calls[label]) for label in calls}
        cpu = {label: statistics.median(c[1] for c in calls[label]) for label in calls}
        tokens = int(calls["plain"][0][2].action_mask.sum())
        steps = calls["plain"][0][3]
        results[name] = dict(prompt_tokens=int(mask.sum(1).max()), steps=steps, tokens=tokens,
                             wall_plain=wall["plain"], wall_layers=wall["layers"], wall_fast=wall["fast"],
                             cpu_plain=cpu["plain"], cpu_layers=cpu["layers"], cpu_fast=cpu["fast"],
                             all_walls={k: [c[0] for c in v] for k, v in calls.items()},
                             same_sampled=same["fast"][0], same_greedy=same["fast"][1],
                             same_sampled_layers=same["layers"][0], same_greedy_layers=same["layers"][1],
                             greedy_divergence=greedy_divergence(model, greedy["plain"], greedy["fast"]))
        print(f"{name:<24}{int(mask.sum(1).max()):>7}{steps:>6}{tokens:>7}{wall['plain']:>8.2f}s"
              f"{wall['layers']:>8.2f}s{wall['fast']:>8.2f}s{wall['layers'] / wall['plain']:>13.2f}x"
              f"{wall['fast'] / wall['plain']:>11.2f}x{wall['fast'] / wall['layers']:>12.2f}x"
              f"{cpu['fast'] / cpu['plain']:>15.2f}x   {same['layers'][0]}, {same['layers'][1]}; "
              f"{same['fast'][0]}, {same['fast'][1]}", flush=True)

    def total(key: str) -> float:
        return sum(r[key] for r in results.values())

    print(f"generation_s over both batches (wall; medians): plain {total('wall_plain'):.2f} s, layers "
          f"{total('wall_layers'):.2f} s, fast {total('wall_fast'):.2f} s -- fast / plain "
          f"{total('wall_fast') / total('wall_plain'):.2f}x, layers / plain {total('wall_layers') / total('wall_plain'):.2f}x, "
          f"fast / layers {total('wall_fast') / total('wall_layers'):.2f}x; CPU fast / plain "
          f"{total('cpu_fast') / total('cpu_plain'):.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


#: where a generation's time goes, by aten operator (self CPU time), in the categories of docs/results/gpu/rollout.md
def _category(name: str, shapes, vocab: int, rank: int) -> str:
    operands = [list(shape or []) for shape in shapes or []]
    dims = [d for shape in operands for d in shape]
    weight = operands[1] if len(operands) > 1 else []  # mm(x, w^T): the second operand is the weight
    if name == "mkldnn::_linear_pointwise":  # the fused step's matmuls on packed weights
        return "vocabulary head (matmul)" if vocab in weight else "decoder weight matmuls"
    if name in ("aten::mm", "aten::addmm", "aten::bmm"):
        if vocab in weight:
            return "vocabulary head (matmul)"
        if len(weight) == 2 and rank in weight:
            return "LoRA matmuls (fast path: merging them)"
        if operands and len(operands[0]) >= 3:
            return "attention"
        return "decoder weight matmuls"
    if "scaled_dot_product" in name or (name == "aten::_softmax" and operands and len(operands[0]) >= 4):
        return "attention"
    if name in ("aten::cat", "aten::index_copy_"):
        return "KV cache writes (cat: growth)"
    if vocab in dims or name in ("aten::exponential_", "aten::multinomial", "aten::topk"):
        return "sampling and stop checks over the vocabulary"
    return "other operators (norms, rotary, residuals, LoRA glue, masks)"


def profile_steps(model, ids, mask, fast: bool, seed: int, sampling: dict, skip: int = 4, active: int = 16) -> dict:
    """Self CPU seconds per operator category over ``active`` decoding steps of one call, and those steps' wall
    time: the profiler records from one decoder forward to the next (a step: the forward, the head, the sampling,
    the stop checks, the loop around them), after ``skip`` forwards (the prefills, the first steps) and one of
    warm-up -- so the prompt's prefill is left out, and the profiler holds a few steps' events only."""
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    rank, vocab = model.config.lora_r, model.vocab_size
    marks: list[float] = []

    def mark(*_):
        marks.append(time.perf_counter())
        prof.step()

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True,
                 schedule=schedule(wait=skip, warmup=1, active=active, repeat=1)) as prof:
        # the token embedding runs once per decoder forward on every path (the fused step calls no decoder module)
        hook = model.base_model.get_input_embeddings().register_forward_pre_hook(mark)
        try:
            timed_generation(model, ids, mask, fast, seed, **dict(sampling, max_new_tokens=skip + active + 4))
        finally:
            hook.remove()
    totals: dict[str, float] = {}
    for event in prof.key_averages(group_by_input_shape=True):
        key = _category(event.key, event.input_shapes, vocab, rank)
        totals[key] = totals.get(key, 0.0) + event.self_cpu_time_total / 1e6 / active
    if len(marks) <= skip + 1 + active:
        raise RuntimeError(f"the generation ended after {len(marks)} decoder forwards; profiling needs "
                           f"{skip + 2 + active} (rows that stop early: use another seed or batch)")
    window = (marks[skip + 1 + active] - marks[skip + 1]) / active
    totals[OUTSIDE] = max(window - sum(totals.values()), 0.0)
    return {"categories": totals, "step_wall": window, "threads": torch.get_num_threads()}


OUTSIDE = "outside any operator (Python, dispatch)"


def profile_generation(model, ids, mask, sampling: dict, name: str, seed: int) -> dict:
    """Where a decoding step's time goes on each path (:func:`profile_steps`), side by side, in ms per step."""
    report = {}
    for fast in (False, True):
        timed_generation(model, ids, mask, fast, seed, **dict(sampling, max_new_tokens=2))  # warm-up
        report["fast" if fast else "plain"] = profile_steps(model, ids, mask, fast, seed, sampling)
    plain, fast = report["plain"], report["fast"]
    print(f"\n{name}: ms per decoding step of {ids.shape[0]} rows, {plain['threads']} thread(s), under the profiler "
          f"(self CPU time by operator category)")
    print(f"  {'':<62}{'plain':>9}{'fast':>9}")
    for key in sorted(plain["categories"], key=lambda k: -plain["categories"][k]):
        print(f"  {key:<62}{1e3 * plain['categories'][key]:>9.1f}{1e3 * fast['categories'].get(key, 0.0):>9.1f}")
    for key in sorted(set(fast["categories"]) - set(plain["categories"])):
        print(f"  {key:<62}{0.0:>9.1f}{1e3 * fast['categories'][key]:>9.1f}")
    print(f"  {'a decoding step (wall)':<62}{1e3 * plain['step_wall']:>9.1f}{1e3 * fast['step_wall']:>9.1f}")
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quickstart", action="store_true", help="CPU: SmolLM2 on the quickstart's batches")
    parser.add_argument("--tiny", action="store_true", help="the CUDA measurement with a tiny model on the CPU")
    parser.add_argument("--profile", action="store_true", help="--quickstart: where each path's time goes; --tiny: "
                                                               "the host side of a 32-layer decoding step")
    parser.add_argument("--rows", type=int, nargs="*", default=None, help="generation rows (CUDA: 8 32 64)")
    parser.add_argument("--new-tokens", type=int, default=None, help="sampled tokens per row (CUDA: 128)")
    parser.add_argument("--greedy-tokens", type=int, default=None, help="greedy tokens compared (CUDA: 32)")
    parser.add_argument("--attn", default="sdpa", help="attention of the 7B-shaped model (default sdpa)")
    parser.add_argument("--lora-scale", type=float, default=0.01, help="std of the policy adapter's B matrices")
    parser.add_argument("--dataset", default="tic_tac_toe", help="--quickstart: the dataset of its batches")
    parser.add_argument("--repeats", type=int, default=3, help="--quickstart: calls per path and batch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="--quickstart: torch threads (0: torch's default, "
                                                                "as the quickstart runs)")
    parser.add_argument("--json", default=None, help="write the results here (CUDA default: "
                                                     "docs/results/gpu/rollout.json)")
    args = parser.parse_args(argv)
    import torch

    if args.quickstart:
        return run_quickstart(args)
    if args.tiny and args.profile:
        return host_model(args)
    if not args.tiny and not torch.cuda.is_available():
        print("no CUDA device: nothing measured (docs/results/gpu/rollout.json is written on a GPU). "
              "Run with --tiny for the CPU check of the same code path, or --quickstart for the CPU benchmark.",
              file=sys.stderr)
        return EXIT_NO_CUDA
    return run_rows(args)


if __name__ == "__main__":
    sys.exit(main())
