#!/usr/bin/env python
"""GPU smoke benchmark of ETPO at CodeLlama-7B shapes, with random weights (nothing is downloaded).

    python tools/gpu_smoke.py                  # 7B-shaped Llama in bf16 on CUDA: rollouts + ETPO updates
    python tools/gpu_smoke.py --fsdp           # the same under a Lightning Trainer with ETPOFSDPStrategy, 1 GPU
    python tools/gpu_smoke.py --tiny           # the same code path on the CPU with a small Llama (seconds)
    python tools/gpu_smoke.py --tiny --fsdp    # CPU: raw torch FSDP (gloo, 1 process), shared_base.fsdp's settings
    python tools/gpu_smoke.py --tiny --fsdp --ranks 2      # CPU: the same over 2 processes, the base really sharded
    python tools/gpu_smoke.py --tiny --lightning           # CPU: the Lightning Trainer path (single device)

What runs: a ``transformers.LlamaForCausalLM`` with CodeLlama-7B shapes (h 4096, 32 layers, 32 heads, i 11008,
V 32016) is built directly on the GPU in bf16 and wrapped in the project's model layer
(``SharedBaseLM(config, model=..., tokenizer=...)``: LoRA policy / critic / target, reference = adapters off,
activation checkpointing, prefix sharing as configured). The batch is a :class:`~datamodules.batch.RolloutBatch`
shaped like a real rollout of ``envs`` environments x ``steps`` steps: every first attempt reads the same task
prompt (``prompt`` tokens), a failed attempt's next step reads a reflection prompt (the task prompt's head, its own
``reflection`` tokens, the task's final ``stub``), episodes that go on after the last step bring next-state prompts
of that form; actions are full length (the memory worst case) and synthetic. ``--prompts distinct`` makes every
prompt different (nothing to share: the worst case of the old smoke).

* **update** = ``ETPOModule.learn(batch)``, exactly what ``training_step`` runs on a rollout batch: (1) targets
  under no gradient from the reference, target and policy views, (2) the critic's AdamW step (only the taken
  token's logit: ``head_rows``), (3) the policy's AdamW step against the updated critic (chunked full-vocabulary
  KL), (4) the Polyak update. Plain and raw-FSDP runs drive it with ``module.without_trainer(...)`` (the module's
  own two optimizers, per-group clipping at 10); ``--fsdp`` on CUDA and ``--lightning`` run it through a Lightning
  ``Trainer`` whose DataModule generates a rollout inside the step (as the rollout DataModule does) and yields the
  batch with the module's ``policy_version``.
* **rollout** = one ``SharedBaseLM.generate_from_ids`` call per environment step on that step's prompts
  (temperature 0.5, top-k 50, ``action`` new tokens, KV cache; the prefix every row shares is prefilled once).

Printed: wall time and (CUDA) peak memory (``torch.cuda.max_memory_allocated``) of every phase -- rollout, update,
and the update's targets / critic step / policy step -- next to what ``tools/memory_model.py`` predicts for this
very workload (its tokens per view forward taken from the batch's plan); tokens/s; and FLOP utilisation:

* training MFU = 6 * N * T / (t_update * peak), the usual training-equivalent count, with N = parameters without
  the input embedding and T = the batch's real (prompt + action) tokens, every row counted in full -- prefix sharing
  computes fewer tokens than that, so this is useful work per second, not what the hardware did;
* the ETPO hardware-FLOP estimate: per view forward ``F = 2 N_dec T_c + A`` with ``T_c`` = the plan's
  ``tokens_computed`` (shared prefixes once, padding included) and ``A = 4 layers h sum(width^2)`` the attention of
  every (query, key) pair of the plan's rows (a custom mask computes the masked pairs too); a backward (input
  gradients only: the base is frozen) ``2 N_dec T_c + 2 A``; recompute = one more forward with checkpointing. Per
  update: targets 3 forwards (reference, target, policy) + 3 head evaluations per action row and next-state row;
  critic step 1 forward + backward (+ recompute) and no vocabulary-sized head work (taken-token rows only); policy
  step 1 no-grad critic forward + 1 forward + backward (+ recompute) + 3 head evaluations and 1 head backward per
  action row (2 h V FLOPs each). LoRA's own FLOPs (< 1 % at r = 16) are left out;
* generation MFU = 2 * N * (prefilled prompt tokens + generated tokens) / (t_rollout * peak) (decoding is
  memory-bound; expect a few %).

Peak dense bf16 FLOP/s assumed: H100 SXM / H200 989.4e12, H100 PCIe 756e12, A100 312e12 (NVIDIA datasheets,
without sparsity); ``--peak-tflops`` overrides.

Exit codes: 0 = ran; 3 = no CUDA device and no ``--tiny`` (nothing measured; the message says so); 1 = failure.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import logging
import math
import socket
import sys
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

EXIT_NO_CUDA = 3
PEAK_BF16_FLOPS = {"H200": 989.4e12, "H100 PCIe": 756e12, "H100": 989.4e12, "A100": 312e12}
#: the update's phases as the report names them (ETPOModule.learn: targets, then one optimizer step per loss)
PHASES = {"critic_loss": "update: critic step", "policy_loss": "update: policy step"}


@dataclass
class SmokeShape:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    envs: int  # generation batch (parallel environments)
    steps: int  # environment steps per environment per update -> sequences = envs * steps
    prompt: int  # the task prompt, read by every first attempt
    action: int
    reflection: int  # tokens a reflection prompt adds to the task prompt's head (previous attempt, its error)
    stub: int  # the task prompt's final tokens (the open function stub), repeated at the end of a reflection
    chunk: int
    lora_r: int


CODELLAMA_7B = SmokeShape(hidden=4096, layers=32, heads=32, intermediate=11008, vocab=32016, envs=8, steps=2,
                          prompt=512, action=256, reflection=128, stub=16, chunk=64, lora_r=16)
# the tiny prompt is longer than generation's MIN_SHARED_PREFIX (16), so the once-prefilled prefix is exercised
TINY = SmokeShape(hidden=64, layers=2, heads=4, intermediate=176, vocab=512, envs=2, steps=2, prompt=24, action=8,
                  reflection=6, stub=4, chunk=4, lora_r=4)


def peak_flops(device_name: str, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    for key, value in PEAK_BF16_FLOPS.items():  # H100 PCIe before H100
        if key in device_name and (key != "H100" or "PCIe" not in device_name):
            return value
    return None


def word_tokenizer(vocab: int):
    """A tokenizer with exactly ``vocab`` tokens (``<t5>`` ...), so that every sampled id decodes."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<s>", "</s>", "<unk>"]
    words = {tok: i for i, tok in enumerate(special)}
    for i in range(len(special), vocab):
        words[f"<t{i}>"] = i
    backend = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", padding_side="left")


