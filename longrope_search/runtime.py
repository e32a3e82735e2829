"""Run searched factors in Python exactly as searched (n_hat and mscale included), which no config.json can express.

`apply(model, factors_path)` swaps the model's rotary embedding for one that picks short or long factors per
forward, like transformers' longrope, and applies n_hat to the long ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from longrope_search.errors import ModelError
from longrope_search.factors import FactorsFile, check_geometry, load_factors
from longrope_search.model import LongRopeRotaryEmbedding, rope_spec, rotary_owner
from longrope_search.rope import RopeSpec
from longrope_search.rundir import EXPORT_FACTORS_FILE, FACTORS_FILE

Mode = Literal["auto", "long"]
MODES = ("auto", "long")


class ShortLongRotaryEmbedding(nn.Module):
    """Short factors while a forward's positions fit the original window, long factors (with n_hat) past it.

    mode "auto" decides per forward from `position_ids.max() + 1 > original_length`, as transformers' longrope
    does. With a KV cache this switches mid-generation: keys cached before the switch stay rotated with the
    short factors while new queries use the long ones (transformers' Phi3ForCausalLM re-encodes the prompt at
    the crossing; Llama, Mistral, Qwen and Gemma do not), and n_hat only reaches keys encoded in a long forward.
    This is exactly what an exported model does in transformers. mode "long" always uses the long factors (and
    n_hat), as vLLM >= 0.12 does whenever --max-model-len exceeds the original window.
    mscale multiplies cos/sin for both sets, as transformers' attention_factor does.
    """

    def __init__(
        self,
        spec: RopeSpec,
        short_factors: list[float],
        long_factors: list[float],
        n_hat: int,
        mscale: float,
        mode: Mode = "auto",
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ModelError(f"unknown mode {mode!r}; use one of: {', '.join(MODES)}.")
        self.spec = spec
        self.mode = mode
        self.short = LongRopeRotaryEmbedding(spec, device=device)
        self.short.set_candidate(short_factors, n_hat=0, mscale=mscale)
        self.long = LongRopeRotaryEmbedding(spec, device=device)
        self.long.set_candidate(long_factors, n_hat=n_hat, mscale=mscale)

    def uses_long(self, position_ids: torch.Tensor) -> bool:
        # a host sync per forward; transformers avoids it with torch.where, at the cost of computing both sets
        return self.mode == "long" or int(position_ids.max()) + 1 > self.spec.original_length

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, *args: Any, **kwargs: Any):
        # x only carries device and dtype; position_ids: (b, L) -> cos, sin: (b, L, rotary_dim)
        return (self.long if self.uses_long(position_ids) else self.short)(x, position_ids)

    def extra_repr(self) -> str:
        return f"mode={self.mode}, original_length={self.spec.original_length}"


def _factors_file(path: str | Path) -> FactorsFile:
    """A factors.json, a run directory, or an exported model directory (its longrope.json)."""
    path = Path(path)
    if path.is_dir() and not (path / FACTORS_FILE).exists() and (path / EXPORT_FACTORS_FILE).is_file():
        path = path / EXPORT_FACTORS_FILE
    return load_factors(path)


def apply(model: nn.Module, factors_path: str | Path, mode: Mode = "auto") -> nn.Module:
    """Install the searched factors (long, short, n_hat, mscale) into `model` in place; returns the model.

    Works on the searched model and on an exported one (its config's RoPE is bypassed). factors_path: a run
    directory, a factors.json, or an exported model directory. The config is left as it is.
    """
    ff = _factors_file(factors_path)
    check_geometry(ff.rope, rope_spec(model.config), str(factors_path), "the model",
                   "apply them to the model they were searched on.")
    owner = rotary_owner(model)
    device = next((b.device for b in owner.rotary_emb.buffers()), None)
    short = ff.short_or_ones
    owner.rotary_emb = ShortLongRotaryEmbedding(ff.rope, short, ff.factors, ff.n_hat, ff.mscale, mode, device)
    return model
