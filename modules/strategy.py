"""The Lightning strategy for sharding the shared-base model with FSDP (FSDP1, Lightning's ``FSDPStrategy``).

What sharding a peft model needs, and the helpers this strategy applies, are in :mod:`modules.shared_base.fsdp`.
Besides wrapping, precision and adapter-only checkpoints, the strategy runs the modules' manual optimisation the
way FSDP1 allows it: Lightning calls ``training_step`` inside the root module's forward, and a backward started
there is not supported (pytorch-lightning #19685, #19626) -- with torch 2.13 on CPU it raises nothing but leaves
some gradients unset and others wrong (shown in tests/test_scale.py::test_fsdp_adapters_on_two_cpu_ranks). So
:class:`ETPOFSDPStrategy` calls ``training_step`` directly and the module routes each forward phase through the
root (``AgentModule.run_forward``), its backward following outside it.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Literal, Optional

import torch
import torch.distributed as dist
from torch import nn

from modules.shared_base.fsdp import (_param_owner, _world, allreduce_replicated_gradients, clean_name,
                                      decoder_layer_classes, fsdp_kwargs)

__all__ = ["ETPOFSDPStrategy"]


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def _dtype(name: Optional[str]) -> Optional[torch.dtype]:
    if name is None:
        return None
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(_DTYPES)}") from None


try:
    from lightning.pytorch.plugins.precision import FSDPPrecision as _FSDPPrecision
    from lightning.pytorch.strategies import FSDPStrategy as _FSDPStrategy
except ImportError:  # pragma: no cover
    _FSDPPrecision = object  # type: ignore[assignment,misc]
    _FSDPStrategy = object  # type: ignore[assignment,misc]


class _ModelDtypePrecision(_FSDPPrecision):  # type: ignore[misc,valid-type]
    """FSDP precision plugin for ``precision: 32-true`` that leaves the model's dtypes alone.

    The model layer chooses them (``backbone.dtype``: bf16 base on CUDA; peft keeps LoRA adapters in float32);
    Lightning's own ``32-true`` would cast the whole module to float32 and make FSDP compute in float32. FSDP mixed
    precision comes only from the strategy's ``param_dtype`` / ``reduce_dtype`` / ``buffer_dtype``."""

    def __init__(self, mixed_precision=None):
        super().__init__("32-true")
        self._mixed = mixed_precision

    def convert_module(self, module: nn.Module) -> nn.Module:
        return module

    @property
    def mixed_precision_config(self):
        return self._mixed

    def tensor_init_context(self):
        return contextlib.nullcontext()

    def module_init_context(self):
        return contextlib.nullcontext()

    def forward_context(self):
        return contextlib.nullcontext()


