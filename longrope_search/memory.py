"""Long-sequence memory: run each decoder layer's MLP over chunks of positions, and measure tensor peaks.

The MLP is position-wise, so chunking it is exact and drops its L x intermediate activations (the largest
in the decoder once the loss is chunked) to chunk x intermediate; attention and q/k/v stay whole.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, TypeVar

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from longrope_search.errors import ConfigError, ModelError

T = TypeVar("T")


def _layers(model: nn.Module) -> nn.ModuleList:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ModelError(
            f"cannot find the decoder layers of {type(model).__name__} (no model.layers); "
            "set search.mlp_chunk to 0 to run this model without MLP chunking."
        )
    return layers


def _chunked(forward: Callable[[torch.Tensor], torch.Tensor], chunk_tokens: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def chunked_forward(hidden: torch.Tensor) -> torch.Tensor:  # (b, L, H) -> (b, L, H)
        length = hidden.shape[-2]
        if length <= chunk_tokens:
            return forward(hidden)
        first = forward(hidden[..., :chunk_tokens, :])  # (b, c, H)
        # written into one preallocated output: a torch.cat would briefly hold the result twice
        out = first.new_empty((*hidden.shape[:-1], first.shape[-1]))  # (b, L, H)
        out[..., :chunk_tokens, :] = first
        del first
        for start in range(chunk_tokens, length, chunk_tokens):
            out[..., start : start + chunk_tokens, :] = forward(hidden[..., start : start + chunk_tokens, :])
        return out

    chunked_forward.chunk_tokens = chunk_tokens  # type: ignore[attr-defined]
    chunked_forward.unchunked = forward  # type: ignore[attr-defined]
    return chunked_forward


def chunk_mlp(model: nn.Module, chunk_tokens: int) -> None:
    """Make every decoder layer's MLP process at most `chunk_tokens` positions at a time (same outputs).

    Calling it again replaces the chunk size; `unchunk_mlp` restores the original forwards.
    """
    if chunk_tokens < 1:
        raise ConfigError(f"MLP chunk of {chunk_tokens} positions is impossible; use a positive size such as 16384.")
    unchunk_mlp(model)
    for i, layer in enumerate(_layers(model)):
        mlp = getattr(layer, "mlp", None)
        if not isinstance(mlp, nn.Module):
            raise ModelError(
                f"decoder layer {i} of {type(model).__name__} has no mlp module; "
                "set search.mlp_chunk to 0 to run this model without MLP chunking."
            )
        # an instance attribute shadows the class's forward, so nn.Module.__call__ and its hooks are untouched
        mlp.forward = _chunked(mlp.forward, chunk_tokens)


def unchunk_mlp(model: nn.Module) -> None:
    """Undo `chunk_mlp`; a model that was never chunked is left as it is."""
    for layer in _layers(model):
        mlp = getattr(layer, "mlp", None)
        forward = getattr(mlp, "__dict__", {}).get("forward")
        if forward is None or not hasattr(forward, "unchunked"):
            continue
        original = forward.unchunked
        if getattr(original, "__self__", None) is mlp and original.__func__ is type(mlp).forward:
            del mlp.forward  # the class's own forward shows through again
        else:
            mlp.forward = original  # a forward someone else installed (e.g. accelerate's hooks)


class _LiveTensors(TorchDispatchMode):
    """Counts the bytes of every storage an op creates until it is freed; keeps the highest total."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: dict[int, int] = {}
        self.live = 0
        self.peak = 0

    def _freed(self, key: int) -> None:
        self.live -= self.sizes.pop(key)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        # under inference_mode composite ops (linear, cross_entropy, sdpa) reach the mode whole; run their
        # decomposition so the temporaries they allocate inside pass through here too
        with self:  # the mode is off inside its own handler; the decomposition's ops must come back here
            out = func.decompose(*args, **kwargs)
        if out is NotImplemented:
            out = func(*args, **kwargs)
        # views and in-place results live in an input's memory: only storages new to this op count
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for leaf in tree_leaves(out):
            if not isinstance(leaf, torch.Tensor) or leaf.device.type == "meta":
                continue
            storage = leaf.untyped_storage()
            key = id(storage)
            if key not in self.sizes and storage.data_ptr() not in inputs:
                self.sizes[key] = storage.nbytes()
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
                # torch keeps one Python object per storage, so this fires when the memory is released
                weakref.finalize(storage, self._freed, key)
        return out


def measure_peak(fn: Callable[[], T]) -> tuple[T, int]:
    """(fn(), highest bytes of tensors alive at once that fn created) on any device, CPU included.

    Tensors that existed before (weights, inputs) are not counted, nor kernels' private workspaces: the
    quantity torch.cuda.max_memory_allocated grows by on CUDA, without the caching allocator's rounding.
    """
    with _LiveTensors() as tracker:
        result = fn()
    return result, tracker.peak


def available_bytes(device: str) -> int | None:
    """Memory free for new tensors on `device` (cuda[:N]: the GPU's free memory; cpu: the kernel's MemAvailable),
    or None where it cannot be read (a check then lets the work try)."""
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            return None
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    if device != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
