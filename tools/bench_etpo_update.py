"""Cost of one ETPO update and of one rollout generation batch, side by side with their plain counterparts.

    python tools/bench_etpo_update.py                 # SmolLM2-135M (offline default), the quickstart's batch shape
    python tools/bench_etpo_update.py --tiny          # a tiny random Llama, seconds
    python tools/bench_etpo_update.py --thread_study  # the update under CPU load, for several thread settings
    python tools/bench_etpo_update.py --generation_only   # only generation vs bare HF generate

The batch has the quickstart's shape: ``--batch`` rows of the few-shot breast_cancer prompt, ragged actions of up to
``--action_tokens`` tokens, every other row non-terminal with a reflection prompt as its next state. In one process,
alternately, ``--repeats`` times each (these machines are noisy; medians are reported):

* **ETPO update** (``ETPOModule.learn``): targets from the reference, target and policy views; the critic's AdamW
  step; the policy's AdamW step against the updated critic; Polyak -- shared prompt prefixes computed once;
* **previous update**: the update as it was before prefix sharing and the separate steps (kept here verbatim in
  spirit for the comparison): four plain forwards (reference, target, critic, policy) over every row, the next
  prompts scored by three more, full-vocabulary critic and policy chunks, one AdamW step over both adapters;
* **LoRA fine-tuning step**: the policy view over every row (plain forwards, as a supervised LoRA step runs),
  cross-entropy on the same action tokens, backward, AdamW step.

Working memory is measured in fresh subprocesses, one per step kind (an allocator grown by one kind hides the
other's peak): the peak resident set size during the first step (``VmHWM`` after resetting it through
``/proc/self/clear_refs``) minus the resident size just before it; next to it the peak bytes of live tensors during
a second step (a dispatch mode tracking every storage until it is freed) -- the difference is memory the allocator
keeps resident after tensors are freed.

Generation: ``SharedBaseLM.generate_from_ids`` (the prompt prefix all rows share prefilled once) against bare
``peft_model.generate`` on the same prompts with the same settings, and tokens per second.

Goals (issue): update >= 3x faster than the previous one; <= 3.0x the LoRA step's time and <= 1.3x its working
memory; generation <= 1.0x bare generate.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def measure(step) -> tuple[float, float]:
    """(seconds, peak working memory in MiB) of one call of ``step``."""
    before = _rss_kb("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM
    except OSError:
        pass
    t0 = time.perf_counter()
    step()
    seconds = time.perf_counter() - t0
    return seconds, max(0, _rss_kb("VmHWM") - before) / 1024


class LiveTensorPeak:
    """Peak bytes of live CPU tensor storages while the block runs (a dispatch mode sees every op's outputs; a
    storage counts until it is freed): what the tensors need, as opposed to what the allocator keeps resident."""

    def __enter__(self):
        from torch.multiprocessing.reductions import StorageWeakRef
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        tracker = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                        st = t.untyped_storage()
                        key = st.data_ptr()
                        if key and key not in tracker.live:
                            tracker.live[key] = (StorageWeakRef(st), st.nbytes())
                            tracker.current += st.nbytes()
                for key in [k for k, (ref, _) in tracker.live.items() if ref.expired()]:
                    tracker.current -= tracker.live.pop(key)[1]
                tracker.peak = max(tracker.peak, tracker.current)
                return out

        self.live, self.current, self.peak = {}, 0, 0
        self.mode = Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


def _child(args: list[str], env: dict | None = None) -> str:
    return subprocess.run([sys.executable, os.path.abspath(__file__), *args], capture_output=True, text=True,
                          check=True, env={**os.environ, **(env or {})}).stdout


def rollout_batch(module, prompt: str, reflect: str, rows: int, action_len: int, seed: int = 0):
    """A rollout-shaped RolloutBatch: ``rows`` copies of the task prompt, random ragged actions (their content does
    not change the cost), every other transition non-terminal with a reflection prompt as next state."""
    from datamodules.batch import GenerationConfig, RolloutBatch, RolloutMetrics
    from datamodules.rollout import _left_pad, _right_pad

    g = torch.Generator().manual_seed(seed)
    ids = module.encode_prompts([prompt] * rows)
    lengths = [action_len - (i % 3) * (action_len // 4) for i in range(rows)]  # ragged, as real actions are
    actions = [torch.randint(3, module.model.vocab_size, (n,), generator=g).tolist() for n in lengths]
    terminated = torch.tensor([i % 2 == 1 for i in range(rows)])
    need = [i for i in range(rows) if not terminated[i]]
    prompt_ids, prompt_mask = _left_pad(ids, 0)
    action_ids, action_mask = _right_pad(actions, 0)
    next_ids, next_mask = _left_pad(module.encode_prompts([reflect] * len(need)), 0)
    return RolloutBatch(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask, action_ids=action_ids, action_mask=action_mask,
        rewards=torch.rand(rows, generator=g), terminated=terminated, truncated=torch.zeros(rows, dtype=torch.bool),
        next_index=torch.full((rows,), -1), next_needed=torch.tensor(need, dtype=torch.long),
        env_index=torch.arange(rows), episode_step=torch.ones(rows, dtype=torch.long),
        runnable=terminated.clone(), policy_version=0, sampling=GenerationConfig(max_new_tokens=action_len),
        metrics=RolloutMetrics(0.0, 0.0, 0.0, 0.0, 0.0, 0.0), next_prompt_ids=next_ids, next_prompt_mask=next_mask)


def previous_update_loss(module, batch) -> torch.Tensor:
    """The update before prefix sharing and separate steps: plain forwards of all four views over every row, three
    more over the next prompts, the critic's and the policy's full-vocabulary chunks; returns the summed loss whose
    gradient is both losses' (one backward, one optimizer step over both adapters)."""
    from modules.losses.etpo import critic_loss, policy_loss, soft_value, targets_from_values
    from modules.shared_base.scoring import token_chunks

    m, hp = module.model, module.hparams
    plain = dict(share_prefixes=False)
    args = (batch.prompt_ids, batch.prompt_mask, batch.action_ids, batch.action_mask)
    actions, mask = batch.action_ids, batch.action_mask.float()
    n_tokens = mask.sum().clamp(min=1)
    chunk = hp.token_chunk_size
    with torch.no_grad():
        h_ref = m.action_hidden("reference", *args, **plain)
        h_target = m.action_hidden("target", *args, **plain)
    h_critic = m.action_hidden("critic", *args, **plain)
    h_policy = m.action_hidden("policy", *args, **plain)
    values = torch.zeros(mask.shape)
    with torch.no_grad():
        for sl in token_chunks(mask.shape[1], chunk):
            ref = m.head(h_ref[:, sl])
            values[:, sl] = soft_value(module._q(m.head(h_target[:, sl]), ref), m.head(h_policy[:, sl]), ref,
                                       hp.beta)[0]
        next_values = torch.zeros(len(batch))
        if batch.next_needed.numel():
            ids, pm = batch.next_prompt_ids, batch.next_prompt_mask
            r = m.first_token_logits("reference", ids, pm)
            t = m.first_token_logits("target", ids, pm)
            p = m.first_token_logits("policy", ids, pm)
            next_values[batch.next_needed] = soft_value(module._q(t, r), p, r, hp.beta)[0]
        targets = targets_from_values(values, mask, batch.rewards, batch.dones, next_values, hp.gamma)
    grad_c = torch.zeros_like(h_critic)
    grad_p = torch.zeros_like(h_policy)
    for sl in token_chunks(mask.shape[1], chunk):
        with torch.no_grad():
            ref = m.head(h_ref[:, sl])
        leaf_c = h_critic[:, sl].detach().requires_grad_(True)
        leaf_p = h_policy[:, sl].detach().requires_grad_(True)
        q = module._q(m.head(leaf_c), ref)
        loss_c = critic_loss(q, actions[:, sl], targets[:, sl], mask[:, sl], reduction="sum")
        loss_p = policy_loss(m.head(leaf_p), ref, q.detach(), mask[:, sl], hp.beta, reduction="sum")
        grad_c[:, sl] = torch.autograd.grad(loss_c / n_tokens, leaf_c)[0]
        grad_p[:, sl] = torch.autograd.grad(loss_p / n_tokens, leaf_p)[0]
    return (h_critic * grad_c).sum() + (h_policy * grad_p).sum()


