"""Run a GPU config on a machine without CUDA: rewrite the GPU-only trainer settings to CPU equivalents.

``configs/etpo_7b_*.yaml`` ask for CUDA devices, FSDP and several GPUs. On a CUDA-less machine (a laptop, CI) the
same config should still parse and start -- slowly, on the CPU -- so :func:`apply_hardware_fallback` rewrites the
``trainer`` section of a LightningCLI config before the Trainer is built, printing ONE warning line per change::

    etpo.hardware: warning: no CUDA device: trainer.accelerator 'gpu' -> 'cpu'

Rules (only when ``torch.cuda.is_available()`` is False):

=====================================================  ===========
setting                                                becomes
=====================================================  ===========
``accelerator``: gpu / cuda / a CUDA accelerator class  ``cpu``
``devices``: more than one (int > 1, -1, list, "0,1")   ``1``
``num_nodes`` > 1                                       ``1``
``strategy``: FSDP / DDP / DeepSpeed / model parallel    ``auto``
``precision``: any 16-bit flag (bf16-true, 16-mixed..)   ``32-true``
=====================================================  ===========

``ETPO_STRICT_DEVICE=1`` (or ``strict=True``) turns the rewrite into a :class:`HardwareMismatchError` naming every
GPU-only setting, for runs that must not silently fall back. The model layer's own fallbacks are separate and
already in ``modules/shared_base/loading.py`` (``device: auto``, ``dtype: auto``, ``attn_implementation: auto`` -> sdpa; an
explicit ``flash_attention_2`` without flash-attn or CUDA raises a ValueError saying why).

Call it from ``ETPOCLI.before_instantiate_classes`` (``etpo/fit.py``)::

    from etpo.hardware import apply_hardware_fallback
    apply_hardware_fallback(self.config["trainer"])
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any, Callable, MutableMapping, Optional

__all__ = ["HardwareMismatchError", "STRICT_ENV", "apply_hardware_fallback", "gpu_only_settings"]

STRICT_ENV = "ETPO_STRICT_DEVICE"
_GPU_ACCELERATORS = {"gpu", "cuda"}
_PARALLEL = re.compile(r"fsdp|ddp|deepspeed|modelparallel|model_parallel|xla", re.IGNORECASE)
_HALF = {"16", "16-mixed", "16-true", "bf16", "bf16-mixed", "bf16-true", "half"}


class HardwareMismatchError(ValueError):
    """The config asks for GPU-only settings on a machine without CUDA (strict mode)."""


def _get(cfg: Any, key: str) -> Any:
    if isinstance(cfg, MutableMapping) or hasattr(cfg, "get"):
        try:
            return cfg.get(key)
        except Exception:  # jsonargparse Namespace raises on some missing nested keys
            return None
    return getattr(cfg, key, None)


def _class_path(value: Any) -> Optional[str]:
    if isinstance(value, str):
        return value
    if value is None:
        return None
    path = _get(value, "class_path")
    if path:
        return str(path)
    return f"{type(value).__module__}.{type(value).__name__}"


def _many_devices(devices: Any) -> bool:
    if devices is None or devices == "auto":
        return False
    if isinstance(devices, bool):
        return False
    if isinstance(devices, int):
        return devices > 1 or devices == -1
    if isinstance(devices, (list, tuple)):
        return len(devices) > 1
    if isinstance(devices, str):
        text = devices.strip()
        if text in ("-1",) or "," in text.strip(","):
            return True
        return text.isdigit() and int(text) > 1
    return False


def gpu_only_settings(trainer_cfg: Any) -> list[tuple[str, Any, Any]]:
    """``(key, current value, CPU replacement)`` for every GPU-only setting in a trainer config section."""
    changes = []
    accelerator = _get(trainer_cfg, "accelerator")
    acc_name = _class_path(accelerator)
    if acc_name is not None and (acc_name.lower() in _GPU_ACCELERATORS or "cuda" in acc_name.lower()):
        changes.append(("accelerator", acc_name, "cpu"))
    devices = _get(trainer_cfg, "devices")
    if _many_devices(devices):
        changes.append(("devices", devices, 1))
    nodes = _get(trainer_cfg, "num_nodes")
    if isinstance(nodes, int) and nodes > 1:
        changes.append(("num_nodes", nodes, 1))
    strategy = _class_path(_get(trainer_cfg, "strategy"))
    if strategy is not None and _PARALLEL.search(strategy):
        changes.append(("strategy", strategy, "auto"))
    precision = _get(trainer_cfg, "precision")
    if precision is not None and str(precision).lower() in _HALF:
        changes.append(("precision", precision, "32-true"))
    return changes


def apply_hardware_fallback(trainer_cfg: Any, *, cuda_available: Optional[bool] = None, strict: Optional[bool] = None,
                            warn: Optional[Callable[[str], None]] = None) -> list[str]:
    """Rewrite GPU-only settings of ``trainer_cfg`` in place when CUDA is absent; return the warning lines.

    Args:
        trainer_cfg: the ``trainer`` section as LightningCLI holds it (a jsonargparse Namespace or a dict).
        cuda_available: override the detection (tests); default ``torch.cuda.is_available()``.
        strict: raise :class:`HardwareMismatchError` instead of rewriting; default: ``ETPO_STRICT_DEVICE`` is 1/true.
        warn: where each warning line goes (default: one line on stderr).
    """
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    if cuda_available:
        return []
    changes = gpu_only_settings(trainer_cfg)
    if not changes:
        return []
    if strict is None:
        strict = os.environ.get(STRICT_ENV, "").strip().lower() in ("1", "true", "yes", "on")
    if strict:
        listed = ", ".join(f"trainer.{k}={v!r}" for k, v, _ in changes)
        raise HardwareMismatchError(f"no CUDA device on this machine but the config needs one ({listed}); "
                                    f"unset {STRICT_ENV} to fall back to the CPU")
    messages = []
    for key, old, new in changes:
        trainer_cfg[key] = new
        messages.append(f"no CUDA device: trainer.{key} {old!r} -> {new!r}")
    emit = warn or (lambda line: print(f"etpo.hardware: warning: {line}", file=sys.stderr, flush=True))
    for line in messages:
        emit(line)
    return messages
