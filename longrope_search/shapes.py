"""Model shapes: the sizes of a decoder-only RoPE model that memory and FLOPs depend on, read from a transformers
config or taken from presets of the paper's models (so `longrope plan` works offline).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from longrope_search.errors import ModelError
from longrope_search.model import load_model_config, rope_spec
from longrope_search.rope import RopeSpec


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder-only RoPE model that memory and FLOPs depend on."""

    name: str
    hidden_size: int
    num_layers: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    original_length: int
    rotary_dim: int
    tied_embeddings: bool = False
    fused_projections: bool = False  # Phi-3: q/k/v come from one matmul, gate/up from another
    rope_theta: float = 10000.0  # RoPE's base: with rotary_dim and original_length, what `longrope info` shows

    @property
    def rope(self) -> RopeSpec:
        """The RoPE geometry, so a preset serves `info` as it serves `plan` (offline)."""
        return RopeSpec(base=self.rope_theta, rotary_dim=self.rotary_dim, original_length=self.original_length)

    @property
    def layer_linear_params(self) -> int:
        attention = self.hidden_size * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)  # q, o, k, v
        return attention + 3 * self.hidden_size * self.intermediate_size

    @property
    def params(self) -> int:
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tied_embeddings else 2)
        norms = (2 * self.num_layers + 1) * self.hidden_size
        return self.num_layers * self.layer_linear_params + embeddings + norms

    @property
    def matmul_params(self) -> int:
        """Weights each token multiplies through: every linear layer and the lm_head (not the lookup)."""
        return self.num_layers * self.layer_linear_params + self.vocab_size * self.hidden_size


def _llama_like(name: str, hidden: int, layers: int, intermediate: int, heads: int, kv_heads: int, vocab: int,
                original: int, **extra: Any) -> ModelShape:
    head_dim = hidden // heads
    return ModelShape(name, hidden, layers, intermediate, heads, kv_heads, head_dim, vocab, original, head_dim, **extra)


PRESETS: dict[str, ModelShape] = {
    "llama2-7b": _llama_like("llama2-7b", 4096, 32, 11008, 32, 32, 32000, 4096),
    "llama3-8b": _llama_like("llama3-8b", 4096, 32, 14336, 32, 8, 128256, 8192, rope_theta=500000.0),
    "mistral-7b": _llama_like("mistral-7b", 4096, 32, 14336, 32, 8, 32000, 8192),  # trained on 8k, declares 32k
    "phi3-mini": _llama_like("phi3-mini", 3072, 32, 8192, 32, 32, 32064, 4096, fused_projections=True),
}
# The hub ids of configs/*.yaml, so `longrope plan --config configs/llama2-7b.yaml` works offline.
HUB_PRESETS = {
    "meta-llama/Llama-2-7b-hf": "llama2-7b",
    "meta-llama/Meta-Llama-3-8B": "llama3-8b",
    "mistralai/Mistral-7B-v0.1": "mistral-7b",
    "microsoft/Phi-3-mini-4k-instruct": "phi3-mini",
}


def shape_from_config(config: Any, name: str) -> ModelShape:
    """ModelShape of a transformers config (what `model.load_model_config` returns)."""
    missing = [k for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                           "vocab_size") if getattr(config, k, None) is None]
    if missing:
        raise ModelError(f"the config of {name!r} has no {', '.join(missing)}; plan needs a decoder-only RoPE model.")
    spec = rope_spec(config)
    heads = config.num_attention_heads
    return ModelShape(
        name=name, hidden_size=config.hidden_size, num_layers=config.num_hidden_layers,
        intermediate_size=config.intermediate_size, num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        vocab_size=config.vocab_size, original_length=spec.original_length, rotary_dim=spec.rotary_dim,
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        fused_projections=getattr(config, "model_type", "") == "phi3", rope_theta=spec.base,
    )


def model_shape(name: str) -> ModelShape:
    """A preset (llama2-7b, ...), one of their hub ids, or anything `model.load_model_config` reads."""
    if name in PRESETS or name in HUB_PRESETS:
        return PRESETS[HUB_PRESETS.get(name, name)]
    if "/" not in name and ":" not in name and not name.startswith((".", "~")):
        near = difflib.get_close_matches(name, list(PRESETS), n=1)
        hint = f"did you mean {near[0]}? " if near else ""
        raise ModelError(
            f"unknown model preset {name!r}; {hint}use one of {', '.join(PRESETS)}, a local model directory or a hub id."
        )
    return shape_from_config(load_model_config(name), name)
