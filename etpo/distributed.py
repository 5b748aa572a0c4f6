"""Sharding the shared-base ETPO model with FSDP: what peft adapters need, and the helpers the trainer calls.

ETPO keeps ONE frozen base LLM with three LoRA adapters (``policy``, ``critic``, ``target``) and reads a fourth view
(the reference) with the adapters disabled (``modules/shared_base.py``). Lightning's ``FSDPStrategy`` is FSDP1
(``FullyShardedDataParallel``): every wrapped unit flattens the parameters it manages into one ``FlatParameter`` and
every rank owns one contiguous 1/N slice of it. Four consequences for this model were checked on CPU with the gloo
backend and two or three processes (``tests/test_scale.py``, torch 2.13); none could be checked on a GPU here.

(a) The vocabulary head. ``SharedBaseLM.head`` reads ``lm_head.weight`` directly (a float32-output matmul); it
    does not call ``lm_head.forward``, so FSDP's pre-forward hook of a unit around the head would never fire and the
    head would see its 1-D local shard. The head must therefore NOT be its own FSDP unit. It stays in the *root* unit
    (with the embeddings and the final norm): Lightning runs ``training_step`` inside the root module's forward
    (``Strategy._forward_redirection``), FSDP does not reshard the root between forward and backward, and so the
    root's parameters are full for the whole step -- every ``head(...)`` call of ``ETPOModule.update_loss`` and
    every generation inside ``training_step`` sees the full weight (checked: identical logits and samples to the
    unsharded model). Outside ``training_step`` (a callback, an evaluation script) the root is sharded: wrap such
    code in :func:`summon_full_params_if_sharded` (``recurse=False`` is enough for a forward or ``generate``).
    :class:`ETPOWrapPolicy` wraps the decoder layers only, never the head and never a LoRA sub-module.

(b) The Polyak update ``target <- rho * target + (1 - rho) * critic``. Under ``use_orig_params=True`` the original
    ``nn.Parameter`` objects survive wrapping, but outside forward each one is a view of *this rank's slice* of its
    unit's flat parameter. ``lora_A.target`` and ``lora_A.critic`` of one layer have equal shapes but sit at
    different offsets of that flat parameter, so their local slices generally differ in length and in which elements
    they hold: ``SharedBaseLM.polyak_update`` then raises a size mismatch (seen with 3 ranks) or, when the two
    pieces happen to have equal length, silently averages unrelated elements. Remedies, both implemented here:
    * :func:`polyak_update_sharded` -- per FSDP unit, ``FSDP.summon_full_params(unit, recurse=False,
      writeback=True)`` and the update on the full tensors (peak extra memory: one unit, about 0.4 GB for a
      Llama-7B layer in bf16); a no-op wrapper around ``polyak_update`` when nothing is sharded;
    * ``adapters="replicate"`` (the default of :class:`ETPOFSDPStrategy`): every LoRA sub-module is an FSDP
      *ignored* module -- sharding the 0.24 GB of adapters (7B, r = 8, fp32) saves nothing worth having -- so the
      adapters are ordinary replicated tensors: the Polyak update is local and exact, the adapters stay float32 next
      to a bf16 base (FSDP1 needs one dtype per flat parameter), the frozen units hold no gradient memory (a unit
      mixing frozen and trainable parameters allocates gradients for all of them), and saving adapters needs no
      gather. Their gradients are averaged by the strategy after backward (one all-reduce of ~160 MB).
    With FSDP2 (``fully_shard``) every parameter is sharded on its own along dim 0, so equal-shaped target and
    critic DTensors *do* have aligned local shards and the plain update is exact; :func:`polyak_update_sharded`
    handles DTensors that way.

(c) Generation with a sharded model. Inside ``training_step`` (where the rollout DataModule calls ``act``) the root
    is unsharded and every decoder unit all-gathers its weights on its own forward: correct, but with ``FULL_SHARD``
    the layers are re-gathered for every generated token (about 11 GB received per token step for 7B at N = 8: 7/8
    of the 13.5 GB of bf16 weights). ``sharding_strategy: SHARD_GRAD_OP`` keeps gathered weights until backward
    (generation at single-GPU speed, memory like DDP for the frozen base). FSDP1 forbids forward passes inside
    ``summon_full_params`` of the same unit ("Nor can forward and backward be started from within this context"), so
    "summon everything around ``generate``" is not used for the decoder units. Outside ``training_step``,
    :func:`summon_full_params_if_sharded` with ``recurse=False`` on the root materialises the root unit (embeddings,
    head) and the decoder units gather themselves. With FSDP2 the equivalent is ``module.unshard()`` plus
    ``set_reshard_after_forward(False)`` for the duration of generation.

(d) Saving adapters. ``peft``'s ``save_pretrained`` calls ``model.state_dict()`` unless given a state dict; on an
    FSDP-wrapped model that is a collective, so calling it on rank 0 only deadlocks; given an explicit state dict it
    matches keys against module names that carry FSDP's ``_fsdp_wrapped_module.`` prefix and writes no tensors.
    :func:`save_adapters_sharded` gathers the adapter tensors on every rank and rank 0 writes peft's format itself
    (:func:`write_adapters`; the files load with ``SharedBaseLM.load_adapters`` / ``PeftModel.from_pretrained``).

Where the trainer calls these (see the report of issue 7 for the exact code):
``ETPOModule.after_optimizer_step`` -> :func:`polyak_update_sharded`;
``AgentModule.configure_gradient_clipping`` -> :func:`global_grad_norm` (replicated adapters must not have their
squared norms summed over ranks); ``RunArtifacts.on_train_end`` -> :func:`save_adapters_sharded` on every rank.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "ADAPTER_NAMES",
    "ETPOWrapPolicy",
    "ETPOFSDPStrategy",
    "adapter_modules",
    "allreduce_replicated_gradients",
    "clean_name",
    "decoder_layer_classes",
    "fsdp_auto_wrap_policy",
    "fsdp_kwargs",
    "full_adapter_state_dict",
    "global_grad_norm",
    "is_sharded",
    "polyak_update_sharded",
    "save_adapters_sharded",
    "summon_full_params_if_sharded",
    "write_adapters",
]

ADAPTER_NAMES = ("policy", "critic", "target")
#: sub-modules of a peft LoRA layer that hold adapter weights (one entry per adapter name in each ModuleDict)
_LORA_CONTAINERS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
_FSDP_PREFIX = "_fsdp_wrapped_module."
_CKPT_PREFIX = "_checkpoint_wrapped_module."


# ----------------------------------------------------------------------------------------------------------------
# what to wrap
# ----------------------------------------------------------------------------------------------------------------

def decoder_layer_classes(model: nn.Module, names: Optional[Sequence[str]] = None) -> set[type[nn.Module]]:
    """The module classes that form one FSDP unit each: those named in ``names`` (e.g. ``["LlamaDecoderLayer"]``),
    or by default the ``_no_split_modules`` of every transformers model found inside ``model`` (the decoder layer
    class of that architecture). Matching is by class name, so a config does not import transformers."""
    if names is None:
        wanted: set[str] = set()
        for m in model.modules():
            wanted.update(getattr(m, "_no_split_modules", None) or [])
    else:
        wanted = set(names)
    if not wanted:
        raise ValueError("no decoder layer class known for this model: pass layer_classes (e.g. ['LlamaDecoderLayer'])")
    found = {type(m) for m in model.modules() if type(m).__name__ in wanted}
    if not found:
        raise ValueError(f"none of the layer classes {sorted(wanted)} occurs in the model")
    return found


def adapter_modules(model: nn.Module, adapters: Sequence[str] = ADAPTER_NAMES) -> list[nn.Module]:
    """The leaf modules holding the LoRA weights of ``adapters`` (``lora_A[name]``, ``lora_B[name]``, ... of every
    peft LoRA layer), e.g. to keep them out of FSDP's flat parameters (``ignored_states``)."""
    out = []
    for module in model.modules():
        for container in _LORA_CONTAINERS:
            holder = getattr(module, container, None)
            if isinstance(holder, (nn.ModuleDict, nn.ParameterDict)):
                for name in adapters:
                    if name in holder:
                        out.append(holder[name])
    return out