def build_shared(shape: SmokeShape, device, dtype, checkpointing: bool, attn: str = "auto",
                 prefix_sharing: bool = True):
    """A random Llama of ``shape`` created directly on ``device`` in ``dtype``, wrapped in ``SharedBaseLM``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from modules.shared_base import BackboneConfig, SharedBaseLM
    from modules.shared_base.loading import resolve_attn_implementation

    attn = resolve_attn_implementation(attn, device, dtype)
    longest = shape.prompt + shape.reflection + shape.action
    cfg = LlamaConfig(hidden_size=shape.hidden, num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                      num_key_value_heads=shape.heads, intermediate_size=shape.intermediate, vocab_size=shape.vocab,
                      max_position_embeddings=max(4096, longest), rope_theta=1e6,
                      tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg._attn_implementation = attn
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    backbone = BackboneConfig(source="hf", name_or_path="random-init", lora_r=shape.lora_r,
                              lora_alpha=2.0 * shape.lora_r, gradient_checkpointing=checkpointing, head_fp32=True,
                              seed=0, device=str(device), prefix_sharing=prefix_sharing)
    shared = SharedBaseLM(backbone, model=model, tokenizer=word_tokenizer(shape.vocab))
    return shared, backbone, attn


# ----------------------------------------------------------------------------------------------------------------
# the synthetic rollout batch
# ----------------------------------------------------------------------------------------------------------------

def _left_pad(rows):
    import torch

    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)  # pad id 0 (the tokenizer's <pad>)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return ids, mask


def synthetic_batch(shape: SmokeShape, seed: int = 0, prompts: str = "shared", policy_version: int = 0):
    """A :class:`RolloutBatch` of ``envs * steps`` transitions laid out as the rollout DataModule lays out a real
    one: transition ``k`` is environment ``k % envs`` at step ``k // envs``. An unfinished episode's transition
    links to the same environment's next step (``next_index``) or, at the last step, brings its next prompt
    (``next_needed``); no value is bootstrapped through a finished one. Environment ``e``'s episode ends after step
    ``t`` when ``e + t`` is odd.

    ``prompts="shared"``: every first attempt (step 0, and the step after a finished episode) reads one task prompt;
    the step after a failed attempt reads a reflection prompt = the task prompt minus its final ``stub`` tokens,
    ``reflection`` tokens of its own, the stub again (as ``envs.datascience.prompts.reflection_prompt`` builds it);
    next-state prompts are reflections. ``prompts="distinct"``: every prompt and next prompt is ``prompt`` random
    tokens (no prefix to share). Actions are full length, random."""
    import torch

    from datamodules.batch import GenerationConfig, RolloutBatch, RolloutMetrics

    if prompts not in ("shared", "distinct"):
        raise ValueError(f"prompts must be 'shared' or 'distinct', got {prompts!r}")
    g = torch.Generator().manual_seed(seed)
    n, envs = shape.envs * shape.steps, shape.envs
    low = 4  # after the special tokens
    rand = lambda k: torch.randint(low, shape.vocab, (k,), generator=g)  # noqa: E731
    # half of the episodes end after each step, alternating over the environments: every step after the first
    # mixes reflections with fresh first attempts, and the last step leaves next-state prompts
    terminated = torch.tensor([(k % envs + k // envs) % 2 == 1 for k in range(n)])
    task = rand(shape.prompt)
    head, stub = task[: shape.prompt - shape.stub], task[shape.prompt - shape.stub:]

    def reflection():
        return torch.cat([head, rand(shape.reflection), stub]) if prompts == "shared" else rand(shape.prompt)

    def first_attempt():
        return task if prompts == "shared" else rand(shape.prompt)

    rows = []
    next_index = torch.full((n,), -1, dtype=torch.long)
    for k in range(n):
        failed_before = k >= envs and not terminated[k - envs]
        rows.append(reflection() if failed_before else first_attempt())
        if not terminated[k] and k + envs < n:
            next_index[k] = k + envs
    needed = [k for k in range(n) if not terminated[k] and next_index[k] < 0]
    prompt_ids, prompt_mask = _left_pad(rows)
    next_ids, next_mask = _left_pad([reflection() for _ in needed]) if needed else (None, None)
    actions = torch.randint(low, shape.vocab, (n, shape.action), generator=g)
    rewards = torch.rand(n, generator=g) * 2 - 1
    return RolloutBatch(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask, action_ids=actions, action_mask=torch.ones_like(actions),
        rewards=rewards, terminated=terminated, truncated=torch.zeros(n, dtype=torch.bool), next_index=next_index,
        next_needed=torch.tensor(needed, dtype=torch.long), env_index=torch.arange(n) % envs,
        episode_step=torch.arange(n) // envs + 1, runnable=rewards > 0, policy_version=policy_version,
        sampling=GenerationConfig(max_new_tokens=shape.action, temperature=0.5, top_k=50),
        metrics=RolloutMetrics(avg_reward=float(rewards.mean()), best_reward=float(rewards.max()),
                               runnable_fraction=float((rewards > 0).float().mean()), env_steps=float(n), sps=0.0,
                               episodes=float(terminated.sum())),
        next_prompt_ids=next_ids, next_prompt_mask=next_mask)


def step_prompts(batch, shape: SmokeShape, step: int):
    """The generation batch of environment step ``step``: its rows' prompts, left-padded to their own width."""
    rows = slice(step * shape.envs, (step + 1) * shape.envs)
    ids, mask = batch.prompt_ids[rows], batch.prompt_mask[rows]
    keep = mask.sum(0) > 0
    return ids[:, keep], mask[:, keep]


