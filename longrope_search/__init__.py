"""longrope: search LongRoPE's per-dimension RoPE rescale factors for Hugging Face causal LMs."""

__version__ = "0.1.0"
