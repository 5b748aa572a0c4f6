"""Benchmark of the model layer: generation overhead and resident weight memory of the four views.

    python tools/bench_shared_base.py            # the offline SmolLM2-135M (GGUF), CPU
    python tools/bench_shared_base.py --tiny     # a tiny random Llama (seconds)

Prints, for a batch of --batch prompts and --new-tokens sampled tokens (temperature 0.5, top-k 50, the paper's
settings):

* generation time through ``SharedBaseLM.generate`` (tokenisation, policy view, masks, decoding included) vs.
  ``model.generate`` called directly on the same peft model with the policy adapter active and the same
  pre-tokenised batch and seed (goal <= 1.1x; the two must produce identical tokens, which is checked);
* for information, the same bare call on the plain base model before any adapter was attached (the cost of the
  LoRA matmuls themselves, not of this layer);
* resident bytes of parameters + buffers (each storage counted once) with all four views vs. the base alone
  (goal <= 1.05x).

Each timing is the median of --repeats runs, interleaved so that background load affects both sides alike.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PROMPTS = [
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "import numpy as np\n\ndef normalise(x: np.ndarray) -> np.ndarray:\n",
    "# Train a logistic regression on the iris data set\nfrom sklearn.datasets import load_iris\n",
    "class Stack:\n    def __init__(self):\n",
    "def build_model(x_train, y_train):\n    \"\"\"Return a fitted scikit-learn classifier.\"\"\"\n",
    "Write a Python function that reverses a string.\n",
    "import pandas as pd\ndf = pd.read_csv('data.csv')\n# drop rows with missing values\n",
    "def is_prime(k: int) -> bool:\n",
]


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random Llama instead of the offline SmolLM2")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (0 = torch's default); 1 by default because on a shared 2-core machine "
                             "OpenMP threads waiting for each other make timings 10x slower and erratic")
    args = parser.parse_args(argv)

    import torch
    from transformers import GenerationConfig

    from modules.shared_base.loading import BackboneConfig, load_backbone
    from modules.shared_base import SharedBaseLM, resident_weight_bytes

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = BackboneConfig(source="tiny", tiny_init_std=0.2, device="cpu") if args.tiny else BackboneConfig()
    t0 = time.perf_counter()
    base, tokenizer = load_backbone(cfg)
    load_s = time.perf_counter() - t0
    base_bytes = resident_weight_bytes(base)
    base_params = sum(p.numel() for p in base.parameters())

    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch)]
    enc = tokenizer(prompts, padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"].to(base.device), enc["attention_mask"].to(base.device)
    gen_cfg = GenerationConfig(max_new_tokens=args.new_tokens, do_sample=True, temperature=0.5, top_k=50, top_p=1.0,
                               repetition_penalty=1.0, num_beams=1, pad_token_id=tokenizer.pad_token_id,
                               eos_token_id=[tokenizer.eos_token_id], use_cache=True)

    results = {}

    def bare(model, key=None, config=gen_cfg):
        torch.manual_seed(0)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        if key:
            results[key] = out
        return out

    warm = GenerationConfig(**{**gen_cfg.to_dict(), "max_new_tokens": 4})
    bare(base, config=warm)  # warm-up (allocator, kernels)
    plain_s = statistics.median(_time(lambda: bare(base, "plain")) for _ in range(args.repeats))

    model = SharedBaseLM(cfg, model=base, tokenizer=tokenizer)
    all_bytes = resident_weight_bytes(model)
    adapter_params = sum(p.numel() for p in model.policy_parameters())

    def layer():
        torch.manual_seed(0)
        results["layer"] = model.generate(prompts, max_new_tokens=args.new_tokens, temperature=0.5, top_k=50,
                                          top_p=1.0)

    def bare_peft():
        model._activate("policy")  # the adapter the layer activates; the bare call is given it for free
        bare(model.peft_model, "bare")

    model.generate(prompts[:1], max_new_tokens=4)  # warm-up
    layer_times, bare_times = [], []
    for _ in range(args.repeats):
        layer_times.append(_time(layer))
        bare_times.append(_time(bare_peft))
    layer_s, bare_s = statistics.median(layer_times), statistics.median(bare_times)

    g, out = results["layer"], results["bare"]
    p = ids.shape[1]
    valid = g.action_mask.bool()
    same = torch.equal(g.action_ids[valid], out[:, p:].cpu()[:, : g.action_ids.shape[1]][valid])
    # LoRA B is zero at init, so the adapted model samples exactly what the plain base sampled.
    same_as_plain = torch.equal(out, results["plain"])
    tokens = int(g.action_mask.sum())

    name = "tiny random Llama" if args.tiny else "SmolLM2-135M-Instruct (GGUF, de-quantized)"
    print(f"model: {name}; {base_params / 1e6:.1f}M parameters, {base.dtype}, device {base.device}, "
          f"torch threads {torch.get_num_threads()}, load {load_s:.1f} s")
    print(f"generation: batch {args.batch} x max {args.new_tokens} new tokens (temperature 0.5, top-k 50); "
          f"{tokens} tokens generated; median of {args.repeats}")
    print(f"  SharedBaseLM.generate (policy view)       {layer_s:8.3f} s")
    print(f"  bare peft_model.generate (same model)     {bare_s:8.3f} s")
    print(f"  bare base.generate (no adapters attached) {plain_s:8.3f} s")
    print(f"  ratio layer / bare, same model            {layer_s / bare_s:8.3f}x   (goal <= 1.1x)")
    print(f"  ratio layer / plain base                  {layer_s / plain_s:8.3f}x   (includes the LoRA matmuls)")
    print(f"  identical tokens layer vs bare: {same}; adapted vs plain base: {same_as_plain}")
    print("resident weights (parameters + buffers, each storage once):")
    print(f"  base alone                                {base_bytes / 2**20:10.2f} MiB")
    print(f"  four views (base + policy/critic/target)  {all_bytes / 2**20:10.2f} MiB "
          f"({adapter_params / 1e6:.2f}M parameters per adapter, r={cfg.lora_r})")
    print(f"  ratio                                     {all_bytes / base_bytes:8.3f}x   (goal <= 1.05x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
