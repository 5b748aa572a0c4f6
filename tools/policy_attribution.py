"""Which tokens of an update move the policy at the token where two answer classes part (soft_optimal.md, section 8).

The policy step (Eq. 7, docs/method.md section 6) is one loss summed over every action token of every row. At the
parting token of two tracked answers (e.g. ` from` against ` clf` at token 11 on balance_scale) the readout is

    f = log pi_theta(a | ctx) - log pi_theta(b | ctx)          (a: the better class's token, b: the other's)

This tool resumes a run from its last checkpoint (adapters, optimizers, answer memory, reward baseline, the
answer-class probe's exemplars), samples the next batch from its policy as the run would, and replays the update
(``ETPOModule.learn``: targets, trees, critic steps, policy steps). Inside each policy step, before the real one, it
splits the policy loss into the terms *at the parting node* (every row whose answer reaches it: the same context),
the terms where b is the token written *elsewhere* (the same token in other contexts), and *every other term*, and
reports each part's first-order effect on f of a plain gradient step, ``-grad f . grad L_part``
(they add up to the whole loss's), the trees' pi* and the policy's pi of a and b there, and f before and after the real
(Adam) steps. A positive part moves the policy towards a.

    python tools/policy_attribution.py runs/diag/b01_single/balance_scale/seed1    # a run directory with checkpoints
                                                                                   # (soft_optimal.md 8's reading)
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))
import etpo  # noqa: E402,F401  (before torch: idle OpenMP threads wait passively)

import torch  # noqa: E402

__all__ = ["node_mask", "load_run", "main"]


def node_mask(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, action_ids: torch.Tensor,
              action_mask: torch.Tensor, prompt: list[int], prefix: list[int]) -> torch.Tensor:
    """``[B, L]`` bool: True at position ``len(prefix)`` of every row written for ``prompt`` whose action starts with
    ``prefix`` and goes on past it -- the rows that pass the node ``(prompt, prefix)`` and choose a token there."""
    out = torch.zeros(action_ids.shape, dtype=torch.bool)
    j = len(prefix)
    for i in range(len(action_ids)):
        row_prompt = prompt_ids[i][prompt_mask[i].bool()].tolist()
        row = action_ids[i][action_mask[i].bool()].tolist()
        if row_prompt == list(prompt) and len(row) > j and row[:j] == list(prefix):
            out[i, j] = True
    return out


def load_run(run_dir: Path):
    """The ETPO module of a run directory as its last checkpoint left it, with the checkpoint, the config and the
    answer-class probe's state."""
    import yaml

    from modules.etpo import ETPOModule
    from modules.shared_base import BackboneConfig

    if not (run_dir / "config.yaml").is_file():
        raise SystemExit(f"{run_dir}: no config.yaml (a run directory of etpo.fit?)")
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    init = dict(cfg["model"]["init_args"])
    init["backbone"] = BackboneConfig.from_dict(init["backbone"])
    module = ETPOModule(**init)
    module.configure_model()
    ckpt_path = run_dir / "checkpoints" / "last.ckpt"
    if not ckpt_path.exists():
        raise SystemExit(f"{run_dir}: no checkpoints/last.ckpt (runs kept under docs/results hold none: give the run "
                         "directory etpo.fit wrote)")
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    missing, unexpected = module.load_state_dict(ckpt["state_dict"], strict=False)
    if unexpected or any("lora_" in k for k in missing):
        raise RuntimeError(f"{ckpt_path}: the checkpoint does not fit the config's module ({unexpected[:3]} ...)")
    module.on_load_checkpoint(ckpt)
    probe = next((v for k, v in ckpt.get("callbacks", {}).items() if k.startswith("AnswerClassProbe")), None)
    if probe is None:
        raise SystemExit(f"{ckpt_path}: no answer-class probe state (a run of etpo.fit with the probe on, the default)")
    return module, ckpt, cfg, probe


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--better", default="LogisticRegression", help="the class whose parting token is a")
    parser.add_argument("--other", default="RandomForestClassifier", help="the class whose parting token is b")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed of the replayed batch")
    args = parser.parse_args(argv)

    from datamodules.batch import GenerationConfig
    from datamodules.rollout import RolloutCollector
    from etpo.probe import parting_positions
    from tools.bench_tree_update import _Policy

    module, ckpt, cfg, probe = load_run(args.run_dir)
    missing = [c for c in (args.better, args.other) if c not in probe["exemplars"]]
    if missing:
        raise SystemExit(f"{args.run_dir}: the probe has no answer of {', '.join(missing)} at the task prompt; it has "
                         f"{', '.join(sorted(probe['exemplars']))}")
    better, other = probe["exemplars"][args.better]["tokens"], probe["exemplars"][args.other]["tokens"]
    pos = parting_positions(better, other)
    if pos is None:
        raise SystemExit(f"{args.better} and {args.other} never part (one is a prefix of the other)")
    prompt, prefix, a, b = probe["task_prompt"], better[:pos], better[pos], other[pos]
    tok = module.model.tokenizer
    print(f"node: token {pos} after {tok.decode(prefix)[-50:]!r}; a = {tok.decode([a])!r}, b = {tok.decode([b])!r}")

    m = module.model
    row_ids = torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.long)
    read_ids = torch.tensor([prefix + [a]]), torch.ones(1, pos + 1, dtype=torch.long)

    def readout(grad: bool):
        ctx = torch.enable_grad() if grad else torch.no_grad()
        with ctx:
            plan = m.plan(*row_ids, *read_ids)
            h, _ = m.plan_hidden("policy", plan)
            logp = torch.log_softmax(m.head(h[:, pos]).float(), -1)[0]
        return logp[a] - logp[b], logp[a].exp(), logp[b].exp()

    data = cfg["data"]
    torch.manual_seed(args.seed)
    collector = RolloutCollector(data["env"], num_envs=data["num_envs"], steps_per_update=1, budget=10 ** 6,
                                 seed=args.seed, generation=GenerationConfig(**data["generation"]))
    policy = _Policy(module)
    module.policy_version = policy.policy_version = int(ckpt["agent"]["policy_version"])
    batch = collector.collect(policy)
    collector.close()
    f0, pa, pb = readout(False)
    print(f"replayed batch: {len(batch)} rows; before the update f = {float(f0):+.3f} (pi a {float(pa):.3f}, "
          f"b {float(pb):.3f})")

    params = [p for n, p in module.named_parameters() if p.requires_grad and ".policy." in n]
    original = module.policy_loss
    steps = []

    def split_policy_loss(batch_, plan, t):
        # the terms the step takes: every action token, or (policy_nodes: choices) the trees' choices only
        taken = batch_.action_mask.bool()
        if t.policy_mask is not None:
            taken = taken & t.policy_mask.bool()
        at_node = node_mask(batch_.prompt_ids.cpu(), batch_.prompt_mask.cpu(), batch_.action_ids.cpu(),
                            batch_.action_mask.cpu(), prompt, prefix).to(taken.device) & taken
        n_all = float(taken.sum())
        g_f = torch.autograd.grad(readout(True)[0], params, allow_unused=True)
        parts = {}
        rest = taken & ~at_node
        writes_b = rest & (batch_.action_ids == b)  # the other class's token written elsewhere (token identity)
        for name, keep in (("at the node", at_node), (f"{tok.decode([b])!r} elsewhere", writes_b),
                           ("every other token", rest & ~writes_b)):
            n_part = float(keep.sum())
            if n_part == 0:
                parts[name] = (0, 0.0)
                continue
            masked = dataclasses.replace(batch_, action_mask=keep.long())
            loss, _ = original(masked, plan, dataclasses.replace(t, policy_mask=None))
            g = torch.autograd.grad(loss * (n_part / n_all), params, allow_unused=True)
            effect = -sum(float((gf * gp).sum()) for gf, gp in zip(g_f, g) if gf is not None and gp is not None)
            parts[name] = (int(n_part), effect)
        tree = module.tree_readings(prompt, prefix + [a]), module.tree_readings(prompt, prefix + [b])
        beta = module.hparams.beta
        with torch.no_grad():
            plan_r = m.plan(*row_ids, *read_ids)
            log_ref = torch.log_softmax(m.head(m.plan_hidden("reference", plan_r)[0][:, pos]).float(), -1)[0]
        star = {}
        for name, token, read in (("a", a, tree[0]), ("b", b, tree[1])):
            if read is not None and read[pos] is not None:
                q, v = read[pos]
                star[name] = float(torch.exp(log_ref[token] + (q - v) / beta))
        steps.append((parts, star))
        return original(batch_, plan, t)

    module.policy_loss = split_policy_loss
    with module.without_trainer() as mod:
        for opt, state in zip(mod._standalone["optimizers"], ckpt["optimizer_states"]):
            opt.load_state_dict(state)
        mod.learn(batch)
    f1, pa1, pb1 = readout(False)
    for k, (parts, star) in enumerate(steps, start=1):
        print(f"policy step {k}: the trees' pi* a {star.get('a', float('nan')):.3f}, b {star.get('b', float('nan')):.3f}")
        total = sum(e for _, e in parts.values())
        for name, (n, effect) in parts.items():
            print(f"  {name:<20} {n:5d} terms: d f / d lr = {effect:+.4g}")
        print(f"  {'the whole loss':<20}       : d f / d lr = {total:+.4g}")
    print(f"after the update (Adam, as the run steps): f = {float(f1):+.3f} (pi a {float(pa1):.3f}, b {float(pb1):.3f});"
          f" change {float(f1 - f0):+.3f}")


if __name__ == "__main__":
    main()
