"""The contract every algorithm module meets, and what they share (``docs/extending.md`` walks through it).

An algorithm is a subclass of :class:`AgentModule` (a LightningModule) that

1. **acts** -- :meth:`AgentModule.act` samples one action per prompt; the rollout DataModule calls it (the default
   samples from the ``policy`` view of the shared base model with the run's sampling settings);
2. **learns** -- implements :meth:`AgentModule.learn`, called once per rollout batch with a fresh, on-policy
   :class:`~datamodules.batch.RolloutBatch` already on the device. It takes its own optimizer steps with
   :meth:`AgentModule.optimizer_step_on` (manual optimisation: any number of optimizers and of steps per batch --
   ETPO steps its critic and then its policy, PPO-KL and GRPO take several minibatch steps) and returns its charts;
3. **logs** -- the charts it returns, keyed ``losses/...`` (shown in the progress bar) and ``charts/...``, next to
   the rollout charts every contender logs under the same keys (``charts/avg_reward``, ``charts/best_reward``,
   ``charts/runnable_fraction``, ``charts/env_steps``, ``charts/sps``), so the curves of contenders overlay;
4. **shows its credit** (optional) -- :meth:`AgentModule.token_credit` returns a :class:`TokenCredit`: which score
   each token of an action received (``etpo.credit`` renders it as HTML and a TensorBoard summary).

The base class pulls the batch, checks that it is on-policy, calls ``learn``, counts ``policy_version`` and logs;
it also provides per-optimizer gradient clipping (sharding-aware), optional learning-rate schedulers, lean
checkpoints (adapters only) and exact resume. A module that needs no gradient (the untrained Reflection baseline)
returns no optimizer and an empty ``learn``.

Sharded training: with FSDP every forward that is followed by a backward must run inside the root module's forward,
and the backward must start after it (pytorch-lightning #19685, #19626; a backward inside it leaves gradients
unset or wrong, shown in tests/test_scale.py). Lightning's own manual optimisation calls ``training_step`` inside
the root forward, so the project's FSDP strategy (``modules.strategy``) calls ``training_step`` directly and
:meth:`AgentModule.run_forward` routes each forward phase through the root module (a no-op without sharding).
"""

from __future__ import annotations

import contextlib
import math
import time
from abc import ABCMeta, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator, Mapping, Optional

import lightning as L
import torch

from datamodules.batch import GenerationConfig, RolloutBatch
from modules.shared_base import BackboneConfig, SharedBaseLM
from modules.shared_base.fsdp import global_grad_norm

__all__ = ["AgentModule", "TokenCredit"]


@dataclass
class TokenCredit:
    """Per-token credit of some transitions of a batch, as a contender assigns it.

    ``tokens[i]`` are the decoded tokens of transition ``i``'s action; ``scores[name][i]`` holds one number per token
    for every kind of score (e.g. ``"soft Q of taken token"``); ``rewards[i]`` is the transition's reward."""

    tokens: list[list[str]]
    scores: dict[str, list[list[float]]]
    rewards: list[float]

    def __post_init__(self) -> None:
        for name, rows in self.scores.items():
            if len(rows) != len(self.tokens) or any(len(r) != len(t) for r, t in zip(rows, self.tokens)):
                raise ValueError(f"TokenCredit: score {name!r} does not give one number per token")