def common_prefix(ids, mask) -> int:
    """Tokens at the start of every row's prompt that all rows share."""
    rows = [r[m.bool()].tolist() for r, m in zip(ids.cpu(), mask.cpu())]
    n = 0
    while all(len(r) > n for r in rows) and len({r[n] for r in rows}) == 1:
        n += 1
    return n


def rollout(model, batch, shape: SmokeShape, seed: int = 0) -> dict:
    """One generation call per environment step, on that step's prompts, as the rollout DataModule makes them
    (``generate_from_ids``: the prefix every row shares is prefilled once). Returns token counts."""
    import torch

    from modules.shared_base.generation import MIN_SHARED_PREFIX

    generated = prefilled = 0
    once = []
    for step in range(shape.steps):
        ids, mask = step_prompts(batch, shape, step)
        torch.manual_seed(seed + step)
        gen = model.generate_from_ids(ids, mask, max_new_tokens=shape.action, temperature=0.5, top_k=50)
        generated += int(gen.action_mask.sum())
        lengths = mask.sum(1)
        shared = min(common_prefix(ids, mask), int(lengths.min()) - 1)
        # generate_from_ids prefills the shared prefix once when prefix sharing is on and it is long enough
        if model.config.prefix_sharing and len(lengths) > 1 and shared >= MIN_SHARED_PREFIX:
            prefilled += shared + int((lengths - shared).sum())
            once.append(shared)
        else:
            prefilled += ids.numel()  # every padded row in full
            once.append(0)
    return {"generated": generated, "prefilled": prefilled, "prefilled_once": once}


# ----------------------------------------------------------------------------------------------------------------
# measurement
# ----------------------------------------------------------------------------------------------------------------

