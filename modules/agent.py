"""What every contender's LightningModule shares: the shared-base model, acting for the rollout DataModule,
rollout charts, per-group gradient clipping and lean checkpoints.

ETPO, PPO-KL and Reflection subclass :class:`AgentModule`; their TensorBoard keys are the same
(``charts/...`` from the rollout, ``losses/...`` from the update) so their curves overlay.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import lightning as L
import torch

from datamodules.rollout import GenerationConfig
from etpo.distributed import global_grad_norm
from modules.shared_base import BackboneConfig, SharedBaseLM

__all__ = ["AgentModule", "adapter_parameters"]


def adapter_parameters(module: torch.nn.Module, adapter: str) -> list[torch.nn.Parameter]:
    """Trainable parameters of one named peft adapter, found by name in ``module`` -- which may be the strategy's
    wrapped model (``self.trainer.model``), so optimizers see the (possibly sharded) parameters that are stepped."""
    marker = f".{adapter}."
    return [p for n, p in module.named_parameters() if marker in n and p.requires_grad]


class AgentModule(L.LightningModule):
    """Base LightningModule for an LLM agent trained (or not) on rollouts from :mod:`datamodules.rollout`.

    Args:
        backbone: which base LLM to load and how to attach the adapters (see ``modules.shared_base``).
    """

    def __init__(self, backbone: BackboneConfig | None = None):
        super().__init__()
        self.backbone = backbone or BackboneConfig()
        self.model: SharedBaseLM | None = None
        self.policy_version = 0  # optimizer steps taken; the rollout records it to prove on-policy sampling
        self._logged_best = -math.inf

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

    # ---- acting (called by the rollout DataModule) -------------------------------------------------------------
    @torch.no_grad()
    def act(self, prompts: list[str], generation: GenerationConfig):
        """Sample one action per prompt from the current policy, in one generation batch (the model layer samples
        in eval mode -- no dropout, KV cache on -- and restores the mode)."""
        return self.model.generate(
            prompts, max_new_tokens=generation.max_new_tokens, temperature=generation.temperature,
            top_k=generation.top_k, top_p=generation.top_p, stop_strings=generation.stop_strings or None,
        )

    def encode_prompts(self, prompts: list[str]) -> list[list[int]]:
        """Token ids of bare prompts (unpadded), exactly as ``act`` tokenises them."""
        ids, mask = self.model.encode_prompts(prompts)
        return [row[m.bool()].tolist() for row, m in zip(ids, mask)]

    # ---- batches -----------------------------------------------------------------------------------------------
    def next_batch(self, dataloader_iter: Iterator) -> dict:
        """Pull the next rollout batch *now* (generated with the current weights) and move it to the device."""
        batch, _, _ = next(dataloader_iter)
        if batch["policy_version"] != self.policy_version:
            raise RuntimeError("rollout batch was generated with stale weights; the rollout must stay on-policy")
        tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
        tensors = self.trainer.strategy.batch_to_device(tensors)
        return {**batch, **tensors}

    def log_rollout(self, batch: dict) -> None:
        """The rollout charts every contender logs under the same keys."""
        metrics = batch["metrics"]
        size = int(batch["rewards"].numel())
        for key in ("avg_reward", "best_reward", "runnable_fraction", "env_steps", "sps"):
            self.log(f"charts/{key}", float(metrics[key]), on_step=True, prog_bar=key in ("avg_reward", "best_reward"),
                     batch_size=size)
        collector = getattr(self.trainer.datamodule, "collector", None)
        if collector is not None and collector.stats.best_reward > self._logged_best:
            self._logged_best = collector.stats.best_reward
            experiment = getattr(self.logger, "experiment", None)
            if hasattr(experiment, "add_text"):
                text = f"best reward {self._logged_best:.4f}\n\n```python\n{collector.stats.best_code}\n```"
                experiment.add_text("charts/best_code", text, self.global_step)

    # ---- token-level credit (etpo.credit.TokenCreditCallback) ---------------------------------------------------
    def _credit_subset(self, batch: dict, max_examples: int | None) -> tuple[dict, list[list[str]]]:
        """The first ``max_examples`` transitions of a rollout batch (all of them for None), on the device, and
        their decoded tokens."""
        n = int(batch["rewards"].numel())
        k = n if max_examples is None else min(n, max_examples)
        keys = ("prompt_ids", "prompt_mask", "action_ids", "action_mask", "rewards", "dones")
        sub = {key: batch[key][:k].to(self.device) for key in keys}
        tok = self.model.tokenizer
        tokens = [[tok.decode([int(t)]) for t, m in zip(row, mask) if m]
                  for row, mask in zip(sub["action_ids"].cpu(), sub["action_mask"].cpu())]
        return sub, tokens

    # ---- optimisation ------------------------------------------------------------------------------------------
    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip the gradient norm of every parameter group on its own (policy and critic separately).

        Groups carry their own ``max_grad_norm``. The norm is the whole model's: sharded gradients are summed over
        ranks, replicated ones counted once (:func:`etpo.distributed.global_grad_norm`)."""
        for group in optimizer.param_groups:
            max_norm = group.get("max_grad_norm")
            if not max_norm:
                continue
            # every rank takes part, even without local gradients (the norm is collective when sharded)
            norm = global_grad_norm(group["params"], self.trainer.model)
            self.log(f"charts/grad_norm_{group.get('name', 'group')}", norm, on_step=True, batch_size=1)
            scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.mul_(scale.to(p.grad.dtype))

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        # Post-step bookkeeping lives here rather than in on_train_batch_end: Lightning runs the callbacks' batch-end
        # hooks (ModelCheckpoint) before the module's, and a checkpoint must include this step's effects.
        super().optimizer_step(*args, **kwargs)
        self.after_optimizer_step()
        self.policy_version += 1

    def after_optimizer_step(self) -> None:
        """Subclass hook run right after every optimizer step (e.g. the Polyak update of a target network)."""

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        datamodule = self.trainer.datamodule
        if getattr(datamodule, "collector", None) is not None and datamodule.collector.exhausted:
            self.trainer.should_stop = True  # the environment budget is spent

    # ---- checkpoints -------------------------------------------------------------------------------------------
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
        if getattr(self, "_pending_rng", None) is not None:
            torch.set_rng_state(self._pending_rng)
            self._pending_rng = None