try:  # the policy base class of FSDP1; absent only in torch builds without distributed support
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy as _ModuleWrapPolicy
except ImportError:  # pragma: no cover
    _ModuleWrapPolicy = object  # type: ignore[assignment,misc]


class ETPOWrapPolicy(_ModuleWrapPolicy):  # type: ignore[misc,valid-type]
    """FSDP1 auto-wrap policy for the shared-base model: one unit per decoder layer; the embeddings, final norm and
    vocabulary head stay in the root unit (see (a) in the module docstring); LoRA sub-modules are never units of
    their own (the target and critic of a layer then share the layer's unit).

    Args:
        layer_classes: class names of the decoder layers (default: the model's ``_no_split_modules``).
    """

    def __init__(self, layer_classes: Optional[Sequence[str]] = None):
        self.layer_names = None if layer_classes is None else list(layer_classes)
        self._module_classes: set = set()
        self._module_classes_str = str(self.layer_names)

    def _resolve(self, root_module: nn.Module) -> tuple[type, ...]:
        self._module_classes = decoder_layer_classes(root_module, self.layer_names)
        self._module_classes_str = str(sorted(c.__name__ for c in self._module_classes))
        return tuple(self._module_classes)

    def _run_policy(self, root_module, ignored_modules, root_kwargs):  # FSDP1's policy interface
        import copy

        classes = self._resolve(root_module)
        return {m: copy.copy(root_kwargs) for m in root_module.modules()
                if m not in ignored_modules and isinstance(m, classes)}

    def __call__(self, module, recurse, *args, **kwargs):  # the legacy callable form (``enable_wrap``/``wrap``)
        if recurse:
            return True
        names = self.layer_names
        if names is None:
            return bool(self._module_classes) and isinstance(module, tuple(self._module_classes))
        return type(module).__name__ in names

    def __repr__(self) -> str:
        return f"ETPOWrapPolicy({self._module_classes_str})"