def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Meter:
    """Wall time and (CUDA) peak memory of phases, which may nest: a phase's peak is the highest
    ``max_memory_allocated`` seen while it was open, across the resets of the phases inside it."""

    def __init__(self, device):
        self.device = device
        self.peaks: dict[str, float] = {}
        self.times: dict[str, list[float]] = {}
        self._open: list[list] = []  # [name, peak so far (bytes)] of the phases now open, outermost first

    def _max_allocated(self) -> float:
        import torch

        return float(torch.cuda.max_memory_allocated(self.device)) if self.device.type == "cuda" else 0.0

    @contextlib.contextmanager
    def phase(self, name: str):
        import torch

        cuda = self.device.type == "cuda"
        _sync(self.device)
        if cuda:
            seen = self._max_allocated()
            for entry in self._open:
                entry[1] = max(entry[1], seen)
            torch.cuda.reset_peak_memory_stats(self.device)
        entry = [name, 0.0]
        self._open.append(entry)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            _sync(self.device)
            self.times.setdefault(name, []).append(time.perf_counter() - t0)
            self._open.pop()
            if cuda:
                peak = max(entry[1], self._max_allocated())
                for outer in self._open:
                    outer[1] = max(outer[1], peak)
                self.peaks[name] = max(self.peaks.get(name, 0.0), peak / 1e9)


def instrument(module, meter: Meter, records: list) -> None:
    """Time (and on CUDA, measure) ``learn`` and its phases on this module instance: ``learn`` looks
    ``compute_targets`` and ``optimizer_step_on`` up on the instance, and ``training_step`` calls ``self.learn``.
    ``records`` receives every update's charts."""
    learn, compute_targets, optimizer_step_on = module.learn, module.compute_targets, module.optimizer_step_on

    @functools.wraps(learn)
    def timed_learn(batch):
        with meter.phase("update"):
            charts = learn(batch)
        records.append(_record(charts))
        return charts

    @functools.wraps(compute_targets)
    def timed_targets(*args):
        with meter.phase("update: targets"):
            return compute_targets(*args)

    @functools.wraps(optimizer_step_on)
    def timed_step(optimizer, loss_fn, *args):
        with meter.phase(PHASES.get(loss_fn.__name__, f"update: {loss_fn.__name__}")):
            return optimizer_step_on(optimizer, loss_fn, *args)

    module.learn, module.compute_targets, module.optimizer_step_on = timed_learn, timed_targets, timed_step


def _record(charts) -> dict:
    keep = {"losses/critic": "critic", "losses/policy": "policy", "charts/kl": "kl",
            "charts/grad_norm_critic": "grad_norm_critic", "charts/grad_norm_policy": "grad_norm_policy"}
    return {short: float(charts[key]) for key, short in keep.items() if key in charts}


def make_module(shape: SmokeShape, shared, backbone, cls=None):
    from modules.etpo import ETPOModule

    cls = cls or ETPOModule
    module = cls(backbone=backbone, token_chunk_size=shape.chunk, policy_lr=1e-4, critic_lr=1e-4)
    module.model = shared  # configure_model keeps a model that is already there
    module.train()  # training mode: activation checkpointing is active only there
    return module


def update_flops(shape: SmokeShape, plan, n_params: int, batch, checkpointing: bool) -> dict:
    """Hardware FLOPs of one ``ETPOModule.learn`` (the module docstring: views and passes per phase)."""
    h, V = shape.hidden, shape.vocab
    n_dec = n_params - 2 * V * h  # without the input embedding and the vocabulary head
    source = plan.packed.input_ids if plan.packed is not None else plan.ids
    rows, width = source.shape
    t_c = rows * width  # = plan.tokens_computed
    attention = 4.0 * shape.layers * h * rows * width * width
    forward = 2.0 * n_dec * t_c + attention
    backward = 2.0 * n_dec * t_c + 2 * attention  # input gradients only: the base is frozen
    recompute = forward if checkpointing else 0.0
    head = 2.0 * h * V  # one vocabulary-head evaluation (or its input-gradient product) per row
    action_rows = batch.action_ids.numel()  # the chunk loops run over every [B, chunk] row, padding included
    next_rows = batch.next_needed.numel()
    phases = {
        "targets": 3 * forward + 3 * head * (action_rows + next_rows),
        "critic step": forward + backward + recompute,  # head_rows: dot products with the taken tokens' rows
        "policy step": forward + forward + backward + recompute + (3 + 1) * head * action_rows,
    }
    return {"tokens_computed_per_view": t_c, "plan_rows": rows, "plan_width": width, "phases": phases,
            "total": sum(phases.values())}


def flops_report(shape: SmokeShape, n_params: int, flops: dict, real_tokens: int, t_update: float, t_roll: float,
                 roll: dict, peak: float | None) -> dict:
    n_no_emb = n_params - shape.vocab * shape.hidden
    train_equiv = 6.0 * n_no_emb * real_tokens
    gen_flops = 2.0 * n_no_emb * (roll["prefilled"] + roll["generated"])
    out = {"training_tokens_per_s": real_tokens / t_update,
           "generation_tokens_per_s": roll["generated"] / t_roll if t_roll else None,
           "flops_per_update_6NT": train_equiv, "flops_per_update_etpo_estimate": flops["total"],
           "flops_per_phase_etpo_estimate": flops["phases"]}
    if peak:
        out["peak_flops"] = peak
        out["mfu_training_6NT"] = train_equiv / t_update / peak
        out["hfu_training_etpo_estimate"] = flops["total"] / t_update / peak
        out["mfu_generation_2N"] = gen_flops / t_roll / peak if t_roll else None
    return out


