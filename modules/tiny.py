"""Tiny in-process models and tokenizers for tests and learning checks (no downloads).

* :func:`char_tokenizer` builds a character-level ``PreTrainedTokenizerFast`` (one token per character,
  special tokens ``<pad>`` / ``<s>`` / ``</s>`` / ``<unk>``, BOS prepended to every encoded text unless
  ``add_special_tokens=False``, decoding joins characters without separators).
* :func:`tiny_llama` builds a randomly initialised ``LlamaForCausalLM`` of a few thousand parameters whose
  vocabulary matches such a tokenizer.
"""

from __future__ import annotations

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

DEFAULT_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789 .,:;!?'\"()[]{}=+-*/_<>\n"
PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)  # ids 0, 1, 2, 3 in this order


def char_tokenizer(alphabet: str = DEFAULT_ALPHABET, *, add_bos: bool = True) -> PreTrainedTokenizerFast:
    """Character-level tokenizer over ``alphabet``: ids 0..3 are ``<pad> <s> </s> <unk>``, then one id per
    distinct character in the order of first appearance. Unknown characters map to ``<unk>``.

    Padding side is left (batched generation), the pad token is the dedicated ``<pad>`` (id 0).
    With ``add_bos`` every encoded text starts with ``<s>`` (as Llama tokenizers do) so that an empty
    prompt still has one token to condition on.
    """
    chars = list(dict.fromkeys(alphabet))  # dedupe, keep order
    if any(c in SPECIAL_TOKENS for c in chars):
        raise ValueError("the alphabet must consist of single characters")
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for c in chars:
        vocab[c] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Every character is its own "word" ([\s\S] rather than "." so that newlines are split off too).
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    # Fuse concatenates the token strings: the default decoder would put spaces between characters.
    backend.decoder = decoders.Fuse()
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
        )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    return tok


def tiny_llama(
    vocab_size: int,
    *,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 64,
    max_position_embeddings: int = 512,
    init_std: float = 0.02,
    seed: int = 0,
    pad_token_id: int = 0,
    bos_token_id: int = 1,
    eos_token_id: int = 2,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
) -> LlamaForCausalLM:
    """A randomly initialised Llama causal LM (weights drawn from ``seed`` without touching the global RNG).

    Same architecture family as SmolLM2 / CodeLlama (RMSNorm, RoPE, GQA, SwiGLU), so LoRA target modules and
    every code path of :class:`modules.shared_base.SharedBaseLM` are exercised.
    """
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        initializer_range=init_std,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        tie_word_embeddings=False,
    )
    config._attn_implementation = attn_implementation
    # fork_rng: building a test model must not change the random stream of the code under test.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()
