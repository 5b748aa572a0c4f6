#!/usr/bin/env python
"""GPU smoke benchmark of ETPO at CodeLlama-7B shapes, with random weights (nothing is downloaded).

    python tools/gpu_smoke.py                  # 7B-shaped Llama in bf16 on CUDA: ETPO updates + rollout generations
    python tools/gpu_smoke.py --fsdp           # the same updates under Lightning's FSDP (ETPOFSDPStrategy), 1 GPU
    python tools/gpu_smoke.py --tiny           # the same code path on the CPU with a small Llama (seconds)
    python tools/gpu_smoke.py --tiny --fsdp    # CPU: torch FSDP (gloo, 1 process) with modules.shared_base.fsdp's settings

What runs: a ``transformers.LlamaForCausalLM`` with CodeLlama-7B shapes (h 4096, 32 layers, 32 heads, i 11008,
V 32016) is built directly on the GPU in bf16 and wrapped in the project's model layer
(``SharedBaseLM(config, model=..., tokenizer=...)``: LoRA policy / critic / target, reference = adapters off,
activation checkpointing); then ``--updates`` ETPO updates, each exactly what ``ETPOModule.training_step`` does
after the rollout: ``ETPOModule.update_loss`` on a synthetic batch with the rollout DataModule's keys, one backward,
per-group gradient clipping (10), AdamW, the Polyak update; and ``--generations`` rollout generations
(``SharedBaseLM.generate_from_ids``: temperature 0.5, top-k 50, 256 new tokens, KV cache).

Printed: peak GPU memory (``torch.cuda.max_memory_allocated``) per phase, tokens/s of generation and of training,
and model FLOPs utilisation:

* training MFU = 6 * N * T / (t_update * peak), the usual training-equivalent count, with N = parameters without
  the input embedding and T = sequences x (prompt + action) tokens of the update;
* ETPO's own FLOPs are lower on the weights (LoRA: no base-weight gradients) and higher in forwards (4 views,
  recompute); the estimate ``(2*4 + 2*2 + 2*2*ckpt) * N_dec * T + head`` is printed too (hardware FLOPs);
* generation MFU = 2 * N * generated tokens / (t_generation * peak) (decoding is memory-bound; expect a few %).

Peak dense bf16 FLOP/s assumed: H100 SXM / H200 989.4e12, H100 PCIe 756e12, A100 312e12 (NVIDIA datasheets,
without sparsity); ``--peak-tflops`` overrides.

Exit codes: 0 = ran; 3 = no CUDA device and no ``--tiny`` (nothing measured; the message says so); 1 = failure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import socket
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

EXIT_NO_CUDA = 3
PEAK_BF16_FLOPS = {"H200": 989.4e12, "H100 PCIe": 756e12, "H100": 989.4e12, "A100": 312e12}


@dataclass
class SmokeShape:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    envs: int  # generation batch (parallel environments)
    steps: int  # environment steps per environment per update -> sequences = envs * steps
    prompt: int
    action: int
    chunk: int
    lora_r: int


CODELLAMA_7B = SmokeShape(hidden=4096, layers=32, heads=32, intermediate=11008, vocab=32016, envs=8, steps=2,
                          prompt=512, action=256, chunk=64, lora_r=16)
TINY = SmokeShape(hidden=64, layers=2, heads=4, intermediate=176, vocab=512, envs=2, steps=2, prompt=12, action=8,
                  chunk=4, lora_r=4)


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


def build_shared(shape: SmokeShape, device, dtype, checkpointing: bool):
    """A random Llama of ``shape`` created directly on ``device`` in ``dtype``, wrapped in ``SharedBaseLM``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from modules.shared_base.loading import resolve_attn_implementation
    from modules.shared_base import BackboneConfig, SharedBaseLM

    attn = resolve_attn_implementation("auto", device, dtype)
    cfg = LlamaConfig(hidden_size=shape.hidden, num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                      num_key_value_heads=shape.heads, intermediate_size=shape.intermediate, vocab_size=shape.vocab,
                      max_position_embeddings=max(4096, shape.prompt + shape.action), rope_theta=1e6,
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
                              seed=0, device=str(device))
    shared = SharedBaseLM(backbone, model=model, tokenizer=word_tokenizer(shape.vocab))
    return shared, backbone, attn