def build(args):
    from envs.datascience import DataScienceEnv
    from envs.datascience.prompts import reflection_prompt
    from modules.etpo import ETPOModule
    from modules.shared_base.loading import BackboneConfig

    common = dict(lora_r=8, lora_alpha=16.0, gradient_checkpointing=not args.no_checkpointing)
    if args.tiny:
        backbone = BackboneConfig(source="tiny", tiny_alphabet="abcdefghijklmnopqrstuvwxyz ():=.\n", device="cpu",
                                  tiny_hidden_size=64, tiny_num_layers=2, **common)
    else:
        backbone = BackboneConfig(source="smollm2", gguf_cache_dir="runs/.model_cache", **common)
    module = ETPOModule(backbone=backbone, beta=0.01, q_parameterisation="zero", td_lambda=0.9)
    module.configure_model()
    module.model.train()  # training mode for every step (activation checkpointing is active only there)
    env = DataScienceEnv("breast_cancer", prompt_style="few_shot", n_splits=1)
    prompt, _ = env.reset(seed=0)
    env.close()
    if args.tiny:
        prompt = prompt[-300:]
    body = "    from sklearn.linear_model import LogisticRegression\n    return LogisticRegression().fit(x_train, y_train)"
    reflect = reflection_prompt(prompt, "def build_model(x_train, y_train):\n" + body, body,
                                "NameError: name 'x' is not defined")
    batch = rollout_batch(module, prompt, reflect, args.batch, args.action_tokens)
    return module, batch


