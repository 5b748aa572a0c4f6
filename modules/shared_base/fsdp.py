"""Sharding the shared-base ETPO model with FSDP: what peft adapters need, and the helpers the trainer calls.

ETPO keeps ONE frozen base LLM with three LoRA adapters (``policy``, ``critic``, ``target``) and reads a fourth view
(the reference) with the adapters disabled (``modules/shared_base/``). Lightning's ``FSDPStrategy`` is FSDP1
(``FullyShardedDataParallel``): every wrapped unit flattens the parameters it manages into one ``FlatParameter`` and
every rank owns one contiguous 1/N slice of it. Four consequences for this model were checked on CPU with the gloo
backend and two or three processes (``tests/test_scale.py``, torch 2.13); none could be checked on a GPU here.

(a) The vocabulary head. ``SharedBaseLM.head`` reads ``lm_head.weight`` directly (a float32-output matmul); it
    does not call ``lm_head.forward``, so FSDP's pre-forward hook of a unit around the head would never fire and the
    head would see its 1-D local shard. The head must therefore NOT be its own FSDP unit. It stays in the *root* unit
    (with the embeddings and the final norm): every forward phase of a module runs inside the root module's forward
    (``AgentModule.run_forward`` through Lightning's forward redirection), FSDP does not reshard the root between
    forward and backward, and so the root's parameters are full for the whole phase -- every ``head(...)`` call of
    a loss and every generation of the rollout sees the full weight (checked: identical logits and samples to the
    unsharded model). Outside such a phase (a callback, an evaluation script) the root is sharded: wrap that code
    in :func:`summon_full_params_if_sharded` (``recurse=False`` is enough for a forward or ``generate``).
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

Where the trainer calls these: ``ETPOModule`` after its optimizer steps -> :func:`polyak_update_sharded`;
``AgentModule.clip_gradients_per_group`` -> :func:`global_grad_norm` (replicated adapters must not have their
squared norms summed over ranks); ``RunArtifacts.on_train_end`` -> :func:`save_adapters_sharded` on every rank.
The Lightning strategy that applies these settings is :class:`modules.strategy.ETPOFSDPStrategy`.
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

from modules.shared_base.views import ADAPTERS, adapter_parameters

__all__ = [
    "ETPOWrapPolicy",
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


def adapter_modules(model: nn.Module, adapters: Sequence[str] = ADAPTERS) -> list[nn.Module]:
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
def polyak_update_sharded(shared: nn.Module, rho: float, root: Optional[nn.Module] = None) -> None:
    """``target <- rho * target + (1 - rho) * critic`` that is exact whether or not the model is sharded.

    Args:
        shared: the :class:`~modules.shared_base.SharedBaseLM` (``self.model`` of the LightningModule).
        rho: Polyak coefficient.
        root: the strategy's wrapped model (``self.trainer.model``); None or an unsharded module means plain
            ``shared.polyak_update(rho)``.

    FSDP1: the pairs are grouped by the unit(s) sharding them and updated inside ``summon_full_params(unit,
    recurse=False, writeback=True)``, one unit at a time (replicated adapters need no gather). FSDP2: DTensors with
    identical placements are updated shard by shard. Collective under FSDP1 sharded adapters: call on every rank,
    outside forward/backward (e.g. right after the optimizer step).
    """
    rho = float(rho)
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

@torch.no_grad()
def full_adapter_state_dict(shared: nn.Module, root: Optional[nn.Module] = None,
                            rank0_only: bool = True) -> dict[str, torch.Tensor]:
    """Full CPU copies of every adapter tensor (policy, critic, target), keyed as in ``shared.state_dict()``
    (``peft_model.base_model.model...``). Gathers FSDP1-sharded adapters one unit at a time; replicated adapters are
    copied as they are. Collective when adapters are sharded: call on every rank; with ``rank0_only`` the other
    ranks get an empty dict."""
    named = [(clean_name(n), p) for a in ADAPTERS for n, p in adapter_parameters(shared, a)]
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

    from modules.shared_base.loading import save_backbone_config

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for adapter in ADAPTERS:
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