def synthetic_batch(shape: SmokeShape, seed: int = 0) -> dict:
    """A rollout batch with the keys of ``datamodules.rollout`` (docs/architecture.md): ``envs * steps``
    transitions; first-step transitions of unfinished episodes link to their env's second step (``next_index``),
    second-step ones need a bare next prompt (``next_needed``). Actions are full length (the memory worst case)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    n = shape.envs * shape.steps
    low = 4  # after the special tokens
    dones = (torch.rand(n, generator=g) < 0.5).float()
    next_index = torch.full((n,), -1, dtype=torch.long)
    for k in range(n - shape.envs):
        if dones[k] == 0:
            next_index[k] = k + shape.envs
    needed = torch.tensor([k for k in range(n) if dones[k] == 0 and next_index[k] < 0], dtype=torch.long)
    batch = {
        "prompt_ids": torch.randint(low, shape.vocab, (n, shape.prompt), generator=g),
        "prompt_mask": torch.ones(n, shape.prompt, dtype=torch.long),
        "action_ids": torch.randint(low, shape.vocab, (n, shape.action), generator=g),
        "action_mask": torch.ones(n, shape.action, dtype=torch.long),
        "rewards": torch.rand(n, generator=g) * 2 - 1,
        "dones": dones,
        "truncated": torch.zeros(n),
        "next_index": next_index,
        "next_needed": needed,
        "env_index": torch.arange(n) % shape.envs,
        "episode_step": torch.arange(n) // shape.envs,
    }
    if needed.numel():
        batch["next_prompt_ids"] = torch.randint(low, shape.vocab, (needed.numel(), shape.prompt), generator=g)
        batch["next_prompt_mask"] = torch.ones(needed.numel(), shape.prompt, dtype=torch.long)
    return batch


def _to(batch: dict, device) -> dict:
    import torch

    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Meter:
    """Peak memory (CUDA) and wall time of a phase."""

    def __init__(self, device):
        self.device = device
        self.peaks: dict[str, float] = {}
        self.times: dict[str, list[float]] = {}

    @contextlib.contextmanager
    def phase(self, name: str):
        import torch

        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        _sync(self.device)
        t0 = time.perf_counter()
        yield
        _sync(self.device)
        self.times.setdefault(name, []).append(time.perf_counter() - t0)
        if cuda:
            self.peaks[name] = max(self.peaks.get(name, 0.0), torch.cuda.max_memory_allocated(self.device) / 1e9)


def clip_and_step(optimizer, root=None) -> dict[str, float]:
    """Per-group gradient-norm clipping as ``AgentModule.configure_gradient_clipping`` does, then the step."""
    from modules.shared_base.fsdp import global_grad_norm

    norms = {}
    for group in optimizer.param_groups:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            continue
        norm = global_grad_norm(params, root)
        scale = (group["max_grad_norm"] / (norm + 1e-6)).clamp(max=1.0)
        for p in params:
            p.grad.mul_(scale.to(p.grad.dtype))
        norms[group["name"]] = float(norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norms


def make_module(shape: SmokeShape, shared, backbone):
    from modules.etpo import ETPOModule

    module = ETPOModule(backbone=backbone, token_chunk_size=shape.chunk, policy_lr=1e-4, critic_lr=1e-4)
    module.model = shared  # configure_model keeps a model that is already there
    return module


def make_optimizer(module, root=None):
    import torch

    from modules.agent import adapter_parameters

    where = root if root is not None else module
    groups = [{"params": adapter_parameters(where, "critic"), "lr": 1e-4, "name": "critic", "max_grad_norm": 10.0},
              {"params": adapter_parameters(where, "policy"), "lr": 1e-4, "name": "policy", "max_grad_norm": 10.0}]
    return torch.optim.AdamW(groups, weight_decay=0.0)


def flops_report(shape: SmokeShape, n_params: int, t_update: float, t_gen: float, gen_tokens: int,
                 checkpointing: bool, peak: float | None) -> dict:
    h, V = shape.hidden, shape.vocab
    n_no_emb = n_params - V * h
    n_dec = n_params - 2 * V * h
    seqs = shape.envs * shape.steps
    T = seqs * (shape.prompt + shape.action)
    rows = seqs * shape.action
    train_equiv = 6.0 * n_no_emb * T
    # forwards of 4 views + backward (input gradients only) of 2 + recompute of 2; the vocabulary head: 3 chunk
    # evaluations for the targets, 3 for the losses, 2 head backwards, 3 for the statistics (2 h V per row each)
    etpo = (8 + 4 + (4 if checkpointing else 0)) * n_dec * T + (3 + 3 + 2 * 2 + 3) * 2.0 * h * V * rows
    out = {"training_tokens_per_s": T / t_update, "generation_tokens_per_s": gen_tokens / t_gen if t_gen else None,
           "flops_per_update_6NT": train_equiv, "flops_per_update_etpo_estimate": etpo}
    if peak:
        out["peak_flops"] = peak
        out["mfu_training_6NT"] = train_equiv / t_update / peak
        out["hfu_training_etpo_estimate"] = etpo / t_update / peak
        out["mfu_generation_2N"] = 2.0 * n_no_emb * gen_tokens / t_gen / peak if t_gen else None
    return out


# ----------------------------------------------------------------------------------------------------------------
# plain (single device) run
# ----------------------------------------------------------------------------------------------------------------

def run_plain(args, shape: SmokeShape, device, dtype) -> dict:
    import torch

    from modules.shared_base.fsdp import polyak_update_sharded

    meter = Meter(device)
    with meter.phase("build"):
        shared, backbone, attn = build_shared(shape, device, dtype, checkpointing=not args.no_checkpointing)
    module = make_module(shape, shared, backbone)
    module.train()
    optimizer = make_optimizer(module)
    n_params = sum(p.numel() for n, p in shared.base_model.named_parameters() if "lora_" not in n)
    batch = _to(synthetic_batch(shape), device)
    losses = []
    for _ in range(args.generations):
        with meter.phase("generation"):
            torch.manual_seed(0)
            gen = shared.generate_from_ids(batch["prompt_ids"][:shape.envs], batch["prompt_mask"][:shape.envs],
                                           max_new_tokens=shape.action, temperature=0.5, top_k=50)
        gen_tokens = int(gen.action_mask.sum())
    for _ in range(args.updates):
        with meter.phase("update"):
            loss, charts = module.update_loss(batch)
            loss.backward()
            norms = clip_and_step(optimizer)
            polyak_update_sharded(shared, 0.995)
        losses.append({"loss": float(loss.detach()), **{f"grad_norm_{k}": v for k, v in norms.items()},
                       "kl": charts["charts/kl"]})
    return summarise(args, shape, device, meter, n_params, gen_tokens, losses, attn, mode="plain")


def summarise(args, shape, device, meter: Meter, n_params, gen_tokens, losses, attn, mode) -> dict:
    import torch

    t_update = min(meter.times["update"][1:] or meter.times["update"])  # the first step includes warm-up
    t_gen = min(meter.times["generation"]) if meter.times.get("generation") else 0.0
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_flops(name, args.peak_tflops) if device.type == "cuda" else None
    report = {
        "mode": mode, "device": name, "attn_implementation": attn, "shape": shape.__dict__,
        "params_without_adapters": n_params, "activation_checkpointing": not args.no_checkpointing,
        "update_seconds": meter.times["update"], "generation_seconds": meter.times.get("generation", []),
        "generated_tokens": gen_tokens, "peak_memory_gb": meter.peaks, "losses": losses,
    }
    report.update(flops_report(shape, n_params, t_update, t_gen, gen_tokens, not args.no_checkpointing, peak))
    if device.type == "cuda":
        report["max_memory_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return report


# ----------------------------------------------------------------------------------------------------------------
# FSDP runs
# ----------------------------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_fsdp_cpu(args, shape: SmokeShape, device, dtype) -> dict:
    """torch FSDP1 on the CPU (gloo, one process) with modules.shared_base.fsdp's wrap settings, the update inside the root
    forward exactly as Lightning's training_step runs (Lightning's FSDPStrategy itself refuses a CPU)."""
    import torch
    import torch.distributed as dist
    from lightning.pytorch.strategies.strategy import _ForwardRedirection
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from modules.shared_base.fsdp import (allreduce_replicated_gradients, fsdp_kwargs, is_sharded, polyak_update_sharded,
                                  summon_full_params_if_sharded)

    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        meter = Meter(device)
        shared, backbone, attn = build_shared(shape, device, dtype, checkpointing=not args.no_checkpointing)
        module = make_module(shape, shared, backbone)
        module.train()
        root = FSDP(module, device_id=torch.device("cpu"), **fsdp_kwargs(shared, adapters="replicate"))
        assert is_sharded(root)
        optimizer = make_optimizer(module, root)
        n_params = sum(p.numel() for n, p in shared.base_model.named_parameters() if "lora_" not in n)
        batch = synthetic_batch(shape)
        redirect = _ForwardRedirection()
        losses, gen_tokens = [], 0
        for _ in range(args.generations):
            with meter.phase("generation"), summon_full_params_if_sharded(root, recurse=False):
                torch.manual_seed(0)
                gen = shared.generate_from_ids(batch["prompt_ids"][:shape.envs], batch["prompt_mask"][:shape.envs],
                                               max_new_tokens=shape.action, temperature=0.5, top_k=50)
            gen_tokens = int(gen.action_mask.sum())
        for _ in range(args.updates):
            with meter.phase("update"):
                loss, charts = redirect(root, module, "update_loss", batch)
                loss.backward()
                allreduce_replicated_gradients(root.parameters(), root)
                norms = clip_and_step(optimizer, root)
                polyak_update_sharded(shared, 0.995, root)
            losses.append({"loss": float(loss.detach()), **{f"grad_norm_{k}": v for k, v in norms.items()}})
        return summarise(args, shape, device, meter, n_params, gen_tokens, losses, attn, mode="fsdp-cpu-gloo")
    finally:
        if started:
            dist.destroy_process_group()


def run_fsdp_lightning(args, shape: SmokeShape, device, dtype) -> dict:
    """Lightning Trainer + ETPOFSDPStrategy on one GPU: ETPOModule.training_step as in a real run, with a synthetic
    stream that generates a rollout (inside the step, as the rollout DataModule does) and yields the batch."""
    import torch
    from lightning.pytorch import Callback, Trainer
    from torch.utils.data import DataLoader, IterableDataset

    from modules.strategy import ETPOFSDPStrategy
    from modules.etpo import ETPOModule

    shared, backbone, attn = build_shared(shape, device, dtype, checkpointing=not args.no_checkpointing)
    n_params = sum(p.numel() for n, p in shared.base_model.named_parameters() if "lora_" not in n)
    meter = Meter(device)
    state = {"gen_tokens": 0}

    class SmokeModule(ETPOModule):
        def configure_model(self):
            if self.model is None:
                self.model = shared

    module = SmokeModule(backbone=backbone, token_chunk_size=shape.chunk)

    class Stream(IterableDataset):
        def __iter__(self):
            for k in range(args.updates):
                batch = synthetic_batch(shape, seed=k)
                with meter.phase("generation"):
                    torch.manual_seed(k)
                    gen = module.model.generate_from_ids(batch["prompt_ids"][:shape.envs],
                                                         batch["prompt_mask"][:shape.envs],
                                                         max_new_tokens=shape.action, temperature=0.5, top_k=50)
                state["gen_tokens"] = int(gen.action_mask.sum())
                batch["policy_version"] = module.policy_version
                batch["metrics"] = {"avg_reward": 0.0, "best_reward": 0.0, "runnable_fraction": 0.0,
                                    "env_steps": float(k), "sps": 0.0}
                yield batch

    losses = []

    class Step(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            torch.cuda.reset_peak_memory_stats(device)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            losses.append({"loss": float(loss)})
            meter.peaks["update (incl. rollout)"] = max(meter.peaks.get("update (incl. rollout)", 0.0),
                                                        torch.cuda.max_memory_allocated(device) / 1e9)

    strategy = ETPOFSDPStrategy(layer_classes=["LlamaDecoderLayer"], sharding_strategy="FULL_SHARD")
    trainer = Trainer(accelerator="cuda", devices=1, strategy=strategy, precision="32-true", max_epochs=1,
                      max_steps=args.updates, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                      callbacks=[Step()])
    t0 = time.perf_counter()
    trainer.fit(module, train_dataloaders=DataLoader(Stream(), batch_size=None, num_workers=0))
    total = time.perf_counter() - t0
    t_gen = sum(meter.times.get("generation", []))
    meter.times["update"] = [max(1e-9, (total - t_gen) / max(1, len(losses)))]
    report = summarise(args, shape, device, meter, n_params, state["gen_tokens"], losses, attn, mode="fsdp-lightning")
    report["note"] = "update seconds = (fit wall time - generation time) / steps, includes Lightning overhead"
    return report


# ----------------------------------------------------------------------------------------------------------------

def print_report(report: dict) -> None:
    print(f"gpu_smoke: mode {report['mode']} on {report['device']} (attention: {report['attn_implementation']})")
    sh = report["shape"]
    print(f"  model: h={sh['hidden']} layers={sh['layers']} heads={sh['heads']} i={sh['intermediate']} "
          f"V={sh['vocab']}, {report['params_without_adapters'] / 1e6:,.2f}M params, LoRA r={sh['lora_r']} x 3")
    print(f"  update: {sh['envs'] * sh['steps']} sequences x ({sh['prompt']} prompt + {sh['action']} action) tokens, "
          f"chunk {sh['chunk']}, checkpointing {report['activation_checkpointing']}")
    for name, value in report["peak_memory_gb"].items():
        print(f"  peak memory [{name}]: {value:.2f} GB (torch.cuda.max_memory_allocated)")
    print(f"  update seconds: {', '.join(f'{t:.3f}' for t in report['update_seconds'])}")
    print(f"  training tokens/s: {report['training_tokens_per_s']:.1f}")
    if report.get("generation_tokens_per_s"):
        print(f"  generation tokens/s: {report['generation_tokens_per_s']:.1f} "
              f"({report['generated_tokens']} tokens per generation)")
    if "mfu_training_6NT" in report:
        print(f"  training MFU (6 N T): {100 * report['mfu_training_6NT']:.1f} %; ETPO hardware FLOPs estimate: "
              f"{100 * report['hfu_training_etpo_estimate']:.1f} %; generation MFU (2 N): "
              f"{100 * (report['mfu_generation_2N'] or 0):.2f} % of {report['peak_flops'] / 1e12:.0f} TFLOP/s")
    else:
        print("  MFU: not computed (CPU, or unknown GPU: pass --peak-tflops)")
    print(f"  losses: {[round(x['loss'], 4) for x in report['losses']]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="ETPO GPU smoke benchmark (random 7B-shaped Llama)")
    parser.add_argument("--tiny", action="store_true", help="small model on the CPU (same code path)")
    parser.add_argument("--fsdp", action="store_true", help="run the update under FSDP (Lightning on CUDA)")
    parser.add_argument("--updates", type=int, default=3, help="ETPO updates to time")
    parser.add_argument("--generations", type=int, default=2, help="rollout generations to time")
    parser.add_argument("--no-checkpointing", action="store_true", help="disable activation checkpointing")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak bf16 TFLOP/s for MFU")
    parser.add_argument("--json", type=str, default=None, help="also write the report to this file")
    args = parser.parse_args(argv)

    import torch

    if not args.tiny and not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device on this machine -- nothing was measured (exit code 3). "
              "Run with --tiny for the CPU check of the same code path.", file=sys.stderr)
        return EXIT_NO_CUDA
    shape = TINY if args.tiny else CODELLAMA_7B
    threads = torch.get_num_threads()
    try:
        if args.tiny:
            device, dtype = torch.device("cpu"), torch.float32
            torch.set_num_threads(1)  # tiny matmuls: more threads only spin-wait on a shared CPU
        else:
            device, dtype = torch.device("cuda", torch.cuda.current_device()), torch.bfloat16
        if args.fsdp:
            run = run_fsdp_cpu if args.tiny else run_fsdp_lightning
        else:
            run = run_plain
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            report = run(args, shape, device, dtype)
    finally:
        torch.set_num_threads(threads)
    if any(not math.isfinite(x["loss"]) for x in report["losses"]):
        print("gpu_smoke: non-finite loss", file=sys.stderr)
        print_report(report)
        return 1
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