def steps(module, batch):
    m = module.model
    params = m.policy_parameters() + m.critic_parameters()
    opt_previous = torch.optim.AdamW(params, lr=1e-6)
    opt_lora = torch.optim.AdamW(m.policy_parameters(), lr=1e-6)
    plain_args = (batch.prompt_ids, batch.prompt_mask, batch.action_ids, batch.action_mask)

    def etpo_step():
        module.learn(batch)

    def previous_step():
        previous_update_loss(module, batch).backward()
        opt_previous.step()
        opt_previous.zero_grad(set_to_none=True)
        m.polyak_update(0.995)

    def lora_step():
        hidden = m.action_hidden("policy", *plain_args, share_prefixes=False)
        mask = batch.action_mask.bool()
        loss = F.cross_entropy(m.head(hidden)[mask], batch.action_ids[mask])
        loss.backward()
        opt_lora.step()
        opt_lora.zero_grad(set_to_none=True)

    return {"etpo": etpo_step, "previous": previous_step, "lora": lora_step}


def bench_generation(module, batch, max_new_tokens: int, repeats: int) -> dict:
    from transformers import GenerationConfig as HFGenerationConfig

    m = module.model
    ids, mask = batch.prompt_ids, batch.prompt_mask
    times = {"ours": [], "bare": []}
    tokens = {"ours": 0, "bare": 0}
    for r in range(repeats):
        torch.manual_seed(r)
        t0 = time.perf_counter()
        gen = m.generate_from_ids(ids, mask, max_new_tokens=max_new_tokens, temperature=0.5, top_k=50)
        times["ours"].append(time.perf_counter() - t0)
        tokens["ours"] = int(gen.action_mask.sum())
        cfg = HFGenerationConfig(max_new_tokens=max_new_tokens, do_sample=True, temperature=0.5, top_k=50, top_p=1.0,
                                 repetition_penalty=1.0, num_beams=1, pad_token_id=m.pad_token_id,
                                 eos_token_id=m.eos_token_ids, use_cache=True)
        torch.manual_seed(r)
        m.eval()
        t0 = time.perf_counter()
        with torch.no_grad(), m.use_view("policy"):
            out = m.peft_model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)
        times["bare"].append(time.perf_counter() - t0)
        m.train()
        tokens["bare"] = int((out[:, ids.shape[1]:] != m.pad_token_id).sum())
    return {k: (statistics.median(v), tokens[k]) for k, v in times.items()}


