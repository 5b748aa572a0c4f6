"""Which view a forward pass computes: switching peft adapters on the one frozen base.

=============  ===========================================  ==========================================
view           what it is                                   how it is realised
=============  ===========================================  ==========================================
``policy``     pi_theta, trained                            base + LoRA adapter ``"policy"``
``critic``     Q_phi (logits = Q of every next token)       base + LoRA adapter ``"critic"``
``target``     Q_phibar, Polyak average of the critic        base + LoRA adapter ``"target"`` (frozen)
``reference``  pi_bar, frozen                               base with every adapter disabled
=============  ===========================================  ==========================================
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

from torch import nn

__all__ = ["ADAPTERS", "FROZEN_VIEWS", "VIEWS", "ViewsMixin", "adapter_parameters"]

VIEWS = ("policy", "critic", "target", "reference")
ADAPTERS = ("policy", "critic", "target")
FROZEN_VIEWS = ("target", "reference")


def adapter_parameters(module: nn.Module, adapter: str, trainable_only: bool = False) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of every LoRA tensor of the peft adapter ``adapter`` inside ``module``.

    Found by name (``...lora_A.<adapter>.weight``), so it works on the model layer itself and on a strategy's
    wrapped model (``trainer.model``: FSDP prefixes included), whose parameters are the ones an optimizer must step.
    The one adapter-parameter finder of the project."""
    out = []
    for name, p in module.named_parameters():
        parts = name.split(".")
        if adapter in parts and any(part.startswith("lora_") for part in parts):
            if not trainable_only or p.requires_grad:
                out.append((name, p))
    return out


class ViewsMixin:
    """Adapter switching for :class:`~modules.shared_base.SharedBaseLM` (expects ``peft_model`` and ``_params``)."""

    _active: Optional[str]
    _view: str

    def policy_parameters(self) -> list[nn.Parameter]:
        """The trainable LoRA weights of the policy adapter."""
        return [p for _, p in self._params["policy"]]

    def critic_parameters(self) -> list[nn.Parameter]:
        """The trainable LoRA weights of the critic adapter (disjoint from the policy's)."""
        return [p for _, p in self._params["critic"]]

    def target_parameters(self) -> list[nn.Parameter]:
        """The frozen LoRA weights of the target adapter (changed only by :meth:`polyak_update`)."""
        return [p for _, p in self._params["target"]]

    def _fix_requires_grad(self) -> None:
        # peft's set_adapter / disable_adapter set requires_grad=False on every inactive adapter. A graph built
        # through the policy view would then silently lose its gradients if the critic view is activated before
        # backward (AccumulateGrad skips leaves whose requires_grad is False), so the flags are restored after
        # every switch.
        for a, flag in (("policy", True), ("critic", True), ("target", False)):
            for _, p in self._params[a]:
                if p.requires_grad != flag:
                    p.requires_grad_(flag)

    def _reset_view(self) -> None:
        # After peft touched adapter state behind our back (loading): re-activate the policy from scratch.
        self._active = None
        self._activate("policy")
        self._view = "policy"

    def _activate(self, adapter: str) -> None:
        if self._active != adapter:
            self.peft_model.set_adapter(adapter)
            self._active = adapter
            self._fix_requires_grad()

    @contextlib.contextmanager
    def use_view(self, view: str) -> Iterator[None]:
        """Context in which forward passes of the peft model compute ``view`` (one of :data:`VIEWS`).

        Scoring methods use it internally; it is public for callers that need the raw model (e.g. a custom
        forward). It does not switch off gradients; the scoring methods do that for target and reference.
        An adapter view stays active after the block (harmless: every scoring call activates its own view).
        """
        if view not in VIEWS:
            raise ValueError(f"unknown view {view!r}; use one of {VIEWS}")
        if view == "reference":
            if self._view == "reference":  # nested
                yield
                return
            try:
                with self.peft_model.disable_adapter():
                    self._view = "reference"
                    yield
            finally:
                self._view = self._active
                self._fix_requires_grad()
        else:
            if self._view == "reference":
                # peft keeps every adapter disabled until the reference block ends
                raise RuntimeError(f"cannot compute the {view!r} view inside a use_view('reference') block")
            self._activate(view)
            self._view = view
            yield

    # Gradient checkpointing recomputes each block during backward, when another view may be active (the policy
    # and critic graphs of one step may share one backward). torch's non-reentrant checkpoint accepts a context_fn
    # whose second context wraps the recomputation: it re-activates the view that the original forward ran under.

    def _checkpoint_contexts(self):
        return contextlib.nullcontext(), self._replay_view(self._view)

    @contextlib.contextmanager
    def _replay_view(self, view: str) -> Iterator[None]:
        previous = self._view
        if view == previous:
            yield
            return
        with self.use_view(view):
            yield
        if previous != "reference":
            self._activate(previous)
            self._view = previous

    def _enable_checkpointing(self, model) -> None:
        kwargs = {"use_reentrant": False, "context_fn": self._checkpoint_contexts}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