def fsdp_auto_wrap_policy(model: Optional[nn.Module] = None,
                          layer_classes: Optional[Sequence[str]] = None) -> ETPOWrapPolicy:
    """The auto-wrap policy for ``model`` (decoder layers only; see :class:`ETPOWrapPolicy`). With ``model`` given the
    layer classes are resolved (and checked) now, otherwise when FSDP applies the policy."""
    policy = ETPOWrapPolicy(layer_classes)
    if model is not None:
        policy._resolve(model)
    return policy


def fsdp_kwargs(model: nn.Module, adapters: Literal["replicate", "shard"] = "replicate",
                layer_classes: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Keyword arguments for ``FullyShardedDataParallel(model, **kwargs)`` (or Lightning's ``FSDPStrategy``) for the
    shared-base model: the decoder-layer auto-wrap policy, ``use_orig_params=True`` (peft toggles ``requires_grad``
    per adapter and the optimizer groups are built from the original parameters) and, with
    ``adapters="replicate"``, every LoRA sub-module as an ignored (replicated, unsharded) module."""
    if adapters not in ("replicate", "shard"):
        raise ValueError(f"adapters must be 'replicate' or 'shard', got {adapters!r}")
    kwargs: dict[str, Any] = {"auto_wrap_policy": fsdp_auto_wrap_policy(model, layer_classes), "use_orig_params": True}
    if adapters == "replicate":
        ignored = adapter_modules(model)
        if not ignored:
            raise ValueError("adapters='replicate' but the model has no LoRA adapter modules")
        kwargs["ignored_states"] = ignored
    return kwargs


# ----------------------------------------------------------------------------------------------------------------
# inspecting a (possibly) sharded model
# ----------------------------------------------------------------------------------------------------------------

def _fsdp1_units(module: Optional[nn.Module]) -> list[nn.Module]:
    if module is None:
        return []
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    except ImportError:  # pragma: no cover
        return []
    return [m for m in module.modules() if isinstance(m, FSDP)]


def _is_dtensor(t: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return False
    return isinstance(t, DTensor)


def _is_fsdp2_module(m: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return False
    return isinstance(m, FSDPModule)


def is_sharded(module: Optional[nn.Module]) -> bool:
    """Whether ``module`` contains FSDP1 units or FSDP2 (``fully_shard``) modules."""
    if module is None:
        return False
    return bool(_fsdp1_units(module)) or any(_is_fsdp2_module(m) for m in module.modules())


def _unit_params(unit: nn.Module) -> list[nn.Parameter]:
    """Parameters a FSDP1 unit manages itself: those under its wrapped module, minus nested units and ignored ones."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    ignored = {id(p) for p in getattr(unit, "_ignored_params", ()) or ()}
    out, stack = [], [unit.module]
    while stack:
        m = stack.pop()
        out.extend(p for p in m._parameters.values() if p is not None and id(p) not in ignored)
        stack.extend(c for c in m._modules.values() if c is not None and not isinstance(c, FSDP))
    return out


def _param_owner(root: Optional[nn.Module]) -> dict[int, nn.Module]:
    """``id(param) -> FSDP1 unit`` for every parameter sharded by a unit under ``root`` (empty when none).
    Computed while no unit runs forward (the original parameters are registered then) and cached on ``root``."""
    units = _fsdp1_units(root)
    if not units:
        return {}
    cached = getattr(root, "_etpo_param_owner", None)
    if cached is not None:
        return cached
    owner = {}
    for unit in units:
        for p in _unit_params(unit):
            owner[id(p)] = unit
    root._etpo_param_owner = owner  # type: ignore[union-attr]
    return owner


def _idle(unit: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp._common_utils import TrainingState
    except ImportError:  # pragma: no cover
        return True
    return getattr(unit, "training_state", TrainingState.IDLE) == TrainingState.IDLE


def clean_name(name: str) -> str:
    """A parameter name without FSDP / activation-checkpoint wrapper prefixes."""
    return name.replace(_FSDP_PREFIX, "").replace(_CKPT_PREFIX, "")


# ----------------------------------------------------------------------------------------------------------------
# full parameters on demand
# ----------------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def summon_full_params_if_sharded(module: Optional[nn.Module], *, recurse: bool = True, writeback: bool = False,
                                  rank0_only: bool = False, offload_to_cpu: bool = False,
                                  with_grads: bool = False) -> Iterator[None]:
    """Full (unsharded) parameters of the FSDP1 units in ``module`` for the duration of the block; a no-op when
    nothing is sharded (single device, DDP). ``module`` is typically ``trainer.model`` (= ``trainer.strategy.model``).

    * ``recurse=False``: only the outermost unit(s) -- for the root that is embeddings, final norm and head, which is
      all a forward / ``generate`` outside ``training_step`` needs (decoder units gather on their own forward). Do not
      run a forward of a unit that is itself summoned (FSDP1 forbids it).
    * Units that are in the middle of a forward/backward (the Lightning root during ``training_step``) are skipped:
      their parameters are already full.
    * Collective: every rank must enter the block. ``writeback=True`` keeps changes to the full tensors (each rank
      writes back its own slice; make the same change on every rank).
    * FSDP2 (``fully_shard``) parameters are DTensors: nothing is summoned (read them with ``.full_tensor()``,
      update them in place); ``writeback=True`` raises.
    """
    units = _fsdp1_units(module)
    if not units:
        if writeback and module is not None and any(_is_fsdp2_module(m) for m in module.modules()):
            raise NotImplementedError("FSDP2 modules: update DTensors in place instead of summoning full parameters")
        yield
        return
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if not recurse:
        inner = {id(u2) for u in units for u2 in u.modules() if u2 is not u and isinstance(u2, FSDP)}
        units = [u for u in units if id(u) not in inner]
    if all(_idle(u) for u in units):
        _param_owner(module)  # fill the cache while the original parameters are registered
    with contextlib.ExitStack() as stack:
        for unit in units:
            if _idle(unit):
                stack.enter_context(FSDP.summon_full_params(unit, recurse=False, writeback=writeback,
                                                            rank0_only=rank0_only, offload_to_cpu=offload_to_cpu,
                                                            with_grads=with_grads))
        yield


# ----------------------------------------------------------------------------------------------------------------
# the target network
# ----------------------------------------------------------------------------------------------------------------

def _target_pairs(shared: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    pairs = getattr(shared, "_target_pairs", None)
    if pairs is not None:
        return list(pairs)
    targets, critics = list(shared.target_parameters()), list(shared.critic_parameters())
    if len(targets) != len(critics) or any(t.shape != c.shape for t, c in zip(targets, critics)):
        raise RuntimeError("target and critic adapters do not pair up")
    return list(zip(targets, critics))


@torch.no_grad()
def polyak_update_sharded(shared: nn.Module, rho: Optional[float] = None, root: Optional[nn.Module] = None) -> None:
    """``target <- rho * target + (1 - rho) * critic`` that is exact whether or not the model is sharded.

    Args:
        shared: the :class:`~modules.shared_base.SharedBaseLM` (``self.model`` of the LightningModule).
        rho: Polyak coefficient (default ``shared.config.polyak_rho``).
        root: the strategy's wrapped model (``self.trainer.model``); None or an unsharded module means plain
            ``shared.polyak_update(rho)``.

    FSDP1: the pairs are grouped by the unit(s) sharding them and updated inside ``summon_full_params(unit,
    recurse=False, writeback=True)``, one unit at a time (replicated adapters need no gather). FSDP2: DTensors with
    identical placements are updated shard by shard. Collective under FSDP1 sharded adapters: call on every rank,
    outside forward/backward (e.g. right after the optimizer step).
    """
    rho = float(shared.config.polyak_rho if rho is None else rho)
    owner = _param_owner(root) if root is not None else {}
    pairs = _target_pairs(shared)
    if not owner and not any(_is_dtensor(t) for t, _ in pairs):
        if hasattr(shared, "polyak_update"):
            shared.polyak_update(rho)
        else:
            for t, c in pairs:
                t.mul_(rho).add_(c.to(t.dtype), alpha=1.0 - rho)
        return
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    groups: dict[tuple[int, ...], list] = defaultdict(list)
    units_by_id: dict[int, nn.Module] = {}
    for t, c in pairs:
        units = [owner[id(p)] for p in (t, c) if id(p) in owner]
        for u in units:
            units_by_id[id(u)] = u
        groups[tuple(sorted({id(u) for u in units}))].append((t, c))
    for key, group in groups.items():
        with contextlib.ExitStack() as stack:
            for uid in key:
                stack.enter_context(FSDP.summon_full_params(units_by_id[uid], recurse=False, writeback=True))
            for t, c in group:
                if _is_dtensor(t) and _is_dtensor(c) and t.placements != c.placements:
                    c = c.redistribute(t.device_mesh, t.placements)
                t.mul_(rho).add_(c.to(t.dtype), alpha=1.0 - rho)


# ----------------------------------------------------------------------------------------------------------------
# gradients
# ----------------------------------------------------------------------------------------------------------------

def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def global_grad_norm(params: Iterable[torch.Tensor], root: Optional[nn.Module] = None) -> torch.Tensor:
    """The L2 norm of the gradients of ``params`` over the whole model, sharded or not: squared norms of
    FSDP-sharded gradients (FSDP1 flat-parameter slices, FSDP2 DTensors) are summed over ranks, replicated
    gradients (unsharded model, DDP, adapters replicated by :class:`ETPOFSDPStrategy`) are counted once.
    Collective when ``root`` holds sharded parameters: call on every rank."""
    params = list(params)
    owner = _param_owner(root) if root is not None else {}
    device = next((p.grad.device for p in params if p.grad is not None), None) or (
        params[0].device if params else torch.device("cpu"))
    sharded_sq = torch.zeros((), device=device, dtype=torch.float32)
    replicated_sq = torch.zeros((), device=device, dtype=torch.float32)
    any_sharded = bool(owner)
    for p in params:
        g = p.grad
        if _is_dtensor(p):
            any_sharded = True
        if g is None:
            continue
        if _is_dtensor(g):
            sharded_sq += g.to_local().detach().float().pow(2).sum()
        elif id(p) in owner:
            sharded_sq += g.detach().float().pow(2).sum()
        else:
            replicated_sq += g.detach().float().pow(2).sum()
    if any_sharded and _world() > 1:
        dist.all_reduce(sharded_sq)
    return (sharded_sq + replicated_sq).sqrt()


def allreduce_replicated_gradients(params: Iterable[nn.Parameter], root: Optional[nn.Module] = None) -> int:
    """Average over ranks the gradients of trainable parameters that FSDP does not manage (replicated adapters),
    in one flat all-reduce per dtype. Returns the number of tensors reduced; a no-op on one process.
    Every rank must hold gradients for the same parameters (checked)."""
    world = _world()
    if world == 1:
        return 0
    owner = _param_owner(root) if root is not None else {}
    grads = [p.grad for p in params if p.requires_grad and id(p) not in owner and not _is_dtensor(p)
             and p.grad is not None]
    count = torch.tensor([float(len(grads)), float(sum(g.numel() for g in grads))],
                         device=grads[0].device if grads else _default_device())
    check = count.clone()
    dist.all_reduce(check)
    if not torch.equal(check, count * world):
        raise RuntimeError("ranks hold gradients for different replicated parameters; cannot average them")
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = defaultdict(list)
    for g in grads:
        by_dtype[g.dtype].append(g)
    for group in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in group])
        dist.all_reduce(flat)
        flat.div_(world)
        offset = 0
        for g in group:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
    return len(grads)


def _default_device() -> torch.device:
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ----------------------------------------------------------------------------------------------------------------
# adapters on disk
# ----------------------------------------------------------------------------------------------------------------

def _adapter_named_params(shared: nn.Module) -> list[tuple[str, nn.Parameter]]:
    out = []
    for name, p in shared.named_parameters():
        clean = clean_name(name)
        parts = clean.split(".")
        if any(x.startswith("lora_") for x in parts) and any(a in parts for a in ADAPTER_NAMES):
            out.append((clean, p))
    return out


@torch.no_grad()
def full_adapter_state_dict(shared: nn.Module, root: Optional[nn.Module] = None,
                            rank0_only: bool = True) -> dict[str, torch.Tensor]:
    """Full CPU copies of every adapter tensor (policy, critic, target), keyed as in ``shared.state_dict()``
    (``peft_model.base_model.model...``). Gathers FSDP1-sharded adapters one unit at a time; replicated adapters are
    copied as they are. Collective when adapters are sharded: call on every rank; with ``rank0_only`` the other
    ranks get an empty dict."""
    named = _adapter_named_params(shared)
    owner = _param_owner(root) if root is not None else {}
    keep = not rank0_only or not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    out: dict[str, torch.Tensor] = {}
    by_unit: dict[int, list] = defaultdict(list)
    units: dict[int, nn.Module] = {}
    for name, p in named:
        u = owner.get(id(p))
        if u is None:
            if keep:
                out[name] = (p.full_tensor() if _is_dtensor(p) else p).detach().cpu().clone()
            elif _is_dtensor(p):
                p.full_tensor()  # collective
        else:
            units[id(u)] = u
            by_unit[id(u)].append((name, p))
    if by_unit:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    for uid, items in by_unit.items():
        with FSDP.summon_full_params(units[uid], recurse=False, writeback=False):
            if keep:
                for name, p in items:
                    out[name] = p.detach().cpu().clone()
    return dict(sorted(out.items()))


def write_adapters(shared: nn.Module, state: dict[str, torch.Tensor], directory: str | os.PathLike) -> None:
    """Write ``state`` (from :func:`full_adapter_state_dict`) in peft's on-disk format, as
    ``SharedBaseLM.save_adapters`` does: ``directory/<adapter>/adapter_model.safetensors`` with keys
    ``base_model.model....lora_A.weight`` (adapter name removed), ``adapter_config.json``, and ``backbone.json``.
    (peft's own ``save_pretrained(state_dict=...)`` finds no tensors under FSDP: it matches keys against module
    names that carry FSDP's wrapper prefix.)"""
    from safetensors.torch import save_file

    from modules.loading import save_backbone_config

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for adapter in ADAPTER_NAMES:
        marker = f".{adapter}."
        tensors = {}
        for key, value in state.items():
            if marker not in key:
                continue
            key = key[len("peft_model."):] if key.startswith("peft_model.") else key
            tensors[key.replace(marker, ".")] = value.contiguous()
        folder = directory / adapter
        folder.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        shared.peft_model.peft_config[adapter].save_pretrained(str(folder))
    save_backbone_config(shared.config, directory)


def save_adapters_sharded(shared: nn.Module, directory: str | os.PathLike, root: Optional[nn.Module] = None,
                          is_global_zero: Optional[bool] = None) -> None:
    """``shared.save_adapters(directory)`` that also works under FSDP: call it on EVERY rank; rank 0 writes
    ``directory/{policy,critic,target}`` (peft format) and ``directory/backbone.json``. Unsharded: identical to
    ``shared.save_adapters``."""
    if root is None or not is_sharded(root):
        if is_global_zero is None or is_global_zero:
            shared.save_adapters(directory)
        return
    state = full_adapter_state_dict(shared, root, rank0_only=True)
    if is_global_zero is None:
        is_global_zero = not dist.is_initialized() or dist.get_rank() == 0
    if is_global_zero:
        write_adapters(shared, state, directory)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------------------------------------------
# Lightning strategy
# ----------------------------------------------------------------------------------------------------------------

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