class ETPOFSDPStrategy(_FSDPStrategy):  # type: ignore[misc,valid-type]
    """Lightning's ``FSDPStrategy`` configured for the shared-base ETPO model (YAML-friendly: only strings, numbers
    and lists; classes are resolved against the model when it is wrapped).

    Args:
        adapters: ``replicate`` (default): LoRA sub-modules are FSDP-ignored -- replicated float32 tensors whose
            gradients this strategy averages after backward; ``shard``: adapters are flattened with their layer
            (needs one dtype per unit, i.e. ``backbone.dtype: float32`` with ``param_dtype: bfloat16``; the target
            update then needs :func:`polyak_update_sharded`, and every decoder unit holds a gradient shard for its
            frozen weights too).
        layer_classes: decoder layer class names, one FSDP unit each (default: the model's ``_no_split_modules``).
        sharding_strategy: ``FULL_SHARD`` (least memory; re-gathers layers for every generated token),
            ``SHARD_GRAD_OP`` (gathered weights kept from forward to backward: fast generation, base memory like
            DDP), ``HYBRID_SHARD`` (FULL_SHARD inside a node, replicated across nodes), ``NO_SHARD``.
        use_orig_params: must stay True (peft's per-adapter ``requires_grad`` and the optimizer's parameter groups).
        limit_all_gathers: at most two layers gathered ahead (caps unsharded memory).
        backward_prefetch: ``BACKWARD_PRE`` | ``BACKWARD_POST`` | null.
        forward_prefetch: issue the next layer's all-gather before the current forward.
        activation_checkpointing_layers: class names to wrap in FSDP's activation-checkpoint wrapper. Leave null when
            the model layer checkpoints itself (``backbone.gradient_checkpointing: true``); never both.
        param_dtype, reduce_dtype, buffer_dtype: FSDP mixed precision (null = keep the stored dtype). Only useful with
            ``adapters: shard`` and a float32 model.
        cpu_offload: offload parameter shards to host memory.
        state_dict_type: ``full`` or ``sharded`` checkpoints. ``full`` with replicated adapters writes
            adapters-only checkpoint files without any gather (unless ``backbone.checkpoint_base_weights``);
            ``sharded`` uses Lightning's distributed checkpoint of the whole model.
        Other keyword arguments go to Lightning's ``FSDPStrategy``.

    Trainer ``precision`` must be ``32-true``, meaning "Lightning does not cast": ``bf16-true`` would cast the float32
    adapters to bf16 (where a Polyak step of 0.5 % is below bf16 resolution and the target never moves) and
    ``bf16-mixed`` autocasts the float32-output vocabulary head back to bf16 logits.
    """

    def __init__(
        self,
        adapters: Literal["replicate", "shard"] = "replicate",
        layer_classes: Optional[list[str]] = None,
        sharding_strategy: str = "FULL_SHARD",
        use_orig_params: bool = True,
        limit_all_gathers: bool = True,
        backward_prefetch: Optional[str] = "BACKWARD_PRE",
        forward_prefetch: bool = False,
        activation_checkpointing_layers: Optional[list[str]] = None,
        param_dtype: Optional[str] = None,
        reduce_dtype: Optional[str] = None,
        buffer_dtype: Optional[str] = None,
        cpu_offload: bool = False,
        state_dict_type: Literal["full", "sharded"] = "full",
        **kwargs: Any,
    ) -> None:
        if adapters not in ("replicate", "shard"):
            raise ValueError(f"adapters must be 'replicate' or 'shard', got {adapters!r}")
        if not use_orig_params:
            raise ValueError("use_orig_params must be True: peft mixes frozen and trainable parameters and switches "
                             "requires_grad per adapter; the optimizer groups are built from the original parameters")
        from torch.distributed.fsdp import BackwardPrefetch

        self.adapters = adapters
        self.layer_classes = layer_classes
        self.activation_checkpointing_layers = activation_checkpointing_layers
        self._mixed = None
        if any(x is not None for x in (param_dtype, reduce_dtype, buffer_dtype)):
            from torch.distributed.fsdp import MixedPrecision

            self._mixed = MixedPrecision(param_dtype=_dtype(param_dtype), reduce_dtype=_dtype(reduce_dtype),
                                         buffer_dtype=_dtype(buffer_dtype))
        prefetch = None if backward_prefetch is None else BackwardPrefetch[backward_prefetch]
        super().__init__(sharding_strategy=sharding_strategy, cpu_offload=cpu_offload, state_dict_type=state_dict_type,
                         use_orig_params=True, limit_all_gathers=limit_all_gathers, backward_prefetch=prefetch,
                         forward_prefetch=forward_prefetch, **kwargs)

    # -- precision: the model layer owns the dtypes --------------------------------------------------------------
    @property
    def precision_plugin(self):
        plugin = self._precision_plugin
        return plugin if plugin is not None else _ModelDtypePrecision(getattr(self, "_mixed", None))

    @precision_plugin.setter
    def precision_plugin(self, plugin) -> None:
        if plugin is not None and not isinstance(plugin, _ModelDtypePrecision):
            precision = getattr(plugin, "precision", None)
            if precision != "32-true":
                raise ValueError(
                    f"ETPOFSDPStrategy needs trainer precision '32-true' (got {precision!r}): the model layer sets the "
                    "dtypes (backbone.dtype auto = bf16 base on CUDA, float32 LoRA adapters); 'bf16-true' would cast "
                    "the adapters to bf16, where the Polyak target stops moving, and '*-mixed' autocasts the float32 "
                    "vocabulary head. Use precision: 32-true (and param_dtype for FSDP mixed precision).")
            plugin = _ModelDtypePrecision(getattr(self, "_mixed", None))
        self._precision_plugin = plugin

    # -- wrapping -------------------------------------------------------------------------------------------------
    def _setup_model(self, model: nn.Module) -> nn.Module:
        kwargs = fsdp_kwargs(model, self.adapters, self.layer_classes)
        if self.adapters == "shard":
            dtypes = {p.dtype for p in model.parameters()}
            if len(dtypes) > 1:
                raise ValueError(f"adapters='shard' needs one parameter dtype per FSDP unit, the model has "
                                 f"{sorted(str(d) for d in dtypes)}: set backbone.dtype: float32 (and param_dtype: "
                                 "bfloat16), or use adapters: replicate")
        self.kwargs.update(kwargs)
        if self.activation_checkpointing_layers:
            if any(getattr(m, "gradient_checkpointing", False) for m in model.modules()):
                raise ValueError("activation_checkpointing_layers is set but the model already checkpoints its layers "
                                 "(backbone.gradient_checkpointing: true); use one of the two")
            from torch.distributed.fsdp.wrap import ModuleWrapPolicy

            classes = decoder_layer_classes(model, self.activation_checkpointing_layers)
            self._activation_checkpointing_kwargs = {"auto_wrap_policy": ModuleWrapPolicy(classes)}
        wrapped = super()._setup_model(model)
        if self.adapters == "replicate" and _world() > 1:
            with torch.no_grad():  # identical replicas from the start (they are seeded alike; this makes it certain)
                for m in kwargs["ignored_states"]:
                    for p in m.parameters():
                        dist.broadcast(p.data, src=0)
        return wrapped

    # -- manual optimisation: training_step outside the root forward, each phase inside it ------------------------
    #: read by AgentModule.run_forward: route every forward phase through the root module's forward
    redirects_module_forward = True

    def training_step(self, *args: Any, **kwargs: Any):
        module = self.lightning_module
        if module.automatic_optimization:
            return super().training_step(*args, **kwargs)
        with self.precision_plugin.train_step_context():
            return module.training_step(*args, **kwargs)

    # -- replicated adapters: average their gradients after every backward ----------------------------------------
    def post_backward(self, closure_loss: torch.Tensor) -> None:
        super().post_backward(closure_loss)
        if self.adapters == "replicate" and self.model is not None:
            allreduce_replicated_gradients(self.model.parameters(), self.model)

    # -- checkpoints: adapters only (the frozen base is reloaded from its source) ---------------------------------
    def _adapters_only(self) -> bool:
        if self.adapters != "replicate" or self._state_dict_type != "full" or self.lightning_module is None:
            return False
        model = getattr(self.lightning_module, "model", None)
        return not getattr(getattr(model, "config", None), "checkpoint_base_weights", False)

    def lightning_module_state_dict(self) -> dict[str, Any]:
        if not self._adapters_only():
            return super().lightning_module_state_dict()
        owner = _param_owner(self.model)
        return {clean_name(n): p.detach() for n, p in self.lightning_module.named_parameters()
                if id(p) not in owner}

    def optimizer_state(self, optimizer) -> dict[str, Any]:
        if not self._adapters_only():
            return super().optimizer_state(optimizer)
        from lightning.pytorch.core.optimizer import LightningOptimizer

        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        return optimizer.state_dict()

    def load_checkpoint(self, checkpoint_path, weights_only: Optional[bool] = None) -> dict[str, Any]:
        if not self._adapters_only():
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        from lightning.pytorch.trainer.states import TrainerFn

        path = Path(self.broadcast(checkpoint_path))
        checkpoint = torch.load(path, map_location="cpu", weights_only=False if weights_only is None else weights_only)
        state = checkpoint.pop("state_dict")
        params = {clean_name(n): p for n, p in self.lightning_module.named_parameters()}
        missing = [k for k in state if k not in params]
        if missing:
            raise KeyError(f"checkpoint tensors not in the model: {missing[:3]} ...")
        with torch.no_grad():
            for k, v in state.items():
                params[k].copy_(v)
        optimizer_states = checkpoint.pop("optimizer_states", None)
        if optimizer_states is not None and self.lightning_module.trainer.state.fn == TrainerFn.FITTING:
            for optimizer, opt_state in zip(self.optimizers, optimizer_states):
                optimizer.load_state_dict(opt_state)
        return checkpoint

