"""Tiny random models of each supported RoPE family, built in code (no network)."""

from __future__ import annotations

import torch
from transformers import (
    GemmaConfig,
    GemmaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

COMMON = dict(
    vocab_size=320,  # byte-level BPE needs 256 bytes + specials + merges
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    # Phi-3 rotates only part of each head: rotary_dim = 16 * 0.5 = 8
    "phi3": (Phi3Config, Phi3ForCausalLM, {"partial_rotary_factor": 0.5, "original_max_position_embeddings": 64}),
    "gemma": (GemmaConfig, GemmaForCausalLM, {"head_dim": 16}),
}


def tiny_config(family: str = "llama", **overrides):
    config_cls, _, extra = FAMILIES[family]
    kwargs = {**COMMON, **extra, **overrides}
    return config_cls(**kwargs)


def tiny_model(family: str = "llama", seed: int = 0, **overrides):
    """A randomly initialised fp32 model in eval mode, sdpa attention."""
    _, model_cls, _ = FAMILIES[family]
    config = tiny_config(family, **overrides)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return model_cls(config).eval().requires_grad_(False)


def tiny_tokenizer(vocab_size: int = 300):
    """A byte-level BPE tokenizer trained on a few strings; <pad>=0, <s>=1, </s>=2 like the tiny models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(["def f(x):\n    return x + 1\n", "the quick brown fox jumps over the lazy dog"] * 4,
                            trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
