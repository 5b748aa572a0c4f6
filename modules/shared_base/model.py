"""The model layer: one frozen base LLM serving the four views ETPO needs.

``SharedBaseLM`` composes one room per job -- :mod:`~modules.shared_base.views` (which adapter a forward uses),
:mod:`~modules.shared_base.scoring` (hidden states, the vocabulary head, shared prefixes once),
:mod:`~modules.shared_base.generation` (sampling), :mod:`~modules.shared_base.adapters` (Polyak target, saving,
lean state dicts) -- over a base loaded by :mod:`~modules.shared_base.loading`. Sharding helpers for FSDP live
beside it in :mod:`~modules.shared_base.fsdp`.

LoRA ``B`` matrices start at zero, so at initialisation all four views compute exactly the base model's logits. The
base weights exist once in memory; the adapters add ``3 * r * (d_in + d_out)`` numbers per adapted linear layer.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn

from modules.shared_base.adapters import AdaptersMixin
from modules.shared_base.generation import GenerationMixin
from modules.shared_base.loading import BackboneConfig, load_backbone, prepare_tokenizer
from modules.shared_base.scoring import ScoringMixin
from modules.shared_base.views import ADAPTERS, ViewsMixin, adapter_parameters

__all__ = ["SharedBaseLM", "resident_weight_bytes"]


def resident_weight_bytes(module: nn.Module) -> int:
    """Bytes of all parameters and buffers of ``module``, each underlying storage counted once (tied or
    shared weights are not double counted)."""
    seen: dict[tuple, int] = {}
    for t in list(module.parameters()) + list(module.buffers()):
        storage = t.untyped_storage()
        seen[(t.device.type, t.device.index, storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


class SharedBaseLM(ViewsMixin, ScoringMixin, GenerationMixin, AdaptersMixin, nn.Module):
    """One frozen base model, LoRA adapters ``policy`` / ``critic`` / ``target``, and the reference (no adapter).

    ``SharedBaseLM(config)`` loads the base as described by :class:`~modules.shared_base.BackboneConfig`;
    ``SharedBaseLM(config, model=..., tokenizer=...)`` wraps an already loaded transformers causal LM (whose
    parameters are then frozen in place; it must not be used elsewhere afterwards).

    Gradients: ``policy_parameters()`` and ``critic_parameters()`` always have ``requires_grad=True`` -- also
    right after a forward through another view -- so losses on both views can share one backward. ``target`` and
    base parameters never require grad, and the ``target`` / ``reference`` views always run under ``no_grad``.
    """

    def __init__(self, config: Optional[BackboneConfig] = None, *, model=None, tokenizer=None):
        super().__init__()
        from peft import LoraConfig, get_peft_model

        self.config = config if config is not None else BackboneConfig()
        cfg = self.config
        if model is None:
            model, tokenizer = load_backbone(cfg)
        else:
            if tokenizer is None:
                raise ValueError("pass the tokenizer together with the model")
            model.eval()
            model.requires_grad_(False)
            prepare_tokenizer(tokenizer, model)
        self.tokenizer = tokenizer
        self._active: Optional[str] = None  # the adapter peft has active
        self._view: str = "policy"  # the view forward passes compute right now
        if cfg.gradient_checkpointing:
            self._enable_checkpointing(model)

        lora = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=list(cfg.lora_target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        )
        # The random LoRA-A initialisation is drawn from cfg.seed, not from whatever the global RNG holds.
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            # peft reads the deprecated `is_gradient_checkpointing` attribute of transformers models.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            torch.manual_seed(cfg.seed)
            self.peft_model = get_peft_model(model, lora, adapter_name="policy")
            self.peft_model.add_adapter("critic", lora)
            self.peft_model.add_adapter("target", lora)

        self._params: dict[str, list[tuple[str, nn.Parameter]]] = {a: adapter_parameters(self, a) for a in ADAPTERS}
        n = {a: len(v) for a, v in self._params.items()}
        if not n["policy"] or len(set(n.values())) != 1:
            raise RuntimeError(f"unexpected LoRA parameter layout {n}; check lora_target_modules")
        # Pairs (target, critic) by name, for the Polyak update and for syncing.
        critic_by_name = dict(self._params["critic"])
        self._target_pairs = []
        for name, p in self._params["target"]:
            parts = name.split(".")
            parts[parts.index("target")] = "critic"
            self._target_pairs.append((p, critic_by_name[".".join(parts)]))
        self.sync_target()

        self._activate("policy")

        # state_dict bookkeeping (see _state_dict_post_hook): computed before the hooks exist.
        self._adapter_keys = {name for a in ADAPTERS for name, _ in self._params[a]}
        self._base_keys = set(self.state_dict(keep_vars=True).keys()) - self._adapter_keys
        self._load_prefix = ""
        self.register_state_dict_post_hook(SharedBaseLM._state_dict_post_hook)
        self.register_load_state_dict_pre_hook(SharedBaseLM._load_state_dict_pre_hook)
        self.register_load_state_dict_post_hook(SharedBaseLM._load_state_dict_post_hook)

    # ------------------------------------------------------------------------------------------------------------
    # basic properties
    # ------------------------------------------------------------------------------------------------------------

    @property
    def base_model(self):
        """The transformers causal LM (its adapted linear layers are peft LoRA layers)."""
        return self.peft_model.get_base_model()

    @property
    def _decoder(self) -> nn.Module:
        # The inner decoder (e.g. LlamaModel): called directly so that no logits are computed over the prompt.
        base = self.base_model
        return getattr(base, base.base_model_prefix)

    @property
    def _lm_head(self) -> nn.Module:
        return self.base_model.get_output_embeddings()

    @property
    def device(self) -> torch.device:
        return self._lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the base weights (and of hidden states)."""
        return self._lm_head.weight.dtype

    @property
    def vocab_size(self) -> int:
        """Rows of the vocabulary head (may exceed ``len(tokenizer)``)."""
        return self._lm_head.weight.shape[0]

    @property
    def hidden_size(self) -> int:
        return self._lm_head.weight.shape[1]

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def eos_token_ids(self) -> list[int]:
        """Every token id that ends an action: the tokenizer's EOS plus those of the generation config."""
        ids = [self.tokenizer.eos_token_id]
        extra = getattr(getattr(self.base_model, "generation_config", None), "eos_token_id", None)
        if extra is not None:
            ids += extra if isinstance(extra, (list, tuple)) else [extra]
        return sorted({int(i) for i in ids if i is not None})
