"""The export's reload check: the exported folder loaded as transformers loads it, against the source model with the
searched rotary embedding installed, on random ids past the original window (long factors) and inside it (short
factors); its settings and memory refused before anything is written.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from longrope_search.errors import ExportError, ModelError
from longrope_search.factors import FactorsFile
from longrope_search.hf_config import METHOD_ROPE_TYPES, loaded_rope_type
from longrope_search.memory import available_bytes
from longrope_search.model import DEFAULT_LOAD, LoadOptions, check_device, check_device_map, install_rope
from longrope_search.plan import activation_bytes, format_bytes
from longrope_search.shapes import shape_from_config

VERIFY_DTYPES = ("float32", "bfloat16", "float16")  # what the export check may load the models in


# Short-factor check length: any length <= the original window selects the short factors, so keep it cheap.
SHORT_VERIFY_LENGTH = 64


# Past the original window by a little: enough to select the long factors, cheap on CPU.
LONG_VERIFY_MARGIN = 16


def _random_ids(vocab_size: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab_size, (1, length), generator=torch.Generator().manual_seed(seed))  # (1, L)


@torch.no_grad()
def _full_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids.to(model.get_input_embeddings().weight.device)).logits.float().cpu()  # (1, L, vocab)


def _load_for_check(path: Path, dtype: str, device: str, device_map: str | None, options: LoadOptions) -> Any:
    """A model for the reload check: on `device`, or placed by accelerate with a device map (sharded)."""
    kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype), "trust_remote_code": options.trust_remote_code}
    if device_map is not None:
        return AutoModelForCausalLM.from_pretrained(path, device_map=device_map, **kwargs).eval()
    return AutoModelForCausalLM.from_pretrained(path, **kwargs).to(device).eval()


def verify_export(
    out: Path, src: Path, ff: FactorsFile, n_hat: int, length: int, device: str = "cpu", dtype: str = "float32",
    device_map: str | None = None, options: LoadOptions = DEFAULT_LOAD,
) -> tuple[float, float, Any]:
    """(long, short) max abs logit differences: DST loaded plainly vs SRC with our rotary module installed,
    and the loaded SRC model, so a later measurement need not load it again.

    The same dtype on both sides (fp32 by default, so the comparison measures the RoPE, not rounding; bf16
    halves the memory). The two models are loaded one after the other to keep peak memory at one copy of
    the weights; `device_map` (e.g. auto) shards each over the GPUs instead of putting it on `device`.
    """
    check_device_map(device_map)
    dst_config = AutoConfig.from_pretrained(out, trust_remote_code=options.trust_remote_code)
    rope_type, expected = loaded_rope_type(dst_config) or "default", METHOD_ROPE_TYPES[ff.method]
    if rope_type != expected:
        raise ExportError(f"verification failed: transformers loads {out} with rope_type {rope_type!r}, not "
                          f"{expected!r}; report this with your transformers version.")
    vocab = dst_config.get_text_config().vocab_size
    long_ids = _random_ids(vocab, length)
    short_ids = _random_ids(vocab, min(SHORT_VERIFY_LENGTH, ff.rope.original_length), seed=1)
    short = ff.short_or_ones

    dst = _load_for_check(out, dtype, device, device_map, options)
    dst_long, dst_short = _full_logits(dst, long_ids), _full_logits(dst, short_ids)
    del dst
    ref = _load_for_check(src, dtype, device, device_map, options)
    install_rope(ref, ff.factors, n_hat=n_hat, mscale=ff.mscale)
    ref_long = _full_logits(ref, long_ids)
    install_rope(ref, short, n_hat=0, mscale=ff.mscale)
    ref_short = _full_logits(ref, short_ids)
    return (dst_long - ref_long).abs().max().item(), (dst_short - ref_short).abs().max().item(), ref


def checked_length(ff: FactorsFile, config: Any, requested: int | None, dtype: str, device: str | None) -> int:
    """The check's length (default: the original window + LONG_VERIFY_MARGIN), refused when it does not reach the long
    factors or cannot fit in the device's memory."""
    original = ff.rope.original_length
    length = requested if requested is not None else original + LONG_VERIFY_MARGIN
    if length <= original:
        raise ExportError(f"--verify-length {length} must exceed the original window {original} to test the long "
                          "factors; pass a longer --verify-length.")
    _check_verify_memory(config, length, dtype, device)
    return length


def _check_verify_memory(config: Any, length: int, dtype: str, device: str | None) -> None:
    """Refuse a check that cannot fit: one model's weights, a forward at `length` and two sets of full logits (the
    export's and the searched model's), against the memory free on `device` (unknown there, or sharded: not refused)."""
    free = available_bytes(device) if device is not None else None
    try:
        shape = shape_from_config(config, "the model")
    except ModelError:  # a config without the sizes plan reads: its memory is unknown, the check may try
        return
    if free is None:
        return
    size = torch.tensor([], dtype=getattr(torch, dtype)).element_size()
    need = (shape.params * size + max(activation_bytes(shape, length, size).values())
            + 2 * length * shape.vocab_size * 4)
    if need > free:
        raise ExportError(f"--verify-length {length} needs about {format_bytes(need)} for the check on {device}, which "
                          f"has {format_bytes(free)} free; pass a shorter --verify-length (the default, the original "
                          "window + 16 tokens, already runs the long factors).")


def check_verify_settings(tolerance: float, dtype: str, device: str | None, device_map: str | None) -> None:
    """The logit check's own settings (and its device, when it runs and no device map places the models), refused
    before anything is read or written."""
    if device is not None and device_map is not None:  # the check runs, placed by accelerate
        check_device_map(device_map)
    elif device is not None:  # the check runs on this device
        check_device(device)
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ExportError(f"--tolerance {tolerance} is not a finite number >= 0; the default 1e-4 suits float32 "
                          "(bfloat16 needs about 1e-1).")
    if dtype not in VERIFY_DTYPES:
        raise ExportError(f"--dtype {dtype!r} is not one of {', '.join(VERIFY_DTYPES)}; float32 checks exactly, "
                          "bfloat16 halves the memory of the check.")