def _memory_model():
    spec = importlib.util.spec_from_file_location("_etpo_memory_model", REPO / "tools" / "memory_model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up in sys.modules
    spec.loader.exec_module(module)
    return module


def memory_prediction(shape: SmokeShape, plan, batch, checkpointing: bool, prefix_sharing: bool) -> dict:
    """What tools/memory_model.py predicts (GB, a bf16 model on one GPU) for this workload, its tokens per view
    forward and plan rows taken from the batch's own plan."""
    mm = _memory_model()
    source = plan.packed.input_ids if plan.packed is not None else plan.ids
    reflections = int((batch.prompt_mask.sum(1) > shape.prompt).sum())
    wl = mm.Workload(sequences=len(batch), tokens=shape.prompt + shape.action, action_tokens=shape.action,
                     reflection_rows=reflections, next_prompts=int(batch.next_needed.numel()),
                     reflection_tokens=shape.reflection if reflections else 0, prefix_sharing=prefix_sharing,
                     view_tokens=int(source.numel()), view_rows=int(source.shape[0]), chunk=shape.chunk,
                     lora_r=shape.lora_r, checkpointing=checkpointing, envs=shape.envs)
    mshape = mm.Shape(hidden=shape.hidden, layers=shape.layers, heads=shape.heads, kv_heads=shape.heads,
                      intermediate=shape.intermediate, vocab=shape.vocab)
    out = mm.etpo_breakdown(mshape, wl, 1)
    names = {"phase: rollout": "rollout", "phase 1: targets (no grad)": "update: targets",
             "phase 2: critic step": "update: critic step", "phase 3: policy step": "update: policy step"}
    predicted = {ours: out[theirs] / 1e9 for theirs, ours in names.items()}
    predicted["update"] = max(predicted[k] for k in ("update: targets", "update: critic step", "update: policy step"))
    predicted["peak"] = out["peak"] / 1e9
    return predicted


# ----------------------------------------------------------------------------------------------------------------
# runs
# ----------------------------------------------------------------------------------------------------------------

def _n_params(shared) -> int:
    """Parameters of the base model (adapters excluded); count them before FSDP wraps the model."""
    return sum(p.numel() for n, p in shared.base_model.named_parameters() if "lora_" not in n)


def run_plain(args, shape: SmokeShape, device, dtype) -> dict:
    meter = Meter(device)
    with meter.phase("build"):
        shared, backbone, attn = build_shared(shape, device, dtype, not args.no_checkpointing, args.attn,
                                              not args.no_prefix_sharing)
    n_params = _n_params(shared)
    module = make_module(shape, shared, backbone)
    records: list = []
    instrument(module, meter, records)
    batch = synthetic_batch(shape, prompts=args.prompts).to(device)
    roll = {"generated": 0, "prefilled": 0, "prefilled_once": []}
    for _ in range(args.generations):
        with meter.phase("rollout"):
            roll = rollout(shared, batch, shape)
    with module.without_trainer():  # the module's own two optimizers
        for _ in range(args.updates):
            batch.policy_version = module.policy_version
            module.learn(batch)
            module.policy_version += 1  # as training_step counts it
    return summarise(args, shape, device, meter, module, batch, roll, records, attn, mode="plain",
                     n_params=n_params)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_fsdp_cpu(args, shape: SmokeShape, device, dtype) -> dict:
    """torch FSDP1 on the CPU (gloo) with modules.shared_base.fsdp's wrap settings and replicated adapters; ``learn``
    runs every forward phase through the root module's forward and each backward after it
    (``without_trainer(root=...)``), as ETPOFSDPStrategy does under Lightning. One process by default (FSDP then
    falls back to NO_SHARD: the wrapping, routing and adapter handling run, nothing is split); ``--ranks N``
    starts N processes of this tool that really shard the base, every rank learning from the same batch, so the
    rank-averaged update must equal the single-process one."""
    if args.ranks > 1 and args.rank is None:
        return _launch_ranks(args)
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from modules.shared_base.fsdp import fsdp_kwargs, is_sharded, summon_full_params_if_sharded

    rank, world = (0, 1) if args.rank is None else (args.rank, args.ranks)
    started = not dist.is_initialized()
    if started:
        port = args.port if args.rank is not None else _free_port()
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        meter = Meter(device)
        shared, backbone, attn = build_shared(shape, device, dtype, not args.no_checkpointing, args.attn,
                                              not args.no_prefix_sharing)
        n_params = _n_params(shared)
        module = make_module(shape, shared, backbone)
        root = FSDP(module, device_id=torch.device("cpu"), **fsdp_kwargs(shared, adapters="replicate"))
        assert is_sharded(root)
        records: list = []
        instrument(module, meter, records)
        batch = synthetic_batch(shape, prompts=args.prompts)
        roll = {"generated": 0, "prefilled": 0, "prefilled_once": []}
        for _ in range(args.generations):
            with meter.phase("rollout"), summon_full_params_if_sharded(root, recurse=False):
                roll = rollout(shared, batch, shape)
        with module.without_trainer(root=root):  # optimizers from configure_optimizers over the root's parameters
            for _ in range(args.updates):
                batch.policy_version = module.policy_version
                module.learn(batch)
                module.policy_version += 1
        report = summarise(args, shape, device, meter, module, batch, roll, records, attn,
                           mode="fsdp-cpu-gloo" + (f"-{world}-ranks" if world > 1 else ""), n_params=n_params)
        report["ranks"] = world
        return report
    finally:
        if started:
            dist.destroy_process_group()


def _launch_ranks(args) -> dict:
    """``--ranks N`` on the CPU: N processes of this tool (``--rank r``), rank 0's report returned."""
    import os
    import subprocess
    import tempfile

    forwarded = ["--tiny", "--fsdp", "--ranks", str(args.ranks), "--updates", str(args.updates),
                 "--generations", str(args.generations), "--prompts", args.prompts, "--attn", args.attn]
    forwarded += ["--no-prefix-sharing"] * args.no_prefix_sharing + ["--no-checkpointing"] * args.no_checkpointing
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "rank0.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        procs = [subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *forwarded, "--rank", str(r),
                                   "--port", str(port)] + (["--json", str(report)] if r == 0 else []),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                 for r in range(args.ranks)]
        outputs = [p.communicate() for p in procs]
        failed = [(r, p.returncode, err) for r, (p, (_, err)) in enumerate(zip(procs, outputs)) if p.returncode]
        if failed:
            r, code, err = failed[0]
            raise RuntimeError(f"gpu_smoke: rank {r} of {args.ranks} exited with {code}:\n{err[-3000:]}")
        return json.loads(report.read_text())