class AgentModule(L.LightningModule, metaclass=ABCMeta):
    """Base LightningModule of an LLM agent trained (or not) on rollouts from :mod:`datamodules.rollout`.

    Args:
        backbone: which base LLM to load and how to attach the adapters (see ``modules.shared_base``).
    """

    #: short, stable name of the contender (run directories, tables, plots)
    contender: ClassVar[str] = ""

    def __init__(self, backbone: BackboneConfig | None = None):
        super().__init__()
        if backbone is not None and not isinstance(backbone, BackboneConfig):
            raise TypeError(f"{type(self).__name__}: backbone must be a BackboneConfig, got {type(backbone).__name__}; "
                            "give the argument the type hint `backbone: BackboneConfig | None = None` so that "
                            "LightningCLI builds it from YAML")
        self.automatic_optimization = False  # modules step their own optimizers in `learn`
        self.backbone = backbone or BackboneConfig()
        self.model: SharedBaseLM | None = None
        self.policy_version = 0  # rollout batches learned from; the rollout records it to prove on-policy sampling
        self._logged_best = -math.inf
        self._pending_call: Optional[tuple] = None
        self._pending_rng: Optional[torch.Tensor] = None
        self._standalone: Optional[dict] = None
        self.last_batch: Optional[RolloutBatch] = None  # the batch just learned from (diagnostics read it)

    # ---- the contract ------------------------------------------------------------------------------------------
    def act(self, prompts: list[str], generation: GenerationConfig):
        """Sample one action per prompt from the current policy in one generation batch (the model layer samples in
        eval mode -- no dropout, KV cache on -- and restores the mode). Returns a ``modules.shared_base.Generation``.
        Which view samples which row is :meth:`sampling_views`'s."""
        with torch.no_grad():
            return self.model.generate(
                prompts, max_new_tokens=generation.max_new_tokens, temperature=generation.temperature,
                top_k=generation.top_k, top_p=generation.top_p, stop_strings=generation.stop_strings or None,
                view=self.sampling_views(len(prompts)),
            )

    def sampling_views(self, rows: int) -> str | list[str]:
        """The view that samples each of ``rows`` prompts (one per environment, in the environments' order): the
        policy for all of them. An off-policy method may sample some rows from another view."""
        return "policy"

    @abstractmethod
    def learn(self, batch: RolloutBatch) -> Mapping[str, float]:
        """Learn from one fresh rollout batch (on the device) with :meth:`optimizer_step_on`; return the charts."""

    def token_credit(self, batch: RolloutBatch, max_examples: Optional[int] = 4) -> Optional[TokenCredit]:
        """Per-token credit of the first ``max_examples`` transitions of ``batch`` (all for None); None: no view."""
        return None

    # ---- model -------------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        # Lightning calls this under the strategy's init context (sharded / meta-device init for FSDP).
        if self.model is None:
            self.model = SharedBaseLM(self.backbone)
            # The model layer loads in eval mode; updates run in train mode, which is what switches activation
            # checkpointing on (and LoRA dropout, if configured). ``act`` samples in eval mode.
            self.model.train()

    def on_train_start(self) -> None:
        self.model.train()  # Lightning keeps submodules' modes as it finds them (e.g. after a validation loop)

    def encode_prompts(self, prompts: list[str]) -> list[list[int]]:
        """Token ids of bare prompts (unpadded), exactly as ``act`` tokenises them."""
        ids, mask = self.model.encode_prompts(prompts)
        return [row[m.bool()].tolist() for row, m in zip(ids, mask)]

    # ---- one rollout batch per training step -------------------------------------------------------------------
    def training_step(self, dataloader_iter: Iterator) -> None:
        batch = self.run_forward(self.next_batch, dataloader_iter)  # generation runs in here: fresh, on-policy
        started = time.perf_counter()
        charts = dict(self.learn(batch))
        update_s = time.perf_counter() - started
        self.policy_version += 1
        self.last_batch = batch
        size = len(batch)
        for key, value in charts.items():
            self.log(key, float(value), on_step=True, prog_bar=key.startswith("losses/"), batch_size=size)
        self.log_rollout(batch, update_s)

    def next_batch(self, dataloader_iter: Iterator) -> RolloutBatch:
        """Pull the next rollout batch *now* (generated with the current weights) and move it to the device."""
        batch, _, _ = next(dataloader_iter)
        if not isinstance(batch, RolloutBatch):
            raise TypeError(f"{type(self).__name__} expects RolloutBatch batches, got {type(batch).__name__}")
        if batch.policy_version != self.policy_version:
            raise RuntimeError("rollout batch was generated with stale weights; the rollout must stay on-policy")
        return batch.to(self.trainer.strategy.root_device)

    def run_forward(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, run inside the strategy's root forward when the strategy asks for it (FSDP: the
        root's parameters -- embeddings, vocabulary head -- are full only there); a plain call otherwise. Call
        ``manual_backward`` on what it returns *after* it returns."""
        if self._standalone is not None:
            root = self._standalone["root"]
            if root is self:
                return fn(*args, **kwargs)
            from lightning.pytorch.strategies.strategy import _ForwardRedirection

            self._pending_call = (fn, args, kwargs)
            return _ForwardRedirection()(root, self, "_run_pending_call")
        trainer = self._trainer
        strategy = trainer.strategy if trainer is not None else None
        if strategy is None or not getattr(strategy, "redirects_module_forward", False):
            return fn(*args, **kwargs)
        self._pending_call = (fn, args, kwargs)
        return strategy._forward_redirection(strategy.model, self, "_run_pending_call")

    def _run_pending_call(self) -> Any:
        fn, args, kwargs = self._pending_call
        self._pending_call = None
        return fn(*args, **kwargs)

    # ---- optimisation ------------------------------------------------------------------------------------------
    def root_model(self) -> torch.nn.Module:
        """The model optimizers step: the strategy's wrapped model (``trainer.model``; FSDP units included)."""
        if self._standalone is not None:
            return self._standalone["root"]
        return self.trainer.model

    @contextlib.contextmanager
    def without_trainer(self, optimizers: Optional[list] = None, root: Optional[torch.nn.Module] = None):
        """Drive :meth:`learn` without a Trainer (benchmarks, the raw-FSDP tests): it steps ``optimizers`` (default:
        ``configure_optimizers()``), backward is a plain ``loss.backward()``, and ``root`` -- e.g. a
        ``FullyShardedDataParallel`` around this module -- plays the strategy's wrapped model (forward phases run
        through its forward; replicated adapter gradients are averaged over ranks after each backward)."""
        self._standalone = {"root": root if root is not None else self, "optimizers": None}
        try:
            if optimizers is None:
                configured = self.configure_optimizers()
                configured = configured if isinstance(configured, (list, tuple)) else [configured]
                optimizers = [c["optimizer"] if isinstance(c, dict) else c for c in configured if c is not None]
            self._standalone["optimizers"] = list(optimizers)
            yield self
        finally:
            self._standalone = None

    def manual_backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        if self._standalone is None:
            return super().manual_backward(loss, *args, **kwargs)
        loss.backward(*args, **kwargs)
        root = self._standalone["root"]
        if root is not self:
            from modules.shared_base.fsdp import allreduce_replicated_gradients

            allreduce_replicated_gradients(root.parameters(), root)
        return None

    def optimizer_step_on(self, optimizer, loss_fn: Callable[..., tuple[torch.Tensor, dict]], *args: Any) -> dict:
        """One optimizer step on ``loss_fn(*args) -> (loss, charts)``: the forward (through :meth:`run_forward`),
        backward, per-group gradient-norm clipping, the step and the optimizer's scheduler, if any. Returns the
        charts with the gradient norms added."""
        loss, charts = self.run_forward(loss_fn, *args)
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        charts = {**charts, **self.clip_gradients_per_group(optimizer)}
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler = self._scheduler_of(optimizer)
        if scheduler is not None:
            scheduler.step()
        return charts

    def clip_gradients_per_group(self, optimizer) -> dict[str, float]:
        """Clip the gradient norm of every parameter group to its own ``max_grad_norm``; returns the norms before
        clipping as ``charts/grad_norm_<group name>``.

        The norm is the whole model's: sharded gradients are summed over ranks, replicated ones counted once
        (:func:`modules.shared_base.fsdp.global_grad_norm`)."""
        norms = {}
        for group in optimizer.param_groups:
            max_norm = group.get("max_grad_norm")
            if not max_norm:
                continue
            # every rank takes part, even without local gradients (the norm is collective when sharded)
            norm = global_grad_norm(group["params"], self.root_model())
            norms[f"charts/grad_norm_{group.get('name', 'group')}"] = float(norm)
            scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.mul_(scale.to(p.grad.dtype))
        return norms

    def _scheduler_of(self, optimizer):
        if self._standalone is not None:
            return None
        configs = getattr(self.trainer, "lr_scheduler_configs", None) or []
        inner = getattr(optimizer, "optimizer", optimizer)  # LightningOptimizer wraps the torch optimizer
        for config in configs:
            if config.scheduler.optimizer is inner:
                return config.scheduler
        return None

    def optimizers_by_name(self) -> dict[str, Any]:
        """The module's optimizers keyed by the ``name`` of their first parameter group."""
        if self._standalone is not None:
            optimizers = self._standalone["optimizers"]
        else:
            optimizers = self.optimizers(use_pl_optimizer=True)
            optimizers = optimizers if isinstance(optimizers, (list, tuple)) else [optimizers]
        inner = lambda o: getattr(o, "optimizer", o)  # noqa: E731  (LightningOptimizer wraps the torch optimizer)
        return {inner(opt).param_groups[0].get("name", str(i)): opt for i, opt in enumerate(optimizers)}

    # ---- logging -----------------------------------------------------------------------------------------------
    def log_rollout(self, batch: RolloutBatch, update_s: Optional[float] = None) -> None:
        """The rollout charts every contender logs under the same keys: rewards under ``charts/`` (the mean reward of
        the runnable answers and the batch's best besides the average and the runnable fraction), where the batch's
        time went under ``timing/`` (sampling, the environments, the update; generated tokens per second), and --
        where the environment names its answers' classes -- each runnable class's share of the batch and mean reward
        under ``classes/`` (``classes/share/(failed)``: the answers that did not run)."""
        metrics = batch.metrics
        size = len(batch)
        for key in ("avg_reward", "best_reward", "runnable_fraction", "env_steps", "sps"):
            self.log(f"charts/{key}", float(getattr(metrics, key)), on_step=True,
                     prog_bar=key in ("avg_reward", "best_reward"), batch_size=size)
        for key in ("runnable_reward", "batch_best_reward"):
            value = getattr(metrics, key, None)
            if value is not None:  # no runnable answer in the batch: no point rather than a NaN
                self.log(f"charts/{key}", float(value), on_step=True, batch_size=size)
        timing = {"generation_s": metrics.generation_s, "environment_s": metrics.environment_s}
        if update_s is not None:
            timing["update_s"] = update_s
        for key, value in timing.items():
            self.log(f"timing/{key}", float(value), on_step=True, prog_bar=True, batch_size=size)
        self.log("timing/generated_tokens_per_s", float(metrics.generated_tokens_per_s), on_step=True, batch_size=size)
        if metrics.answer_classes:  # what the batch wrote: each runnable class's share and mean reward, and failures
            failed = 0
            for name, c in metrics.answer_classes.items():
                failed += c["n"] - c["runnable"]
                if c["runnable"]:
                    self.log(f"classes/share/{name}", c["n"] / size, on_step=True, batch_size=size)
                    self.log(f"classes/reward/{name}", float(c["mean_reward"]), on_step=True, batch_size=size)
            self.log("classes/share/(failed)", failed / size, on_step=True, batch_size=size)
        stats = getattr(self.trainer.datamodule, "stats", None)
        if stats is not None and update_s is not None and hasattr(stats, "record_update_time"):
            stats.record_update_time(update_s)
        if stats is not None and stats.best_reward > self._logged_best:
            self._logged_best = stats.best_reward
            experiment = getattr(self.logger, "experiment", None)
            if hasattr(experiment, "add_text"):
                text = f"best reward {self._logged_best:.4f}\n\n```python\n{stats.best_code}\n```"
                experiment.add_text("charts/best_code", text, self.global_step)

    # ---- diagnostics: what the views say about given answers ---------------------------------------------------
    @torch.no_grad()
    def token_readings(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, action_ids: torch.Tensor,
                       action_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per taken action token ``[B, L]`` (zero on padding): ``logp_policy`` = log pi_theta(w|ctx) and
        ``logp_reference`` = log pi_bar(w|ctx). Contenders with a soft Q add theirs (ETPO: ``q`` and ``logp_optimal``,
        log pi*). Read by the answer-class probe (:mod:`etpo.probe`) at the tokens where answers part."""
        m = self.model
        plan = m.plan(prompt_ids, prompt_mask, action_ids, action_mask)
        return {f"logp_{name}": self._taken_log_probs(m.plan_hidden(view, plan)[0], action_ids, action_mask)
                for name, view in (("policy", "policy"), ("reference", "reference"))}

    def _taken_log_probs(self, hidden: torch.Tensor, action_ids: torch.Tensor, action_mask: torch.Tensor,
                         chunk_size: int = 64) -> torch.Tensor:
        out = torch.zeros(action_ids.shape, dtype=torch.float32, device=hidden.device)
        for sl, logits in self.model.head_chunks(hidden, chunk_size):
            out[:, sl] = torch.log_softmax(logits, -1).gather(-1, action_ids[:, sl].unsqueeze(-1).long()).squeeze(-1)
        return out * action_mask.to(out)

    # ---- token-level credit helpers ----------------------------------------------------------------------------
    def credit_rows(self, batch: RolloutBatch, max_examples: Optional[int]) -> tuple[RolloutBatch, list[list[str]]]:
        """The first ``max_examples`` transitions of a rollout batch (all of them for None), on the device, and the
        decoded tokens of their actions."""
        n = len(batch)
        k = n if max_examples is None else min(n, max_examples)
        sub = batch.to(self.device).rows(slice(0, k))
        tok = self.model.tokenizer
        tokens = [[tok.decode([int(t)]) for t, m in zip(row, mask) if m]
                  for row, mask in zip(sub.action_ids.cpu(), sub.action_mask.cpu())]
        return sub, tokens

    @staticmethod
    def per_token_lists(values: torch.Tensor, mask: torch.Tensor) -> list[list[float]]:
        """``values[B, L]`` as one list per row holding the entries where ``mask`` is 1."""
        return [[float(x) for x, keep in zip(r, m) if keep] for r, m in zip(values.cpu(), mask.cpu())]

    # ---- bookkeeping -------------------------------------------------------------------------------------------
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if getattr(self.trainer.datamodule, "exhausted", False):
            self.trainer.should_stop = True  # the environment budget is spent

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The model layer's state_dict already leaves out the frozen base (reloaded from its source): checkpoints
        # hold the adapters (policy, critic, target) and any small heads. Add the counters and the sampling RNG.
        checkpoint["agent"] = {"policy_version": self.policy_version, "logged_best": self._logged_best,
                               "torch_rng": torch.get_rng_state()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        agent = checkpoint.get("agent", {})
        self.policy_version = int(agent.get("policy_version", 0))
        self._logged_best = float(agent.get("logged_best", -math.inf))
        # Restored at the first batch, not now: Lightning still builds the dataloader iterator after loading, and
        # that draws from the global generator (a resumed run must sample exactly what an uninterrupted one does).
        self._pending_rng = agent.get("torch_rng")

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._pending_rng is not None:
            torch.set_rng_state(self._pending_rng)
            self._pending_rng = None
