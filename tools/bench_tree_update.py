"""What the answer trees cost: one ETPO update in the paper's form against one with the trees, on real batches.

    python tools/bench_tree_update.py                  # SmolLM2-135M, balance_scale, the quickstart's settings
    python tools/bench_tree_update.py --repeats 5 --dataset tic_tac_toe

Two real rollout batches of the quickstart's setting are sampled once (the untrained policy, seeded). Then, in one
process and alternately (these machines are noisy; medians are reported), from the same adapter weights each time:
the update learns batch 1 (untimed: it fills the answer memory and moves the weights as a run's first update does),
then batch 2 is timed --

* **paper**: ``target_backup: policy``, ``policy_target: critic``, no answer memory (Eq. 6 / TD(1), Eq. 7);
* **trees**: the answer trees of docs/method.md section 4a (``optimal_tree`` backup and policy target, the zero
  prior, an answer memory of ``--memory`` answers per prompt) -- the extra work is the tree itself (Python over token
  ids) and the stored answers' rows, which join the batch for every view's forward and both steps.

Everything else is ``configs/quickstart.yaml``'s.

It prints both medians and their ratio, and the stored answers the timed update used.
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

PAPER = dict(target_backup="policy", policy_target="critic", answer_memory=0, unwritten_value="node")
TREES = dict(target_backup="optimal_tree", policy_target="optimal_tree", unwritten_value="zero")


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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="balance_scale")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory", type=int, default=8, help="answers kept per prompt in the trees' form")
    args = parser.parse_args(argv)

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
    collector = RolloutCollector(data["env"], num_envs=data["num_envs"], steps_per_update=1, budget=10 ** 6,
                                 seed=args.seed, generation=GenerationConfig(**data["generation"]))
    print(f"sampling two batches of {data['num_envs']} on {args.dataset} ...", flush=True)
    batches = [collector.collect(_Policy(module)) for _ in range(2)]
    collector.close()

    times: dict[str, list[float]] = {"paper": [], "trees": []}
    recalled = 0
    for r in range(args.repeats):
        for name, form in (("paper", PAPER), ("trees", trees)):
            module.load_state_dict(start)
            module.hparams.update(form)
            module.memory = AnswerMemory(form["answer_memory"])
            module.reward_sum, module.reward_count = 0.0, 0
            with module.without_trainer():
                module.policy_version = 0
                module.learn(batches[0])
                t0 = time.perf_counter()
                charts = module.learn(batches[1])
                times[name].append(time.perf_counter() - t0)
            recalled = int(charts.get("charts/remembered_answers", 0)) if name == "trees" else recalled
            print(f"  repeat {r + 1}: {name} {times[name][-1]:.1f} s", flush=True)
    paper, tree = statistics.median(times["paper"]), statistics.median(times["trees"])
    print(f"update of batch 2 ({args.dataset}, median of {args.repeats}): paper {paper:.1f} s, trees {tree:.1f} s "
          f"= {tree / paper:.2f}x; the trees' update used {recalled} stored answers")


if __name__ == "__main__":
    main()