def run_lightning(args, shape: SmokeShape, device, dtype) -> dict:
    """A Lightning ``Trainer`` fitting the module on a DataModule that, like the rollout DataModule, generates each
    batch's rollout when the step pulls it (inside the step: on-policy) and yields a ``RolloutBatch`` carrying the
    module's ``policy_version``; ``training_step`` -- next batch, ``learn``, ``policy_version`` + 1, logging -- runs
    as in a real run. With ``--fsdp``: ETPOFSDPStrategy (FULL_SHARD, decoder layers as units, replicated adapters),
    which calls ``training_step`` directly and routes each forward phase through the root module."""
    import lightning as L
    from lightning.pytorch import Trainer
    from torch.utils.data import DataLoader, IterableDataset

    from modules.etpo import ETPOModule
    from modules.strategy import ETPOFSDPStrategy

    shared, backbone, attn = build_shared(shape, device, dtype, not args.no_checkpointing, args.attn,
                                          not args.no_prefix_sharing)
    n_params = _n_params(shared)
    meter = Meter(device)
    roll = {"generated": 0, "prefilled": 0, "prefilled_once": []}

    class SmokeModule(ETPOModule):
        def configure_model(self):
            if self.model is None:
                self.model = shared

    module = make_module(shape, shared, backbone, SmokeModule)
    records: list = []
    instrument(module, meter, records)
    batch = synthetic_batch(shape, prompts=args.prompts)

    class Stream(IterableDataset):
        def __iter__(self):
            for k in range(args.updates):
                with meter.phase("rollout"):
                    roll.update(rollout(module.model, batch, shape, seed=k))
                yield replace(batch, policy_version=module.policy_version)

    class SmokeRollout(L.LightningDataModule):
        def train_dataloader(self):
            return DataLoader(Stream(), batch_size=None, num_workers=0)

    fsdp = args.fsdp
    strategy = ETPOFSDPStrategy(layer_classes=["LlamaDecoderLayer"], sharding_strategy="FULL_SHARD") if fsdp else "auto"
    from etpo.console import quiet_console

    quiet_console()  # the filters etpo.fit installs (inside main's catch_warnings: undone on return)
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)  # no "GPU available" banners
    # the stream ends after --updates batches (Lightning's global_step counts optimizer steps: two per batch here)
    trainer = Trainer(accelerator=device.type, devices=1, strategy=strategy, precision="32-true", max_epochs=1,
                      max_steps=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, datamodule=SmokeRollout())
    if module.policy_version != args.updates or len(records) != args.updates:
        raise RuntimeError(f"the Trainer ran {len(records)} updates (policy_version {module.policy_version}), "
                           f"expected {args.updates}")
    mode = ("fsdp-lightning" if fsdp else "lightning") + ("" if device.type == "cuda" else "-cpu")
    report = summarise(args, shape, device, meter, module, batch.to(device), roll, records, attn, mode=mode,
                       n_params=n_params)
    report["note"] = ("update seconds = ETPOModule.learn inside training_step (the rollout, pulled at the start of "
                      "the step, and Lightning's logging are outside it)")
    return report


