"""The adapters' life: the Polyak target, adapters on disk (peft format), lean state dicts for checkpoints."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence, Union

import torch
from torch import Tensor

from modules.shared_base.loading import save_backbone_config
from modules.shared_base.views import ADAPTERS

__all__ = ["AdaptersMixin"]


class AdaptersMixin:
    """Target updates and persistence of :class:`~modules.shared_base.SharedBaseLM` (expects ``_params``,
    ``_target_pairs``, ``_base_keys``, ``peft_model`` and ``config``)."""

    # ------------------------------------------------------------------------------------------------------------
    # target network
    # ------------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def polyak_update(self, rho: float) -> None:
        """``target <- rho * target + (1 - rho) * critic`` for every LoRA tensor (the module owns ``rho``; the
        paper's is 0.995)."""
        rho = float(rho)
        for t, c in self._target_pairs:
            t.mul_(rho).add_(c.to(t.dtype), alpha=1.0 - rho)

    @torch.no_grad()
    def sync_target(self) -> None:
        """Copy the critic adapter into the target adapter (done at construction)."""
        for t, c in self._target_pairs:
            t.copy_(c)

    # ------------------------------------------------------------------------------------------------------------
    # persistence
    # ------------------------------------------------------------------------------------------------------------

    def save_adapters(self, directory: Union[str, os.PathLike]) -> None:
        """Write ``directory/{policy,critic,target}`` in peft's format (``adapter_config.json`` +
        ``adapter_model.safetensors``; ``PeftModel.from_pretrained(base, directory / "policy")`` loads the policy)
        and ``directory/backbone.json`` (the :class:`BackboneConfig`, read by ``tools/merge_policy.py``)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        # peft writes every adapter other than "default" to directory/<adapter name>.
        self.peft_model.save_pretrained(str(directory), selected_adapters=list(ADAPTERS))
        save_backbone_config(self.config, directory)

    @torch.no_grad()
    def load_adapters(self, directory: Union[str, os.PathLike], adapters: Sequence[str] = ADAPTERS) -> None:
        """Restore adapters written by :meth:`save_adapters` (or any peft LoRA adapter of the same shape: a
        missing ``target`` folder falls back to a copy of the critic). Raises when rank, alpha or target modules
        differ from this model's."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        directory = Path(directory)
        own = self.peft_model.peft_config["policy"]
        loaded = set()
        for name in adapters:
            folder = directory / name
            if not folder.is_dir():
                if name == "target" and "critic" in loaded:
                    self.sync_target()
                    continue
                raise FileNotFoundError(f"no adapter folder {folder}")
            with open(folder / "adapter_config.json") as f:
                saved = json.load(f)
            mismatch = {
                k: (saved.get(k), v)
                for k, v in (("r", own.r), ("lora_alpha", own.lora_alpha))
                if saved.get(k) != v
            }
            if set(saved.get("target_modules") or []) != set(own.target_modules):
                mismatch["target_modules"] = (saved.get("target_modules"), sorted(own.target_modules))
            if mismatch:
                raise ValueError(f"adapter {folder} does not match this model (saved, expected): {mismatch}")
            weights = folder / "adapter_model.safetensors"
            if weights.is_file():
                state = load_file(str(weights), device=str(self.device))
            else:
                state = torch.load(folder / "adapter_model.bin", map_location=self.device, weights_only=True)
            result = set_peft_model_state_dict(self.peft_model, state, adapter_name=name)
            missing = [k for k in getattr(result, "missing_keys", []) if f".{name}." in k and "lora_" in k]
            if missing:
                raise ValueError(f"adapter {folder} lacks {len(missing)} tensors, e.g. {missing[0]}")
            loaded.add(name)
        self._reset_view()

    def trainable_state_dict(self, prefix: str = "") -> dict[str, Tensor]:
        """The adapter tensors (policy, critic and target), keyed as in ``self.state_dict()`` with ``prefix``
        prepended (e.g. ``"model."`` when this module is the attribute ``model`` of a LightningModule); detached,
        not copied. Everything a checkpoint needs besides the base, which the config reloads."""
        return {prefix + name: p.detach() for a in ADAPTERS for name, p in self._params[a]}

    @torch.no_grad()
    def load_trainable_state_dict(self, state: dict[str, Tensor], strict: bool = True, prefix: str = "") -> None:
        """Copy tensors from :meth:`trainable_state_dict` (called with the same ``prefix``) into the adapters.
        Keys not starting with ``prefix`` are ignored; with ``strict`` every adapter tensor must be present."""
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        params = {name: p for a in ADAPTERS for name, p in self._params[a]}
        unknown = sorted(set(state) - set(params))
        missing = sorted(set(params) - set(state))
        if strict and (unknown or missing):
            raise KeyError(f"trainable state mismatch: {len(missing)} missing (e.g. {missing[:1]}), "
                           f"{len(unknown)} unexpected (e.g. {unknown[:1]})")
        for k, v in state.items():
            if k in params:
                params[k].copy_(v)

    # state_dict hooks: unless config.checkpoint_base_weights, the module's state_dict (and therefore a Lightning
    # checkpoint of any module holding this one) contains only the adapter tensors, and loading such a state dict
    # with strict=True does not complain about the absent base weights, which the config reloads anyway.

    def _state_dict_post_hook(self, state_dict, prefix, local_metadata) -> None:
        if self.config.checkpoint_base_weights:
            return
        n = len(prefix)
        for key in [k for k in state_dict if k.startswith(prefix) and k[n:] in self._base_keys]:
            del state_dict[key]

    def _load_state_dict_pre_hook(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        self._load_prefix = prefix

    def _load_state_dict_post_hook(self, incompatible_keys) -> None:
        prefix, n = self._load_prefix, len(self._load_prefix)
        missing = incompatible_keys.missing_keys
        missing[:] = [k for k in missing if not (k.startswith(prefix) and k[n:] in self._base_keys)]
        self._reset_view()