def thread_study(args) -> None:
    """The ETPO update's median time for several thread settings, alone and next to busy processes."""
    rows = []
    for threads, wait in ((2, "active"), (2, "passive"), (1, "passive")):
        for load in (0, 1):
            busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(load)]
            try:
                child_args = [a for a in sys.argv[1:] if a != "--thread_study"]  # the child times, never studies
                out = _child([*child_args, f"--time_only={threads}"], env={"OMP_WAIT_POLICY": wait.upper()})
            finally:
                for p in busy:
                    p.kill()
            seconds = float(next(ln.split()[1] for ln in out.splitlines() if ln.startswith("SECONDS")))
            rows.append((threads, wait, load, seconds))
    print(f"{'threads':>8}{'OMP wait':>10}{'busy procs':>12}{'update s':>10}{'slowdown':>10}")
    alone = {(t, w): s for t, w, load, s in rows if load == 0}
    for t, w, load, s in rows:
        print(f"{t:>8}{w:>10}{load:>12}{s:>10.2f}{s / alone[(t, w)]:>9.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny random Llama instead of SmolLM2-135M")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--action_tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = the project's default)")
    ap.add_argument("--no_checkpointing", action="store_true", help="keep every activation")
    ap.add_argument("--no_generation", action="store_true", help="skip the generation comparison")
    ap.add_argument("--thread_study", action="store_true", help=thread_study.__doc__)
    ap.add_argument("--generation_only", action="store_true", help="only the generation comparison (minutes)")
    ap.add_argument("--memory_of", choices=["etpo", "previous", "lora"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--time_only", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.thread_study:
        thread_study(args)
        return
    if args.time_only:
        torch.set_num_threads(args.time_only)
    elif args.threads:
        torch.set_num_threads(args.threads)
    module, batch = build(args)
    if args.generation_only:
        print_generation(args, module, batch)
        return
    with module.without_trainer():  # the module's own two optimizers, no Trainer
        run(args, module, batch)


def run(args, module, batch) -> None:
    kinds = steps(module, batch)
    if args.memory_of:  # child process: one step of one kind, print its working memory
        print(f"MEMORY_MIB {measure(kinds[args.memory_of])[1]:.1f}")
        with LiveTensorPeak() as live:  # a second step: the peak of its live tensors (what they need at most)
            kinds[args.memory_of]()
        print(f"LIVE_MIB {live.peak / 2**20:.1f}")
        return
    if args.time_only:
        kinds["etpo"]()
        print(f"SECONDS {statistics.median(measure(kinds['etpo'])[0] for _ in range(args.repeats)):.3f}")
        return
    memory, live = {}, {}
    for kind in kinds:
        out = _child([*sys.argv[1:], f"--memory_of={kind}"])
        memory[kind] = float(next(ln.split()[1] for ln in out.splitlines() if ln.startswith("MEMORY_MIB")))
        live[kind] = float(next(ln.split()[1] for ln in out.splitlines() if ln.startswith("LIVE_MIB")))
    for step in kinds.values():
        step()  # warm-up (allocator, optimizer state)
    runs = {k: [] for k in kinds}
    for _ in range(args.repeats):
        for k, step in kinds.items():
            runs[k].append(measure(step)[0])
    med = {k: statistics.median(v) for k, v in runs.items()}
    plan = module.plan(batch)
    plain = module.model.plan(batch.prompt_ids, batch.prompt_mask, batch.action_ids, batch.action_mask,
                              batch.next_prompt_ids, batch.next_prompt_mask, share_prefixes=False)
    n_gen = int(batch.action_mask.sum())
    name = "tiny random Llama" if args.tiny else "SmolLM2-135M"
    print(f"model: {name}, batch {len(batch)}, prompt {batch.prompt_ids.shape[1]} tokens, {n_gen} action tokens, "
          f"{batch.next_needed.numel()} next-state prompts of {batch.next_prompt_ids.shape[1]} tokens, torch threads "
          f"{torch.get_num_threads()}, OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY', 'unset')}, activation "
          f"checkpointing {'on' if not args.no_checkpointing else 'off'}")
    print(f"token positions per view forward: shared prefixes {plan.tokens_computed}, plain {plain.tokens_computed}")
    print(f"{'step':<24}{'median s':>10}{'work MiB':>10}{'live MiB':>10}{'action tok/s':>14}")
    for k, label in (("etpo", "ETPO update"), ("previous", "previous ETPO update"), ("lora", "LoRA fine-tuning step")):
        print(f"{label:<24}{med[k]:>10.2f}{memory[k]:>10.0f}{live[k]:>10.0f}{n_gen / med[k]:>14.1f}")
    print("work MiB = peak resident size of a fresh process during its first step minus before it; live MiB = peak "
          "bytes of live tensors during a step (the rest of the working memory is what glibc keeps of freed ones)")
    print(f"ETPO update vs previous: {med['previous'] / med['etpo']:.2f}x faster (goal >= 3x); working memory "
          f"{memory['etpo'] / max(memory['previous'], 1e-9):.2f}x")
    print(f"ETPO update vs LoRA step: {med['etpo'] / med['lora']:.2f}x time (goal <= 3.0x), "
          f"{memory['etpo'] / max(memory['lora'], 1e-9):.2f}x working memory (goal <= 1.3x)")
    if not args.no_generation:
        print_generation(args, module, batch)


def print_generation(args, module, batch) -> None:
    gen = bench_generation(module, batch, args.action_tokens, args.repeats)
    (t_ours, n_ours), (t_bare, n_bare) = gen["ours"], gen["bare"]
    print(f"generation of {len(batch)} x {args.action_tokens} tokens: ours {t_ours:.2f} s ({n_ours / t_ours:.1f} "
              f"tok/s), bare generate {t_bare:.2f} s ({n_bare / t_bare:.1f} tok/s): {t_ours / t_bare:.2f}x "
              "(goal <= 1.0x)")


if __name__ == "__main__":
    main()