def summarise(args, shape, device, meter: Meter, module, batch, roll, records, attn, mode, n_params) -> dict:
    import torch

    shared = module.model
    plan = module.plan(batch)
    plain = shared.plan(batch.prompt_ids, batch.prompt_mask, batch.action_ids, batch.action_mask,
                        batch.next_prompt_ids, batch.next_prompt_mask, share_prefixes=False)
    checkpointing = not args.no_checkpointing
    times = meter.times
    t_update = min(times["update"][1:] or times["update"])  # the first update includes warm-up
    t_roll = min(times["rollout"]) if times.get("rollout") else 0.0
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_flops(name, args.peak_tflops) if device.type == "cuda" else None
    real_tokens = int(batch.prompt_mask.sum() + batch.action_mask.sum())
    flops = update_flops(shape, plan, n_params, batch, checkpointing)
    report = {
        "mode": mode, "device": name, "attn_implementation": attn, "shape": shape.__dict__, "prompts": args.prompts,
        "prefix_sharing": bool(shared.shares_prefixes), "params_without_adapters": n_params,
        "activation_checkpointing": checkpointing, "sequences": len(batch),
        "next_state_prompts": int(batch.next_needed.numel()), "real_tokens": real_tokens,
        "tokens_per_view_forward": plan.tokens_computed, "tokens_per_view_forward_plain": plain.tokens_computed,
        "seconds": {k: v for k, v in times.items() if k != "build"}, "update_seconds": times["update"],
        "rollout_seconds": times.get("rollout", []), "rollout_tokens": roll, "generated_tokens": roll["generated"],
        "peak_memory_gb": meter.peaks, "losses": records,
        "memory_model_prediction_gb": memory_prediction(shape, plan, batch, checkpointing, shared.shares_prefixes),
    }
    report.update(flops_report(shape, n_params, flops, real_tokens, t_update, t_roll, roll, peak))
    if meter.peaks:  # the highest torch.cuda.max_memory_allocated of any phase (each phase resets the counter)
        report["max_memory_allocated_gb"] = max(meter.peaks.values())
    return report


# ----------------------------------------------------------------------------------------------------------------

