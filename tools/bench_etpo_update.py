"""Cost of one ETPO update against one LoRA fine-tuning step on the same model and batch, side by side.

    python tools/bench_etpo_update.py                 # SmolLM2-135M (offline default), 8 x (prompt + 128 tokens)
    python tools/bench_etpo_update.py --tiny          # a tiny random Llama, seconds

Both steps run in one process, alternately, ``--repeats`` times each (these machines are noisy; medians are
reported):

* ETPO: ``ETPOModule.update_loss`` (target, reference, critic and policy views; exact per-token soft values over
  the vocabulary; next-state values for non-terminal transitions), backward, AdamW step, Polyak update;
* LoRA fine-tuning: the policy view's logits over the action tokens, cross-entropy on the same tokens, backward,
  AdamW step -- what one supervised step on the same data costs.

Peak memory is measured in two fresh subprocesses, one per step kind (an allocator that has already grown during
one kind of step hides the other's peak): the peak resident set size during the first step (``VmHWM`` after
resetting it through ``/proc/self/clear_refs``) minus the resident size just before it -- the step's own working
memory, optimizer state creation included.
Bytes stored per generated token between rollout and update are counted from a real rollout batch.
Goals (issue): time <= 3.0x, peak memory <= 1.3x, <= 16 bytes per generated token.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure(step) -> tuple[float, float]:
    """(seconds, peak working memory in MiB) of one call of ``step``."""
    before = _rss_kb("VmRSS")
    _reset_peak()
    t0 = time.perf_counter()
    step()
    seconds = time.perf_counter() - t0
    peak = _rss_kb("VmHWM")
    return seconds, max(0, peak - before) / 1024


def _child_memory(kind: str) -> float:
    """Working memory of one step of ``kind`` in a fresh process with the same arguments."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, *sys.argv, f"--memory_of={kind}"], capture_output=True, text=True,
                         check=True).stdout
    return float(next(line.split()[1] for line in out.splitlines() if line.startswith("MEMORY_MIB")))


