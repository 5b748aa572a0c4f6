"""Merge a trained policy adapter into its base model and save a plain Hugging Face model directory.

    python tools/merge_policy.py --adapters RUN/adapters --out merged/
    python tools/merge_policy.py --adapters RUN/adapters --out merged/ --model configs/model/smollm2.yaml
    python tools/merge_policy.py --adapters RUN/adapters --out merged/ --model.source hf --model.name_or_path DIR

The base model is described by a :class:`modules.shared_base.loading.BackboneConfig`: by default the ``backbone.json`` that
``SharedBaseLM.save_adapters`` wrote next to the adapters, overridden by any ``--model...`` argument. The result
loads with ``AutoModelForCausalLM.from_pretrained(OUT)`` and ``AutoTokenizer.from_pretrained(OUT)`` and computes
the policy view's logits. A GGUF base is de-quantized on load and stripped of its GGUF bookkeeping
(``modules.shared_base.loading.strip_gguf_quantization``) so that it can be saved as safetensors.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable as a script from anywhere
    sys.path.insert(0, str(REPO))


def merge_policy(adapters: str | Path, out: str | Path, config=None, adapter: str = "policy") -> Path:
    """Load the base described by ``config`` (default: ``adapters/backbone.json``), apply
    ``adapters/<adapter>`` with peft, merge it into the weights and save model + tokenizer to ``out``."""
    from peft import PeftModel

    from modules.shared_base.loading import BackboneConfig, load_backbone, read_backbone_config

    adapters = Path(adapters)
    if config is None:
        config = read_backbone_config(adapters) or BackboneConfig()
    base, tokenizer = load_backbone(config)
    with warnings.catch_warnings():
        # peft reads the deprecated `is_gradient_checkpointing` attribute of transformers models.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = PeftModel.from_pretrained(base, str(adapters / adapter))
    merged = peft_model.merge_and_unload()
    merged.config.use_cache = True
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    from jsonargparse import ArgumentParser

    from modules.shared_base.loading import BackboneConfig, read_backbone_config

    argv = list(sys.argv[1:] if argv is None else argv)
    # The saved backbone.json provides the defaults of the --model group, so it must be read before parsing.
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--adapters")
    known, _ = pre.parse_known_args(argv)
    saved = read_backbone_config(known.adapters) if known.adapters else None

    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", required=True, help="folder written by SharedBaseLM.save_adapters")
    parser.add_argument("--out", required=True, help="output folder (model + tokenizer)")
    parser.add_argument("--adapter", default="policy", help="which adapter to merge (policy | critic | target)")
    parser.add_class_arguments(BackboneConfig, "model")
    if saved is not None:
        parser.set_defaults({f"model.{k}": v for k, v in saved.to_dict().items()})
    args = parser.parse_args(argv)
    config = parser.instantiate_classes(args).model
    out = merge_policy(args.adapters, args.out, config, adapter=args.adapter)
    print(f"merged {args.adapter} adapter of {args.adapters} into {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