def print_report(report: dict) -> None:
    print(f"gpu_smoke: mode {report['mode']} on {report['device']} (attention: {report['attn_implementation']}, "
          f"prefix sharing {'on' if report['prefix_sharing'] else 'off'})")
    sh = report["shape"]
    print(f"  model: h={sh['hidden']} layers={sh['layers']} heads={sh['heads']} i={sh['intermediate']} "
          f"V={sh['vocab']}, {report['params_without_adapters'] / 1e6:,.2f}M params, LoRA r={sh['lora_r']} x 3")
    print(f"  batch: {report['sequences']} transitions ({sh['envs']} envs x {sh['steps']} steps, {report['prompts']} "
          f"prompts: task {sh['prompt']}, reflection +{sh['reflection']} tokens; {sh['action']} action tokens) + "
          f"{report['next_state_prompts']} next-state prompts, chunk {sh['chunk']}, checkpointing "
          f"{report['activation_checkpointing']}")
    print(f"  tokens per view forward: {report['tokens_per_view_forward']:,} (plain plan: "
          f"{report['tokens_per_view_forward_plain']:,}; the rows hold {report['real_tokens']:,} real tokens)")
    roll = report["rollout_tokens"]
    once = roll["prefilled_once"]
    shared = (f"the shared prefix of each step's generation batch once ({' + '.join(map(str, once))} tokens)"
              if any(once) else "no prefix prefilled once")
    print(f"  rollout: {roll['generated']} tokens generated; prefill computed {roll['prefilled']} prompt tokens, "
          f"{shared}")
    for name, values in report["seconds"].items():
        print(f"  seconds [{name}]: {', '.join(f'{t:.3f}' for t in values)}")
    predicted = report["memory_model_prediction_gb"]
    for name, value in report["peak_memory_gb"].items():
        extra = f"; memory model {predicted[name]:.2f} GB" if name in predicted else ""
        print(f"  peak memory [{name}]: {value:.2f} GB (torch.cuda.max_memory_allocated){extra}")
    if not report["peak_memory_gb"]:
        print("  peak memory: not measured on the CPU; memory model for a bf16 GPU run of this shape: "
              + ", ".join(f"{k} {v:.3g} GB" for k, v in predicted.items()))
    print(f"  training tokens/s: {report['training_tokens_per_s']:.1f}")
    if report.get("generation_tokens_per_s"):
        print(f"  generation tokens/s: {report['generation_tokens_per_s']:.1f}")
    phases = report["flops_per_phase_etpo_estimate"]
    print(f"  FLOPs per update: 6NT {report['flops_per_update_6NT']:.3e}; ETPO estimate "
          f"{report['flops_per_update_etpo_estimate']:.3e} (" + ", ".join(f"{k} {v:.2e}" for k, v in phases.items())
          + ")")
    if "mfu_training_6NT" in report:
        print(f"  training MFU (6 N T): {100 * report['mfu_training_6NT']:.1f} %; ETPO hardware FLOPs estimate: "
              f"{100 * report['hfu_training_etpo_estimate']:.1f} %; generation MFU (2 N): "
              f"{100 * (report['mfu_generation_2N'] or 0):.2f} % of {report['peak_flops'] / 1e12:.0f} TFLOP/s")
    else:
        print("  MFU: not computed (CPU, or unknown GPU: pass --peak-tflops)")
    print("  losses: " + ", ".join(f"critic {x.get('critic', float('nan')):.4f} / policy "
                                   f"{x.get('policy', float('nan')):.4f}" for x in report["losses"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="ETPO GPU smoke benchmark (random 7B-shaped Llama)")
    parser.add_argument("--tiny", action="store_true", help="small model on the CPU (same code path)")
    parser.add_argument("--fsdp", action="store_true",
                        help="FSDP: a Lightning Trainer with ETPOFSDPStrategy on CUDA, raw torch FSDP with --tiny")
    parser.add_argument("--lightning", action="store_true",
                        help="run the updates through a Lightning Trainer (ETPOFSDPStrategy with --fsdp), also on CPU")
    parser.add_argument("--updates", type=int, default=3, help="ETPO updates to time")
    parser.add_argument("--generations", type=int, default=2,
                        help="rollouts to time (plain and raw FSDP; under a Trainer every update pulls one)")
    parser.add_argument("--prompts", choices=["shared", "distinct"], default="shared",
                        help="shared: a real rollout's layout (one task prompt, reflections); distinct: nothing shared")
    parser.add_argument("--no-prefix-sharing", action="store_true",
                        help="backbone.prefix_sharing false: every row computed in full, plain generation prefill")
    parser.add_argument("--attn", default="auto", choices=["auto", "sdpa", "eager", "flash_attention_2"],
                        help="attention implementation (auto as the configs: flash-attn when installed, which takes "
                             "no custom mask, so prefix sharing is off with it)")
    parser.add_argument("--no-checkpointing", action="store_true", help="disable activation checkpointing")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak bf16 TFLOP/s for MFU")
    parser.add_argument("--ranks", type=int, default=1,
                        help="--tiny --fsdp: processes (gloo); more than one really shards the base")
    parser.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)  # a worker of --ranks
    parser.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=str, default=None, help="also write the report to this file")
    args = parser.parse_args(argv)

    import torch

    if not args.tiny and not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device on this machine -- nothing was measured (exit code 3). "
              "Run with --tiny for the CPU check of the same code path.", file=sys.stderr)
        return EXIT_NO_CUDA
    if args.updates < 1:
        parser.error("--updates must be >= 1")
    if args.ranks < 1 or (args.ranks > 1 and not (args.tiny and args.fsdp and not args.lightning)):
        parser.error("--ranks N > 1 is for --tiny --fsdp (torch FSDP over N CPU processes); on CUDA launch the "
                     "Lightning run with torchrun")
    if args.tiny and args.lightning and args.fsdp:
        parser.error("--tiny --lightning --fsdp: Lightning's FSDPStrategy cannot wrap a CPU model (it hands torch FSDP "
                     "device_id=None there: 'FSDP needs a non-CPU accelerator device'); use --tiny --fsdp for torch "
                     "FSDP on the CPU, or --tiny --lightning for the Trainer path")
    shape = TINY if args.tiny else CODELLAMA_7B
    threads = torch.get_num_threads()
    try:
        if args.tiny:
            device, dtype = torch.device("cpu"), torch.float32
            torch.set_num_threads(1)  # tiny matmuls: more threads only spin-wait on a shared CPU
        else:
            device, dtype = torch.device("cuda", torch.cuda.current_device()), torch.bfloat16
        if args.lightning or (args.fsdp and not args.tiny):
            run = run_lightning
        elif args.fsdp:
            run = run_fsdp_cpu
        else:
            run = run_plain
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            report = run(args, shape, device, dtype)
    finally:
        torch.set_num_threads(threads)
    losses = [v for x in report["losses"] for k, v in x.items() if k in ("critic", "policy")]
    if not losses or any(not math.isfinite(v) for v in losses):
        print("gpu_smoke: no or non-finite losses", file=sys.stderr)
        print_report(report)
        return 1
    if args.rank is None or args.rank == 0:
        print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