def synthetic_batch(module, prompts: list[str], next_prompts: list[str], action_len: int, seed: int = 0) -> dict:
    """A rollout-shaped batch: real prompts, random action tokens of ``action_len`` (content does not change
    cost), every other transition non-terminal with its next prompt to evaluate."""
    from datamodules.rollout import _left_pad, _right_pad

    g = torch.Generator().manual_seed(seed)
    m = module.model
    b = len(prompts)
    ids = module.encode_prompts(prompts)
    vocab = m.vocab_size
    lengths = [action_len - (i % 3) * (action_len // 4) for i in range(b)]  # ragged, as real actions are
    actions = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]
    dones = torch.tensor([float(i % 2) for i in range(b)])
    need = [i for i in range(b) if dones[i] == 0]
    batch = {"rewards": torch.rand(b, generator=g), "dones": dones, "truncated": torch.zeros(b),
             "next_index": torch.full((b,), -1), "next_needed": torch.tensor(need, dtype=torch.long),
             "policy_version": 0, "metrics": {}}
    batch["prompt_ids"], batch["prompt_mask"] = _left_pad(ids, 0)
    batch["action_ids"], batch["action_mask"] = _right_pad(actions, 0)
    batch["next_prompt_ids"], batch["next_prompt_mask"] = _left_pad(module.encode_prompts([next_prompts[i] for i in need]), 0)
    return batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny random Llama instead of SmolLM2-135M")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--action_tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--memory_of", choices=["etpo", "lora"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--no_checkpointing", action="store_true",
                    help="keep every activation (the CPU configs use activation checkpointing; so do both steps here)")
    ap.add_argument("--release_freed_memory", action="store_true",
                    help="fix glibc's mmap threshold as ETPO_RELEASE_FREED_MEMORY=1 does in etpo.fit "
                         "(see etpo/malloc.py)")
    args = ap.parse_args()
    if args.release_freed_memory:
        from etpo.malloc import release_freed_memory_promptly

        release_freed_memory_promptly()
    if args.threads:
        torch.set_num_threads(args.threads)

    from envs.datascience import DataScienceEnv
    from modules.etpo import ETPOModule
    from modules.shared_base.loading import BackboneConfig

    if args.tiny:
        backbone = BackboneConfig(source="tiny", tiny_alphabet="abcdefghijklmnopqrstuvwxyz ():=.\n", device="cpu",
                                  tiny_hidden_size=64, tiny_num_layers=2, lora_r=8, lora_alpha=16.0,
                                  gradient_checkpointing=not args.no_checkpointing)
    else:
        backbone = BackboneConfig(source="smollm2", gguf_cache_dir="runs/.model_cache", lora_r=8, lora_alpha=16.0,
                                  gradient_checkpointing=not args.no_checkpointing)
    module = ETPOModule(backbone=backbone, beta=0.01)
    module.configure_model()
    m = module.model
    m.train()  # training mode for both steps (activation checkpointing is active only there)

    env = DataScienceEnv("breast_cancer", prompt_style="few_shot", n_splits=1)
    prompt, _ = env.reset(seed=0)
    if args.tiny:
        prompt = prompt[-300:]
    # next states of failed attempts are reflection prompts: the task plus the code and the error
    from envs.datascience.prompts import reflection_prompt

    body = "    from sklearn.linear_model import LogisticRegression\n    return LogisticRegression().fit(x_train, y_train)"
    reflect = reflection_prompt(prompt, "def build_model(x_train, y_train):\n" + body, body,
                                "NameError: name 'x' is not defined")
    batch = synthetic_batch(module, [prompt] * args.batch, [reflect] * args.batch, args.action_tokens)
    n_gen = int(batch["action_mask"].sum())

    policy = m.policy_parameters()
    opt_etpo = torch.optim.AdamW(m.policy_parameters() + m.critic_parameters(), lr=1e-5)
    opt_lora = torch.optim.AdamW(policy, lr=1e-5)
    args_ = (batch["prompt_ids"], batch["prompt_mask"], batch["action_ids"], batch["action_mask"])

    def etpo_step():
        loss, _ = module.update_loss(batch)
        loss.backward()
        opt_etpo.step()
        opt_etpo.zero_grad(set_to_none=True)
        m.polyak_update(0.995)

    def lora_step():
        logits = m.action_logits("policy", *args_)
        mask = batch["action_mask"].bool()
        loss = F.cross_entropy(logits[mask], batch["action_ids"][mask])
        loss.backward()
        opt_lora.step()
        opt_lora.zero_grad(set_to_none=True)

    if args.memory_of:  # child process: one step of one kind, print its working memory
        print(f"MEMORY_MIB {measure(etpo_step if args.memory_of == 'etpo' else lora_step)[1]:.1f}")
        return
    memory = {kind: _child_memory(kind) for kind in ("etpo", "lora")}

    etpo_step(), lora_step()  # warm-up (allocator, optimizer state)
    runs = {"etpo": [], "lora": []}
    for _ in range(args.repeats):
        runs["etpo"].append(measure(etpo_step))
        runs["lora"].append(measure(lora_step))
    med = {k: (statistics.median(t for t, _ in v), memory[k]) for k, v in runs.items()}

    # bytes held per generated token between rollout and update: the action-aligned tensors of a batch
    per_token = batch["action_ids"].element_size() + batch["action_mask"].element_size()
    all_bytes = sum(t.numel() * t.element_size() for t in batch.values() if isinstance(t, torch.Tensor))
    vocab_bytes_ref = 4 * m.vocab_size * 4  # the reference implementation: 4 float32 vocabulary vectors per token

    name = "tiny random Llama" if args.tiny else "SmolLM2-135M"
    print(f"model: {name}, batch {args.batch}, prompt {batch['prompt_ids'].shape[1]} tokens, "
          f"{n_gen} generated tokens, {len(batch['next_needed'])} next-state prompts of "
          f"{batch['next_prompt_ids'].shape[1]} tokens, torch threads {torch.get_num_threads()}, "
          f"activation checkpointing {'on' if backbone.gradient_checkpointing else 'off'}, glibc malloc "
          f"{'fixed mmap threshold' if args.release_freed_memory else 'defaults'}")
    print(f"{'step':<28}{'median s':>10}{'peak MiB':>10}")
    print(f"{'ETPO update':<28}{med['etpo'][0]:>10.2f}{med['etpo'][1]:>10.0f}")
    print(f"{'LoRA fine-tuning step':<28}{med['lora'][0]:>10.2f}{med['lora'][1]:>10.0f}")
    print(f"time ratio ETPO / LoRA: {med['etpo'][0] / med['lora'][0]:.2f}x (goal <= 3.0x)")
    if med["lora"][1] > 0:
        print(f"peak memory ratio ETPO / LoRA: {med['etpo'][1] / med['lora'][1]:.2f}x (goal <= 1.3x)")
    print(f"bytes stored per generated token (action ids + mask): {per_token} (goal <= 16); "
          f"whole batch incl. prompts: {all_bytes / n_gen:.0f} B per generated token; "
          f"reference implementation: {vocab_bytes_ref:,} B per token")


if __name__ == "__main__":
    main()
