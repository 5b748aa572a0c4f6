"""The shared-base model: one frozen LLM with policy / critic / target LoRA adapters and the reference view."""

from modules.shared_base.generation import Generation
from modules.shared_base.loading import BackboneConfig
from modules.shared_base.model import SharedBaseLM, resident_weight_bytes
from modules.shared_base.views import ADAPTERS, VIEWS, adapter_parameters

__all__ = ["ADAPTERS", "VIEWS", "BackboneConfig", "Generation", "SharedBaseLM", "adapter_parameters",
           "resident_weight_bytes"]
