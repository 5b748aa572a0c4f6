"""What the answer trees cost: one ETPO update in the paper's form against one with the trees, on real batches.

    python tools/bench_tree_update.py                  # SmolLM2-135M, balance_scale, the quickstart's settings
    python tools/bench_tree_update.py --repeats 5 --dataset tic_tac_toe

Two real rollout batches of the quickstart's setting are sampled once (the untrained policy, seeded), each the first
batch of fresh episodes (two collectors, seeds k and k + 1): all 16 rows answer the task prompt. Then, in one process
and alternately (these machines are noisy; medians are reported), from the same adapter weights each time: the
update learns batch 1 (untimed: it fills the answer memory and moves the weights as a run's first update does), then
batch 2 is timed -- as batch 6 of a run, where new episodes start at the task prompt and the trees recall the answers
stored for it --

* **paper**: ``target_backup: policy``, ``policy_target: critic``, no answer memory (Eq. 6 / TD(1), Eq. 7);
* **trees**: the answer trees of docs/method.md section 4a as the quickstart runs them (``optimal_tree`` backup and
  policy target, the zero prior, the forward policy step, an answer memory of ``--memory`` answers per prompt; the
  quickstart adds ``chunk_positions: 512``, the third form below) -- the extra work is the tree itself (Python over
  token ids) and the stored answers' rows, which join the batch for every view's forward and both steps.

Everything else is ``configs/quickstart.yaml``'s; each form's ``chunk_positions`` is set by the form.

With ``--chunk_positions N`` a third form is timed: the trees with ``chunk_positions: N`` (at most N (row, token)
positions per chunk of vocabulary-sized work, so the stored answers' rows do not widen the ``[rows, chunk, V]``
tensors; exact, tests/test_etpo_module.py).

It prints the medians, their ratios to the paper's, the peak resident memory of each form's timed update (Linux:
the process's high-water mark, reset before the update; the model and the batches are already resident, so it is
the whole process's peak as a run would see it) and the stored answers the timed update used.

    python tools/bench_tree_update.py --chunk_positions 512       # the quickstart's 8 rows x 64 tokens
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# the forms differ only in these; beta and the rest are the quickstart's (beta does not change the work done)
PAPER = dict(target_backup="policy", policy_target="critic", answer_memory=0, unwritten_value="node",
             policy_divergence="reverse")
TREES = dict(target_backup="optimal_tree", policy_target="optimal_tree", unwritten_value="zero",
             policy_divergence="forward")


def _quickstart(dataset: str):
    """The quickstart's ETPO arguments, backbone and data settings (read from its YAML, so the benchmark follows it)."""
    from omegaconf import OmegaConf

    from etpo.config_paths import resolve_config_path
    from modules.shared_base import BackboneConfig

    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "quickstart.yaml"))
    init = dict(cfg["model"]["init_args"])
    backbone = OmegaConf.to_container(OmegaConf.load(resolve_config_path(init.pop("backbone"), REPO / "configs")))
    init["backbone"] = BackboneConfig(**backbone)
    data = cfg["data"]
    data["env"]["init_args"]["dataset"] = dataset
    return init, data


class _Policy:
    def __init__(self, module):
        self.module, self.policy_version = module, 0

    def act(self, prompts, generation):
        return self.module.act(prompts, generation)

    def encode_prompts(self, prompts):
        return self.module.encode_prompts(prompts)


def _reset_peak() -> bool:
    """Reset this process's resident-memory high-water mark (Linux); False where that cannot be done."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak_gb() -> float:
    """The resident-memory high-water mark since the last reset, GB (Linux ``VmHWM``); NaN where unknown."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return float("nan")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="balance_scale")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory", type=int, default=8, help="answers kept per prompt in the trees' form")
    parser.add_argument("--chunk_positions", type=int, default=None,
                        help="also time the trees with this chunk_positions (e.g. 512 = 8 rows x 64 tokens)")
    args = parser.parse_args(argv)
    if args.chunk_positions is not None and args.chunk_positions < 1:
        raise SystemExit(f"bench_tree_update: --chunk_positions must be >= 1, got {args.chunk_positions}")

    from datamodules.batch import GenerationConfig
    from datamodules.rollout import RolloutCollector
    from modules.etpo import ETPOModule
    from modules.replay import AnswerMemory

    init, data = _quickstart(args.dataset)
    trees = {**TREES, "answer_memory": args.memory}
    torch.manual_seed(args.seed)
    module = ETPOModule(**{**init, **PAPER})
    module.configure_model()
    module.model.train()
    start = copy.deepcopy({k: v.detach().clone() for k, v in module.state_dict().items()})
    print(f"sampling two first batches of {data['num_envs']} on {args.dataset} ...", flush=True)
    batches = []
    for seed in (args.seed, args.seed + 1):
        collector = RolloutCollector(data["env"], num_envs=data["num_envs"], steps_per_update=1, budget=10 ** 6,
                                     seed=seed, generation=GenerationConfig(**data["generation"]))
        batches.append(collector.collect(_Policy(module)))
        collector.close()

    forms = [("paper", PAPER, None), ("trees", trees, None)]
    if args.chunk_positions is not None:
        forms.append((f"trees, chunk_positions {args.chunk_positions}", trees, args.chunk_positions))
    times: dict[str, list[float]] = {name: [] for name, _, _ in forms}
    peaks: dict[str, list[float]] = {name: [] for name, _, _ in forms}
    measured = _reset_peak()
    recalled = 0
    for r in range(args.repeats):
        for name, form, chunk_positions in forms:
            module.load_state_dict(start)
            module.hparams.update(form)
            module.hparams.chunk_positions = chunk_positions
            module.memory = AnswerMemory(form["answer_memory"])
            module.reward_sum, module.reward_count = 0.0, 0
            with module.without_trainer():
                module.policy_version = 0
                module.learn(batches[0])
                _reset_peak()
                t0 = time.perf_counter()
                charts = module.learn(batches[1])
                times[name].append(time.perf_counter() - t0)
                peaks[name].append(_peak_gb())
            recalled = int(charts.get("charts/remembered_answers", 0)) if name != "paper" else recalled
            print(f"  repeat {r + 1}: {name} {times[name][-1]:.1f} s, peak RSS {peaks[name][-1]:.2f} GB", flush=True)
    paper = statistics.median(times["paper"])
    print(f"update of batch 2 ({args.dataset}, median of {args.repeats}; peak resident memory of the process "
          f"during the update{'' if measured else ': not measurable here'}):")
    for name, _, _ in forms:
        t = statistics.median(times[name])
        print(f"  {name:<32} {t:6.1f} s = {t / paper:.2f}x the paper's   peak {max(peaks[name]):.2f} GB")
    print(f"the trees' update used {recalled} stored answers")


if __name__ == "__main__":
    main()
