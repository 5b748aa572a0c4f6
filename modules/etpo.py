"""ETPO as a LightningModule: per-token soft Bellman updates of a soft Q-network (Eq. 6) and per-token KL policy
updates towards ``pi_bar * exp(Q / beta)`` (Eq. 7), on one shared frozen base LLM (docs/method.md).

The algorithm, top to bottom, in :meth:`ETPOModule.learn` (one fresh on-policy rollout batch; Algorithm 1):

1. **targets** (no gradient): one forward each of the *reference*, *target* and *policy* views; per token the exact
   soft value ``V(ctx) = sum_w pi (Qbar - beta log(pi / pi_bar))``, the target's Q of the taken token and -- for
   TD(lambda) with a sampling temperature -- the trace ``min(1, pi / mu)``; the values of the next states; then
   the targets ``y`` (Eq. 6, or their TD(lambda) form; the rewards less ``reward_baseline`` when it is on);
2. **critic step** (``critic_steps`` times; ``critic_warmup_steps`` in the first ``critic_warmup`` batches): the
   *critic* view's Q of the taken tokens regressed on ``y`` -- with ``replay_rows`` past transitions besides the
   fresh ones when the critic replay is on (:mod:`modules.replay`: their targets recomputed now, Retrace-cut traces);
   one AdamW step of the critic adapter;
3. **policy step**, against the *updated* critic: ``KL(pi_theta || pi_bar exp(Q / beta) / Z)`` over the whole
   vocabulary at every action token of the fresh batch, Q and the reference fixed; one AdamW step of the policy
   adapter (skipped during the first ``critic_warmup`` batches when ``warmup_freezes_policy``);
4. **target update**: ``phibar <- polyak * phibar + (1 - polyak) * phi``; the fresh transitions join the replay.

Memory engineering stays out of the way of the algorithm: the model layer lays the batch out once
(:meth:`~modules.shared_base.SharedBaseLM.plan`: shared prompt prefixes computed once), vocabulary-sized tensors
exist one chunk of tokens at a time, and the policy loss's gradient reaches the transformer through the hidden
states of its chunks (``sum(h * dL/dh)``: the exact gradient, one backward).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch
from lightning.pytorch.cli import LRSchedulerCallable

from datamodules.batch import RolloutBatch
from modules.agent import AgentModule, TokenCredit
from modules.replay import AnswerMemory, TransitionReplay, stored_batch, stored_transitions
from modules.losses.etpo import (
    Q_PARAMETERISATIONS,
    behaviour_log_probs,
    entropy,
    optimal_policy_logits,
    optimal_value,
    policy_loss,
    q_from_critic,
    soft_q_regression,
    soft_value,
    trace_coefficients,
    trace_targets,
    branch_q,
    tree_backup,
)
from modules.shared_base import BackboneConfig, adapter_parameters
from modules.shared_base.fsdp import polyak_update_sharded
from modules.shared_base.scoring import ScoringPlan, token_chunks

__all__ = ["ETPOModule", "TARGET_BACKUPS", "POLICY_TARGETS"]

#: what a token inside an action is worth in the critic's targets (docs/method.md, sections 3, 4 and 4a)
TARGET_BACKUPS = ("policy", "optimal_tree")
#: what the policy step moves towards (docs/method.md, sections 4a and 6)
POLICY_TARGETS = ("critic", "optimal_tree")


@dataclass
class _Targets:
    """What step 1 hands to the critic and policy steps (all ``[B, L]`` except ``ref_hidden``)."""

    targets: torch.Tensor
    ref_taken: torch.Tensor  # reference logit of the taken token (the `zero` Q form subtracts it)
    ref_hidden: torch.Tensor  # [B, L, H] reference hidden states: the policy step's pi_bar, not recomputed
    values: torch.Tensor
    target_q_taken: torch.Tensor
    traces: torch.Tensor
    charts: dict
    behaviour_log_probs: Optional[torch.Tensor] = None  # log mu of the taken tokens (kept for the replay)
    log_ref_taken: Optional[torch.Tensor] = None  # log pi_bar of the taken token (the tree backup's weights)
    leaf_values: Optional[torch.Tensor] = None  # [B] r - b + gamma (1 - done) V(s'): finishing the action
    # policy_target optimal_tree: (mask [B, L], node value [B, L], written (row, position, token) [K, 3], their Q [K])
    branches: Optional[tuple] = None
    # policy_nodes choices: the [B, L] positions the policy step is taken at (None: every action token)
    policy_mask: Optional[torch.Tensor] = None


class ETPOModule(AgentModule):
    """Entropy-regularised token-level policy optimisation.

    Args:
        backbone: the shared base model (policy and critic LoRA adapters, Polyak target, reference = no adapter).
        beta: KL coefficient (entropy regularisation strength); the paper's is 0.01.
        gamma: discount between environment steps (never inside an action unless ``discount_within_action``).
        q_parameterisation: ``logits`` (the paper: Q = critic logits) or ``zero`` (Q = critic - reference logits:
            Q and V start at 0, on the reward's scale, and the optimal soft policy starts at the reference).
        td_lambda: token-level soft TD(lambda) (Retrace form): 0 is Eq. 6 exactly; towards 1 the reward reaches
            every token of an action in one update instead of one token per target refresh.
        target_backup: what a token inside an action is worth. ``policy`` (the paper, Eq. 6 and its TD(lambda)
            form): the current policy's soft value of what follows. ``optimal_tree`` (beyond the paper): the soft
            Bellman optimality backup over the prefix tree of the answers written for the same prompt -- in the batch
            and, with ``answer_memory``, before it (docs/method.md, section 4a): a prefix is worth its best known
            continuation. ``td_lambda`` and ``trace_correction`` then play no part.
        policy_target: what the policy step moves towards. ``critic`` (the paper, Eq. 7): pi* = pi_bar exp(Q / beta) / Z
            of the critic's Q at every token. ``optimal_tree`` (beyond the paper): where the answers written for the
            same prompt part (a branch of their prefix tree), Q of the tree's soft-optimal backup instead -- the
            written continuations by their values, every other token at the node value, so pi* moves mass only
            between the written continuations -- and the critic's Q elsewhere (docs/method.md, section 4a).
        answer_memory: with ``target_backup: optimal_tree``, the best distinct answers kept per prompt (0: the
            batch's own answers only). The stored answers for a batch's prompts join the batch for the whole update:
            its trees, the critic's regression (the optimality backup is off-policy) and the policy step (a
            per-context KL projection holds at any context).
        unwritten_value: in the answer trees, what a token never written at a context is worth: ``node`` (the
            node's own value: only the written continuations are compared) or ``zero`` (the ``zero`` Q form's prior,
            an average outcome under a reward baseline: a written continuation below it loses mass to the others,
            one above it gains; with ``policy_target: optimal_tree`` every token of every answer is then a choice).
        policy_nodes: where the policy step (Eq. 7) is taken. ``all`` (the paper): at every action token. ``choices``
            (beyond the paper; with ``policy_target: optimal_tree``): only at the trees' nodes that say something
            about a choice -- two or more written continuations, or one that is worth less than a token never
            written there (a way out of a failure) -- and not where one written continuation beats the unwritten
            ones, which at a small beta is a supervised step towards that answer that outweighs, in the shared
            adapter, the tokens where the answers part (docs/method.md, section 4a; soft_optimal.md, section 8).
        policy_divergence: ``reverse`` (the paper's Eq. 7): KL(pi_theta || pi*). ``forward`` (beyond the paper):
            KL(pi* || pi_theta), the same minimiser with the bounded logit gradient ``pi_theta - pi*``; the reverse
            KL's gradient is dominated by the mass pi_theta leaves where pi* is ~0 (log-ratios of Q / beta)
            (docs/method.md, section 6).
        trace_correction: with ``td_lambda > 0``, cut the traces by ``min(1, pi / mu)`` where ``mu`` is the sampling
            distribution (temperature, top-k, top-p), so the fixed point stays the soft Q of pi.
        discount_within_action: the ETPO(Disc.) ablation (Appendix G): within-action targets times gamma.
        huber_delta: Huber loss for the critic instead of the squared error.
        policy_lr, critic_lr, weight_decay: AdamW settings of the two optimizers.
        policy_max_grad_norm, critic_max_grad_norm: per-optimizer gradient-norm clip (the paper: 10).
        policy_lr_scheduler, critic_lr_scheduler: optional schedulers (``class_path`` + ``init_args`` in YAML),
            stepped after every step of their optimizer.
        polyak: target update ``phibar <- polyak phibar + (1 - polyak) phi`` after every batch (the paper: 0.995).
        critic_steps: critic optimizer steps per batch (the targets are computed once per batch).
        policy_steps: policy optimizer steps per batch towards pi* of the updated critic (the paper: 1).
        critic_warmup: batches at the start that are the critic's warm-up.
        critic_warmup_steps: critic steps per batch during the warm-up (None: ``critic_steps``).
        warmup_freezes_policy: no policy step during the warm-up (True); False: the policy learns from the first
            batch on and the warm-up only adds critic steps.
        replay_capacity: past transitions kept for the critic (0: no replay, the paper's on-policy update).
        replay_rows: past transitions added to every critic step (:mod:`modules.replay`; the policy never sees them).
        reward_baseline: ``null`` (the paper): the critic regresses on the rewards as they are. A number ``b`` or
            ``running`` (``b`` = the mean reward of every transition so far, this batch's included): on ``r - b``
            (docs/method.md, section 7b). Episodes of a fixed number of steps leave the optimal policy unchanged
            under the shift; what it changes is where an untried token stands -- with ``zero`` Q, at the average
            reward instead of at 0. Episodes of different lengths are refused (the shift would change the task).
        reference_rows: of every generation batch's rows (one per environment), the last ``reference_rows`` are
            sampled from the reference model instead of the policy (beyond the paper; 0, the paper's, samples every
            row from the policy): those environments are explored as the untrained model explores them (Reflection's
            episodes), the others by the policy, and the update learns from both. Off-policy learning makes this
            sound -- the soft Bellman targets of ``target_backup: optimal_tree`` or of Eq. 6 (``td_lambda: 0``) hold
            whatever sampled the action, and the policy step is a projection at each context -- so it is refused with
            targets that follow the sampling policy (TD(lambda) > 0 under ``target_backup: policy``) and with the
            critic replay (docs/method.md, section 7c).
        relabel_actions: where the environment allows it (``actions_relabel_to_first_state``: an action earns the
            same and leads to the same state wherever it is taken, as in the data-science env), every later-step
            transition of a batch also joins the update as a transition from its episode's first state (beyond the
            paper; False, the paper's, learns each action where it was taken only): an answer found at an "improve
            on it" state enters the task prompt's answer tree, where the classes part, and the answer memory under
            that prompt. Sound for the same reason as ``reference_rows`` (the targets of ``target_backup:
            optimal_tree`` or of Eq. 6 hold whatever wrote the action; the policy step is a per-context
            projection), and refused where they do not (docs/method.md, section 4b).
        train_policy: set False to freeze the policy for good (an ablation; the learning test uses it as a control).
        token_chunk_size: action tokens per chunk when evaluating vocabulary-sized tensors.
        chunk_positions: at most this many (row, token) positions per chunk of vocabulary-sized work: the chunk is
            ``min(token_chunk_size, chunk_positions // rows)`` tokens wide, so that a batch with more rows -- the
            answer memory's remembered answers join the fresh ones -- holds no larger ``[rows, chunk, V]`` tensors
            than a fresh batch (None: ``token_chunk_size`` whatever the rows). Exact either way: the sums are the
            same, chunk by chunk.
    """

    contender = "etpo"

    def __init__(
        self,
        backbone: BackboneConfig | None = None,
        beta: float = 0.01,
        gamma: float = 0.99,
        q_parameterisation: str = "logits",
        td_lambda: float = 0.0,
        trace_correction: bool = True,
        target_backup: str = "policy",
        policy_target: str = "critic",
        answer_memory: int = 0,
        unwritten_value: str = "node",
        policy_nodes: str = "all",
        policy_divergence: str = "reverse",
        discount_within_action: bool = False,
        huber_delta: float | None = None,
        policy_lr: float = 1e-4,
        critic_lr: float = 1e-4,
        weight_decay: float = 0.0,
        policy_max_grad_norm: float = 10.0,
        critic_max_grad_norm: float = 10.0,
        policy_lr_scheduler: Optional[LRSchedulerCallable] = None,
        critic_lr_scheduler: Optional[LRSchedulerCallable] = None,
        polyak: float = 0.995,
        critic_steps: int = 1,
        policy_steps: int = 1,
        critic_warmup: int = 0,
        critic_warmup_steps: int | None = None,
        warmup_freezes_policy: bool = True,
        replay_capacity: int = 0,
        replay_rows: int = 0,
        reward_baseline: float | str | None = None,
        reference_rows: int = 0,
        relabel_actions: bool = False,
        train_policy: bool = True,
        token_chunk_size: int = 64,
        chunk_positions: int | None = None,
    ):
        super().__init__(backbone)
        if q_parameterisation not in Q_PARAMETERISATIONS:
            raise ValueError(f"q_parameterisation must be one of {Q_PARAMETERISATIONS}, got {q_parameterisation!r}")
        if not 0.0 <= polyak <= 1.0:
            raise ValueError(f"polyak must be in [0, 1], got {polyak}")
        if not 0.0 <= td_lambda <= 1.0:
            raise ValueError(f"td_lambda must be in [0, 1], got {td_lambda}")
        if critic_steps < 1 or policy_steps < 1 or critic_warmup < 0 or token_chunk_size < 1:
            raise ValueError("critic_steps, policy_steps and token_chunk_size must be >= 1 and critic_warmup >= 0")
        if chunk_positions is not None and chunk_positions < 1:
            raise ValueError(f"chunk_positions must be >= 1 (or null), got {chunk_positions}")
        if target_backup not in TARGET_BACKUPS:
            raise ValueError(f"target_backup must be one of {TARGET_BACKUPS}, got {target_backup!r}")
        if policy_target not in POLICY_TARGETS:
            raise ValueError(f"policy_target must be one of {POLICY_TARGETS}, got {policy_target!r}")
        if unwritten_value not in ("node", "zero"):
            raise ValueError(f"unwritten_value must be 'node' or 'zero', got {unwritten_value!r}")
        if policy_divergence not in ("reverse", "forward"):
            raise ValueError(f"policy_divergence must be 'reverse' (Eq. 7) or 'forward', got {policy_divergence!r}")
        if policy_nodes not in ("all", "choices") or (policy_nodes == "choices" and policy_target != "optimal_tree"):
            raise ValueError("policy_nodes is 'all' (Eq. 7 at every action token) or 'choices' (only where the answer "
                             "trees hold a choice; needs policy_target: optimal_tree), got "
                             f"{policy_nodes!r} with policy_target {policy_target!r}")
        if answer_memory < 0 or (answer_memory and target_backup != "optimal_tree"):
            raise ValueError("answer_memory (>= 0) brings past answers back for the optimality backup: set "
                             f"target_backup: optimal_tree, or answer_memory: 0 (got {answer_memory})")
        if target_backup == "optimal_tree" and replay_capacity:
            raise ValueError("the optimal_tree backup brings past answers back through answer_memory; set "
                             "replay_capacity: 0 and replay_rows: 0 (critic replay follows the policy backup)")
        if target_backup == "optimal_tree" and discount_within_action:
            raise ValueError("discount_within_action (ETPO(Disc.)) discounts Eq. 6's targets inside an action; the "
                             "optimal_tree backup values a prefix by its best written continuation and has no such "
                             "discount: set target_backup: policy and policy_target: critic (on the CPU setting: "
                             "--config configs/contenders/etpo_v2.yaml before etpo_disc.yaml)")
        if critic_warmup_steps is not None and critic_warmup_steps < 1:
            raise ValueError(f"critic_warmup_steps must be >= 1 (or null), got {critic_warmup_steps}")
        if replay_capacity < 0 or replay_rows < 0 or (replay_rows > 0) != (replay_capacity > 0):
            raise ValueError("replay_capacity and replay_rows must both be > 0 (critic replay) or both 0, got "
                             f"{replay_capacity} and {replay_rows}")
        if isinstance(reward_baseline, str) and reward_baseline != "running":
            raise ValueError(f"reward_baseline must be null, a number or 'running', got {reward_baseline!r}")
        if reference_rows < 0:
            raise ValueError(f"reference_rows must be >= 0, got {reference_rows}")
        on_policy_targets = (target_backup == "policy" and td_lambda > 0) or replay_capacity
        if reference_rows and on_policy_targets:
            raise ValueError(
                f"reference_rows: {reference_rows} samples rows from the reference, so the critic's targets must hold "
                "whatever sampled the action: use target_backup: optimal_tree, or td_lambda: 0 (Eq. 6), and no critic "
                f"replay (got target_backup {target_backup!r}, td_lambda {td_lambda}, replay_capacity "
                f"{replay_capacity}); or set reference_rows: 0")
        if relabel_actions and on_policy_targets:
            raise ValueError(
                "relabel_actions learns actions at states where the policy did not take them, so the critic's targets "
                "must hold whatever wrote the action: use target_backup: optimal_tree, or td_lambda: 0 (Eq. 6), and no "
                f"critic replay (got target_backup {target_backup!r}, td_lambda {td_lambda}, replay_capacity "
                f"{replay_capacity}); or set relabel_actions: false")
        self.save_hyperparameters(ignore=["backbone", "policy_lr_scheduler", "critic_lr_scheduler"])
        # `running` baseline: sum and count of every transition's reward so far; the episode length seen (kept in
        # checkpoints)
        self.reward_sum, self.reward_count, self.episode_length = 0.0, 0, None
        self.replay = TransitionReplay(replay_capacity)
        self.memory = AnswerMemory(answer_memory)
        self.last_trees: Optional[dict] = None  # the last update's answer trees (node values), for the probe
        self.policy_lr_scheduler = policy_lr_scheduler
        self.critic_lr_scheduler = critic_lr_scheduler

    # ---- optimisation ------------------------------------------------------------------------------------------
    def configure_optimizers(self):
        # From the strategy's model, so that sharded (FSDP) parameters are the ones being stepped. Two optimizers:
        # the soft Bellman step and the policy step are separate steps (Algorithm 1), each with its own settings.
        hp = self.hparams
        wrapped = self.root_model()
        configs = []
        for name, lr, clip, scheduler in (("critic", hp.critic_lr, hp.critic_max_grad_norm, self.critic_lr_scheduler),
                                          ("policy", hp.policy_lr, hp.policy_max_grad_norm, self.policy_lr_scheduler)):
            params = [p for _, p in adapter_parameters(wrapped, name, trainable_only=True)]
            if not params:
                raise RuntimeError(f"no trainable parameters found for the {name} adapter")
            optimizer = torch.optim.AdamW([{"params": params, "name": name, "max_grad_norm": clip}], lr=lr,
                                          weight_decay=hp.weight_decay)
            config = {"optimizer": optimizer}
            if scheduler is not None:
                config["lr_scheduler"] = {"scheduler": scheduler(optimizer), "interval": "step"}
            configs.append(config)
        return configs

    @property
    def relabels_actions(self) -> bool:
        """Whether the rollout should hand over its later-step transitions moved to their episode's first state."""
        return bool(self.hparams.relabel_actions)

    def sampling_views(self, rows: int) -> str | list[str]:
        """``reference_rows``: the last ones of the environments' rows are sampled from the reference."""
        k = self.hparams.reference_rows
        if not k:
            return "policy"
        if k >= rows:
            raise ValueError(f"reference_rows: {k} leaves none of the {rows} rows of a generation batch to the "
                             f"policy; set it below the number of environments ({rows})")
        return ["policy"] * (rows - k) + ["reference"] * k

    def _reference_row_charts(self, batch: RolloutBatch) -> dict[str, float]:
        """What the policy's own rows wrote, apart from the reference's (``reference_rows``): their average reward
        and the mean reward of those that ran."""
        envs = int(batch.env_index.max()) + 1
        own = (batch.env_index < envs - self.hparams.reference_rows).cpu()
        rewards, ran = batch.rewards.cpu()[own], batch.runnable.cpu()[own]
        charts = {"charts/policy_rows_avg_reward": float(rewards.mean()),
                  "charts/policy_rows_runnable_fraction": float(ran.float().mean())}
        if bool(ran.any()):
            charts["charts/policy_rows_runnable_reward"] = float(rewards[ran].mean())
        return charts

    def chunk_width(self, rows: int) -> int:
        """Action tokens per chunk of vocabulary-sized work for a batch of ``rows`` rows (``chunk_positions``)."""
        hp = self.hparams
        if hp.chunk_positions is None:
            return hp.token_chunk_size
        return max(1, min(hp.token_chunk_size, hp.chunk_positions // max(rows, 1)))

    # ---- the update --------------------------------------------------------------------------------------------
    def _q(self, critic_logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
        return q_from_critic(critic_logits, ref_logits, self.hparams.q_parameterisation)

    def plan(self, batch: RolloutBatch, next_prompts: bool = True) -> ScoringPlan:
        """The batch laid out for every view's forward (shared prefixes once), with the next prompts -- whose values
        only the targets need -- or without them (the critic and policy steps: the same action states, fewer
        positions)."""
        if not next_prompts:
            return self.model.plan(batch.prompt_ids, batch.prompt_mask, batch.action_ids, batch.action_mask)
        return self.model.plan(batch.prompt_ids, batch.prompt_mask, batch.action_ids, batch.action_mask,
                               batch.next_prompt_ids, batch.next_prompt_mask)

    def learn(self, batch: RolloutBatch) -> Mapping[str, float]:
        hp = self.hparams
        optimizers = self.optimizers_by_name()
        self.update_reward_baseline(batch)
        fresh = batch
        relabelled = fresh.relabelled if hp.relabel_actions else None
        if relabelled is not None:  # later steps' actions, moved to their episode's first state (section 4b)
            batch = fresh.concat(relabelled)
        recalled = self.memory.recall(batch) if hp.answer_memory else []
        if recalled:  # the stored answers for the batch's prompts join it for the whole update (section 4a)
            batch = batch.concat(stored_batch(recalled, fresh))
        plan = self.plan(batch)
        # the gradient steps read action states only: next prompts (with reflection, hundreds of positions each that
        # share little) are left out of their forwards and backwards -- the same states, exactly
        train_plan = self.plan(batch, next_prompts=False) if batch.next_needed.numel() else plan
        replaying = len(self.replay) > 0
        targets = self.run_forward(self.compute_targets, batch, plan, None, hp.replay_capacity > 0)  # 1.
        replayed = self.run_forward(self.replayed_targets, batch) if replaying else None
        if "optimal_tree" in (hp.target_backup, hp.policy_target):  # the answer trees of the batch's prompts
            self.answer_trees(batch, targets)
            targets.charts["charts/remembered_answers"] = float(len(recalled))
        charts = dict(targets.charts)
        if hp.relabel_actions:
            charts["charts/relabelled_actions"] = float(len(relabelled) if relabelled is not None else 0)
        if hp.reference_rows:
            charts.update(self._reference_row_charts(fresh))
        warmup = self.policy_version < hp.critic_warmup
        steps = hp.critic_warmup_steps if warmup and hp.critic_warmup_steps is not None else hp.critic_steps
        for _ in range(steps):  # 2.
            charts.update(self.optimizer_step_on(optimizers["critic"], self.critic_loss, batch, train_plan, targets,
                                                 replayed))
        if hp.train_policy and not (warmup and hp.warmup_freezes_policy):  # 3.
            for _ in range(hp.policy_steps):
                charts.update(self.optimizer_step_on(optimizers["policy"], self.policy_loss, batch, train_plan,
                                                     targets))
        polyak_update_sharded(self.model, hp.polyak, self.root_model())  # 4.
        if hp.replay_capacity:
            self.replay.add_batch(fresh, targets.behaviour_log_probs, self.policy_version)
        if hp.answer_memory:
            self.memory.add(stored_transitions(fresh, None, self.policy_version))
            if relabelled is not None:
                self.memory.add(stored_transitions(relabelled, None, self.policy_version))
        return charts

    def update_reward_baseline(self, batch: RolloutBatch) -> None:
        """Count a fresh batch's rewards into the ``running`` baseline (summed over processes, so that every rank
        shifts by the same ``b``); refuse episodes of different lengths when a baseline is on."""
        if self.hparams.reward_baseline is None:
            return
        lengths = {int(n) for n in batch.episode_step[batch.dones.bool()]}
        lengths |= {self.episode_length} if self.episode_length is not None else set()
        device = batch.rewards.device
        # shortest and longest episode on any rank (MIN of [shortest, -longest]; none ended: +-inf): every rank then
        # sees the same lengths and raises together -- a rank raising alone would leave the others waiting below
        extremes = torch.tensor([min(lengths, default=math.inf), -max(lengths, default=-math.inf)],
                                dtype=torch.float64, device=device)
        totals = torch.tensor([float(batch.rewards.double().sum()), float(len(batch))], dtype=torch.float64,
                              device=device)
        # torch.distributed, not the Trainer's strategy: `without_trainer` runs (raw FSDP) have no strategy
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed:
            torch.distributed.all_reduce(extremes, op=torch.distributed.ReduceOp.MIN)
        shortest, longest = float(extremes[0]), -float(extremes[1])
        if shortest < longest:
            raise ValueError(
                "reward_baseline shifts every reward by the same b, which leaves the task unchanged only when every "
                f"episode has the same number of steps, but episodes ended after {int(shortest)} to {int(longest)} "
                "steps. Use an environment whose episodes all run to their step limit (the data-science env: "
                "stop_on_success: false) or set model.init_args.reward_baseline: null.")
        self.episode_length = int(shortest) if math.isfinite(shortest) else None  # the one length seen, if any
        if distributed:
            torch.distributed.all_reduce(totals)
        self.reward_sum += float(totals[0])
        self.reward_count += int(totals[1])

    @property
    def reward_shift(self) -> float:
        """``b``, subtracted from every reward in the critic's targets (0 without a baseline)."""
        b = self.hparams.reward_baseline
        if b is None:
            return 0.0
        if b == "running":
            return self.reward_sum / self.reward_count if self.reward_count else 0.0
        return float(b)

    def replayed_targets(self, batch: RolloutBatch) -> Optional[tuple]:
        """``replay_rows`` past transitions (drawn with a seed fixed by the batch count, so a resumed run draws the
        same) as ``(batch, plan, targets)`` for the critic step: targets recomputed now under the current policy and
        target network, traces cut to ``min(1, pi / mu)`` with each token's stored ``log mu`` (:mod:`modules.replay`)."""
        drawn = self.replay.sample(self.hparams.replay_rows, seed=self.policy_version, like=batch)
        if drawn is None:
            return None
        past, log_mu = drawn
        targets = self.compute_targets(past, self.plan(past), replayed=log_mu)
        return past, self.plan(past, next_prompts=False), targets

    @torch.no_grad()
    def answer_trees(self, batch: RolloutBatch, t: _Targets) -> None:
        """The answer trees (docs/method.md, section 4a): the batch's answers -- with the answer memory, the stored
        answers for its prompts among them -- form one prefix tree per prompt, valued by the soft-optimal backup
        (:func:`~modules.losses.etpo.tree_backup`; each answer's leaf its own Eq. 6 last-token target ``r - b + gamma
        (1 - done) V(s')``, computed now under the current policy and target network). With ``target_backup:
        optimal_tree`` every token's target becomes the value of its best known continuations (``t.targets``
        rewritten in place); with ``policy_target: optimal_tree`` the trees' Q go to ``t.branches`` for the policy
        step."""
        hp = self.hparams
        pm, am = batch.prompt_mask.cpu().bool(), batch.action_mask.cpu().bool()
        lengths = am.long().sum(1).tolist()
        log_ref = t.log_ref_taken.cpu().tolist()
        groups = [tuple(prompt[m].tolist()) for prompt, m in zip(batch.prompt_ids.cpu(), pm)]
        actions = [batch.action_ids[i, :n].cpu().tolist() for i, n in enumerate(lengths)]
        tree = tree_backup(groups, actions, [row[:n] for row, n in zip(log_ref, lengths)], t.leaf_values.tolist(),
                           hp.beta, hp.unwritten_value)
        self.last_trees = {"values": tree.node_values, "unwritten": hp.unwritten_value}
        if hp.target_backup == "optimal_tree":
            for i, (n, row) in enumerate(zip(lengths, tree.targets)):
                t.targets[i, :n] = torch.tensor(row, dtype=t.targets.dtype, device=t.targets.device)
            mask = batch.action_mask.float()
            t.charts["charts/target_mean"] = float((t.targets * mask).sum()) / float(mask.sum().clamp(min=1))
        if hp.policy_target == "optimal_tree":
            t.branches = self._branch_tensors(tree.branches, t.targets)
            t.charts["charts/branch_tokens"] = float(t.branches[0].sum())
            if hp.policy_nodes == "choices":
                t.policy_mask = self._choice_mask(tree.branches, t.targets)
                t.charts["charts/policy_tokens"] = float(t.policy_mask.sum())

    @staticmethod
    def _choice_mask(branches: list, like: torch.Tensor) -> torch.Tensor:
        """``[B, L]``: the positions whose tree node holds a choice (``policy_nodes: choices``): two or more written
        continuations, or a single one worth less than a token never written there."""
        mask = torch.zeros(like.shape, dtype=torch.bool, device=like.device)
        for b, row in enumerate(branches):
            for j, branch in enumerate(row):
                if branch is not None:
                    tokens, q_written, unwritten_q = branch
                    mask[b, j] = len(tokens) > 1 or q_written[0] < unwritten_q
        return mask

    @staticmethod
    def _branch_tensors(branches: list, like: torch.Tensor) -> tuple:
        """The fresh rows' branches of :func:`~modules.losses.etpo.tree_backup` as tensors for
        :func:`~modules.losses.etpo.branch_q`: a mask and the node value ``[B, L]``, (row, position, token) ``[K, 3]``
        of every written continuation and its Q ``[K]``."""
        mask = torch.zeros(like.shape, dtype=torch.bool, device=like.device)
        value = torch.zeros(like.shape, dtype=torch.float32, device=like.device)
        index, q = [], []
        for b, row in enumerate(branches):
            for j, branch in enumerate(row):
                if branch is None:
                    continue
                tokens, q_written, v = branch
                mask[b, j], value[b, j] = True, v
                index += [(b, j, token) for token in tokens]
                q += q_written
        index_t = torch.tensor(index, dtype=torch.long, device=like.device).reshape(-1, 3)
        return mask, value, index_t, torch.tensor(q, dtype=torch.float32, device=like.device)

    @torch.no_grad()
    def compute_targets(self, batch: RolloutBatch, plan: ScoringPlan,
                        replayed: Optional[torch.Tensor] = None, record_behaviour: bool = False) -> _Targets:
        """Step 1: per-token soft values under (target Q, current policy, reference), the traces, and the
        regression targets ``y`` of every taken token.

        ``replayed [B, L]``: ``log mu`` of tokens an earlier policy sampled (replayed transitions): the
        traces are then ``min(1, pi / mu)`` whatever ``trace_correction`` says. ``record_behaviour``: return the
        fresh batch's own ``log mu`` (the sampling distribution of the current policy) for the replay."""
        hp, m = self.hparams, self.model
        actions, mask = batch.action_ids, batch.action_mask.float()
        h_ref, x_ref = m.plan_hidden("reference", plan)
        h_target, x_target = m.plan_hidden("target", plan)
        h_policy, x_policy = m.plan_hidden("policy", plan)
        shape = mask.shape
        values, target_q_taken, ref_taken, log_pi, log_mu, log_ref_taken = (torch.zeros(shape, device=mask.device)
                                                                            for _ in range(6))
        correct = hp.td_lambda > 0 and hp.trace_correction and not batch.sampling.samples_from_the_policy
        record = correct or record_behaviour
        kl_sum = ent_sum = 0.0
        first_optimal = None  # V*(s) at each row's first token: the optimality backup's next-state value
        for sl in token_chunks(shape[1], self.chunk_width(shape[0])):
            taken = actions[:, sl].unsqueeze(-1)
            ref_logits = m.head(h_ref[:, sl])
            q_target = self._q(m.head(h_target[:, sl]), ref_logits)
            pi_logits = m.head(h_policy[:, sl])
            v, kl = soft_value(q_target, pi_logits, ref_logits, hp.beta)
            values[:, sl] = v
            if first_optimal is None:
                first_optimal = optimal_value(q_target[:, 0], ref_logits[:, 0], hp.beta)
            target_q_taken[:, sl] = q_target.gather(-1, taken).squeeze(-1)
            ref_taken[:, sl] = ref_logits.gather(-1, taken).squeeze(-1)
            log_ref_taken[:, sl] = torch.log_softmax(ref_logits, -1).gather(-1, taken).squeeze(-1)
            log_pi[:, sl] = torch.log_softmax(pi_logits, -1).gather(-1, taken).squeeze(-1)
            if record:
                s = batch.sampling
                log_mu[:, sl] = behaviour_log_probs(pi_logits, actions[:, sl], s.temperature, s.top_k, s.top_p)
            kl_sum += float((kl * mask[:, sl]).sum())
            ent_sum += float((entropy(pi_logits) * mask[:, sl]).sum())
        optimal = hp.target_backup == "optimal_tree"
        next_values = self._next_state_values(batch, first_optimal if optimal else values[:, 0], x_ref, x_target,
                                              x_policy, optimal)
        if replayed is not None:
            traces = trace_coefficients(log_pi, replayed.to(log_pi.device))
        else:
            traces = trace_coefficients(log_pi, log_mu if correct else None)
        rewards = batch.rewards.float() - self.reward_shift  # section 7b (0 without a baseline)
        targets = trace_targets(values, target_q_taken, traces, mask, rewards, batch.dones,
                                next_values, hp.gamma, hp.td_lambda, hp.discount_within_action)
        n = float(mask.sum().clamp(min=1))
        charts = {"charts/kl": kl_sum / n, "charts/entropy": ent_sum / n,
                  "charts/target_mean": float((targets * mask).sum()) / n,
                  "charts/value_first_token": float(values[:, 0].mean()),
                  "charts/action_tokens": n / len(batch),
                  # what prefix sharing saves: positions one forward computes, against the rows' own tokens
                  "timing/positions_computed": float(plan.tokens_computed),
                  "timing/positions_plain": float(plan.sequence_tokens)}
        if correct or replayed is not None:
            charts["charts/trace_mean"] = float((traces * mask).sum()) / n
        if hp.reward_baseline is not None:
            charts["charts/reward_baseline"] = self.reward_shift
        leaf_values = rewards + hp.gamma * (1.0 - batch.dones.float()) * next_values  # Eq. 6, the last token
        return _Targets(targets=targets, ref_taken=ref_taken, ref_hidden=h_ref.detach(), values=values,
                        target_q_taken=target_q_taken, traces=traces, charts=charts,
                        behaviour_log_probs=log_mu if record else None, log_ref_taken=log_ref_taken,
                        leaf_values=leaf_values)

    def _next_state_values(self, batch: RolloutBatch, first_row_values: torch.Tensor, x_ref, x_target,
                           x_policy, optimal: bool = False) -> torch.Tensor:
        """``V(s_{t+1})`` per transition (zero where the episode ended; Eq. 6 multiplies by ``1 - done`` again).
        Where the next state is the prompt of a later transition in the batch its value is that transition's first
        row; otherwise the next prompts were part of the plan's forwards (``x_*``: their last-token states).
        ``optimal``: the optimal soft value ``V* = beta log Z`` of the target network (the optimality backup of
        ``target_backup: optimal_tree``, docs/method.md 4a) instead of the current policy's soft value."""
        next_values = torch.zeros_like(first_row_values)
        linked = batch.next_index >= 0
        next_values[linked] = first_row_values[batch.next_index[linked]]
        if batch.next_needed.numel() > 0:
            m = self.model
            ref = m.head(x_ref)
            q = self._q(m.head(x_target), ref)
            v = optimal_value(q, ref, self.hparams.beta) if optimal else \
                soft_value(q, m.head(x_policy), ref, self.hparams.beta)[0]
            next_values[batch.next_needed] = v.to(next_values.dtype)
        return next_values

    def critic_loss(self, batch: RolloutBatch, plan: ScoringPlan, t: _Targets,
                    replayed: Optional[tuple] = None) -> tuple[torch.Tensor, dict]:
        """Step 2: the soft Bellman regression of the critic's Q of every taken token on its target (only the taken
        token's logit is needed: one row of the head per token, no vocabulary-sized tensor) -- the mean over the
        fresh batch's tokens and, with the replay, the replayed ones (``replayed = (batch, plan, targets)``)."""
        parts = [(batch, plan, t)] + ([replayed] if replayed is not None else [])
        sums, counts, charts = [], [], {}
        for k, (b, p, targets) in enumerate(parts):
            q_taken = self._critic_q_taken(b, p, targets)
            mask = b.action_mask.float()
            sums.append(soft_q_regression(q_taken, targets.targets, mask, self.hparams.huber_delta, reduction="sum"))
            counts.append(mask.sum())
            if k == 0:
                charts["charts/q_taken"] = float((q_taken.detach() * mask).sum()) / float(mask.sum().clamp(min=1))
            else:
                charts["charts/critic_loss_replay"] = float(sums[-1].detach()) / float(counts[-1].clamp(min=1))
        loss = torch.stack(sums).sum() / torch.stack(counts).sum().clamp(min=1)
        charts["losses/critic"] = float(loss.detach())
        return loss, charts

    def _critic_q_taken(self, batch: RolloutBatch, plan: ScoringPlan, t: _Targets) -> torch.Tensor:
        m = self.model
        h_critic, _ = m.plan_hidden("critic", plan)
        critic_taken = m.head_rows(h_critic, batch.action_ids)
        return critic_taken - t.ref_taken if self.hparams.q_parameterisation == "zero" else critic_taken

    def policy_loss(self, batch: RolloutBatch, plan: ScoringPlan, t: _Targets) -> tuple[torch.Tensor, dict]:
        """Step 3: Eq. 7 at every action token against the updated critic -- with ``policy_target: optimal_tree``
        the trees' Q where they have one (section 4a) -- chunk by chunk over the vocabulary."""
        hp, m = self.hparams, self.model
        mask = batch.action_mask.float()
        if t.policy_mask is not None:  # policy_nodes: choices -- the step only where the trees hold a choice
            mask = mask * t.policy_mask.to(mask)
        n_tokens = mask.sum().clamp(min=1)
        with torch.no_grad():
            h_critic, _ = m.plan_hidden("critic", plan)
        h_policy, _ = m.plan_hidden("policy", plan)

        def chunk_loss(sl: slice, pi_logits: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                ref_logits = m.head(t.ref_hidden[:, sl])
                q = self._q(m.head(h_critic[:, sl]), ref_logits)
                if t.branches is not None:
                    q = self._branch_q(q, t.branches, sl)
            return policy_loss(pi_logits, ref_logits, q, mask[:, sl], hp.beta, reduction="sum",
                               divergence=hp.policy_divergence) / n_tokens

        loss = m.chunked_head_loss(h_policy, chunk_loss, self.chunk_width(mask.shape[0]))
        return loss, {"losses/policy": float(loss.detach())}

    @staticmethod
    def _branch_q(q: torch.Tensor, branches: tuple, sl: slice) -> torch.Tensor:
        """:func:`~modules.losses.etpo.branch_q` on the chunk ``sl`` of the positions."""
        mask, value, index, written_q = branches
        start = sl.start or 0
        inside = (index[:, 1] >= start) & (index[:, 1] < sl.stop)
        local = index[inside] - torch.tensor([0, start, 0], device=index.device)
        return branch_q(q, mask[:, sl], value[:, sl], local, written_q[inside])

    # ---- checkpoints: the replay and the running reward baseline survive a resume -----------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.hparams.replay_capacity:
            checkpoint["replay"] = self.replay.state_dict()
        if self.hparams.answer_memory:
            checkpoint["answer_memory"] = self.memory.state_dict()
        if self.hparams.reward_baseline is not None:
            checkpoint["reward_baseline"] = {"sum": self.reward_sum, "count": self.reward_count,
                                             "episode_length": self.episode_length}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if "replay" in checkpoint:
            self.replay.load_state_dict(checkpoint["replay"])
        if "answer_memory" in checkpoint:
            self.memory.load_state_dict(checkpoint["answer_memory"])
        if "reward_baseline" in checkpoint:
            self.reward_sum = float(checkpoint["reward_baseline"]["sum"])
            self.reward_count = int(checkpoint["reward_baseline"]["count"])
            self.episode_length = checkpoint["reward_baseline"]["episode_length"]

    @torch.no_grad()
    def token_readings(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, action_ids: torch.Tensor,
                       action_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """:meth:`AgentModule.token_readings` plus, per taken token, the critic's soft ``q`` and ``logp_optimal`` =
        log pi*(w|ctx), pi* = pi_bar exp(Q / beta) / Z (docs/method.md, section 6): where the policy step is heading."""
        m, beta = self.model, self.hparams.beta
        plan = m.plan(prompt_ids, prompt_mask, action_ids, action_mask)
        hidden = {view: m.plan_hidden(view, plan)[0] for view in ("policy", "reference", "critic")}
        names = ("logp_policy", "logp_reference", "q", "logp_optimal")
        out = {name: torch.zeros(action_ids.shape, device=hidden["policy"].device) for name in names}
        for sl in token_chunks(action_ids.shape[1], self.chunk_width(action_ids.shape[0])):
            taken = action_ids[:, sl].unsqueeze(-1).long()
            ref_logits = m.head(hidden["reference"][:, sl])
            q = self._q(m.head(hidden["critic"][:, sl]), ref_logits)
            rows = {"logp_policy": torch.log_softmax(m.head(hidden["policy"][:, sl]), -1),
                    "logp_reference": torch.log_softmax(ref_logits, -1), "q": q,
                    "logp_optimal": optimal_policy_logits(ref_logits, q, beta)}
            for name, full in rows.items():
                out[name][:, sl] = full.gather(-1, taken).squeeze(-1)
        mask = action_mask.to(out["q"])
        return {name: value * mask for name, value in out.items()}

    def tree_readings(self, prompt: Sequence[int], action: Sequence[int]) -> Optional[list[Optional[tuple]]]:
        """What the last update's answer trees (docs/method.md, section 4a) say along ``action`` written for
        ``prompt`` (token ids, unpadded): per position ``j``, ``(Q, V)`` -- the tree's soft-optimal Q of the token
        written there (a token no answer wrote at that node: the unwritten value, 0 or the node's ``V``) and the
        node's value ``V`` -- or None where no answer of the trees reached that prefix. None without trees. The
        trees' own pi* of that token is then ``pi_bar * exp((Q - V) / beta)``."""
        if self.last_trees is None:
            return None
        values, unwritten = self.last_trees["values"], self.last_trees["unwritten"]
        group, action = tuple(int(t) for t in prompt), tuple(int(t) for t in action)
        out: list[Optional[tuple]] = []
        for j in range(len(action)):
            v = values.get((group, action[:j]))
            if v is None:
                out.append(None)
                continue
            q = values.get((group, action[: j + 1]), 0.0 if unwritten == "zero" else v)
            out.append((q, v))
        return out

    # ---- token-level credit ------------------------------------------------------------------------------------
    @torch.no_grad()
    def token_credit(self, batch: RolloutBatch, max_examples: Optional[int] = 4) -> TokenCredit:
        """Per-token credit of the first transitions of a batch, as ETPO assigns it: the critic's soft Q of each
        taken token, its regression target ``y`` (Eq. 6 / TD(lambda); where the episode goes on, the next state's
        value is left out: the last token shows the reward only), and the soft advantage ``Q(ctx, w) - V(ctx)`` of
        the taken token under the current policy."""
        sub, tokens = self.credit_rows(batch, max_examples)
        sub.terminated = torch.ones_like(sub.terminated)  # the credit view leaves V(s_{t+1}) out
        plan = self.plan(sub)
        t = self.compute_targets(sub, plan)
        m = self.model
        h_critic, _ = m.plan_hidden("critic", plan)
        h_policy, _ = m.plan_hidden("policy", plan)
        mask = sub.action_mask.float()
        q_taken = torch.zeros_like(mask)
        advantage = torch.zeros_like(mask)
        for sl in token_chunks(mask.shape[1], self.chunk_width(mask.shape[0])):
            ref = m.head(t.ref_hidden[:, sl])
            q = self._q(m.head(h_critic[:, sl]), ref)
            v, _ = soft_value(q, m.head(h_policy[:, sl]), ref, self.hparams.beta)
            q_taken[:, sl] = q.gather(-1, sub.action_ids[:, sl].unsqueeze(-1)).squeeze(-1)
            advantage[:, sl] = q_taken[:, sl] - v
        rows = lambda x: self.per_token_lists(x, mask)  # noqa: E731
        return TokenCredit(tokens=tokens,
                           scores={"soft Q of taken token": rows(q_taken), "target y (Eq. 6)": rows(t.targets),
                                   "soft advantage Q - V": rows(advantage)},
                           rewards=[float(r) for r in sub.rewards.cpu()])
