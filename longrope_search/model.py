"""Load a Hugging Face causal LM, read its RoPE geometry, and install a LongRoPE candidate into it.

Every current HF RoPE model computes (cos, sin) once per forward in one module
(`model.model.rotary_emb`) and hands them to all layers; we replace that module with ours.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from longrope_search import builtin
from longrope_search.errors import DependencyError, ModelError, first_line, install_hint
from longrope_search.files import unreadable
from longrope_search.memory import chunk_mlp
from longrope_search.rope import (RopeSpec, base_inv_freq, baseline, cos_sin, longrope_mscale, scaled_inv_freq,
                                  yarn_factors, yarn_mscale)


# --- RoPE geometry ------------------------------------------------------------------------------------


def _rope_parameters(config: Any) -> dict:
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        return params
    if getattr(config, "rope_theta", None) is not None:  # configs written before transformers 5
        return {"rope_type": "default", "rope_theta": config.rope_theta}
    model_type = getattr(config, "model_type", "?")
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        raise ModelError(
            f"model type {model_type!r} uses a different RoPE per layer type ({', '.join(params)}); "
            "longrope supports models with one RoPE for all layers (Llama, Mistral, Qwen2/3, Phi-3, Gemma)."
        )
    raise ModelError(
        f"model type {model_type!r} has no rotary position embedding (no rope_theta in its config); "
        "LongRoPE only applies to RoPE models such as Llama, Mistral, Qwen, Phi-3 or Gemma."
    )


def rotary_dim(config: Any) -> int:
    """Rotated dims per head: head_dim (or hidden/heads) times partial_rotary_factor."""
    params = _rope_parameters(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    partial = params.get("partial_rotary_factor") or getattr(config, "partial_rotary_factor", None) or 1.0
    return int(head_dim * partial)


def rope_spec(config: Any) -> RopeSpec:
    """The RoPE geometry of a model config.

    Plain RoPE, LongRoPE-extended models (rope_type longrope, e.g. an exported or fine-tuned extended model) and
    YaRN or linear ones that name their original window (as `finetune --factors` writes them) are accepted; other
    rescalings are refused since their factors are not ours to compose.
    """
    params = _rope_parameters(config)
    rope_type = params.get("rope_type", params.get("type", "default"))
    named = params.get("original_max_position_embeddings") or getattr(config, "original_max_position_embeddings", None)
    if rope_type not in CARRIED_TYPES or (rope_type in STATIC_TYPES and not named):
        raise ModelError(
            f"the model already uses rope_type {rope_type!r}; search on its unscaled base checkpoint "
            "(rope_type 'default'), or on a LongRoPE-extended model (rope_type 'longrope')."
        )
    original = (
        params.get("original_max_position_embeddings")
        or getattr(config, "original_max_position_embeddings", None)
        or config.max_position_embeddings
    )
    return RopeSpec(base=float(params["rope_theta"]), rotary_dim=rotary_dim(config), original_length=int(original))


STATIC_TYPES = {"yarn": "yarn", "linear": "pi"}  # transformers' rope types that are a baseline at one scale
CARRIED_TYPES = ("default", "longrope", *STATIC_TYPES)


def carried_factors(config: Any) -> list[float] | None:
    """The long factors an extended model already runs with: a LongRoPE model's, or a YaRN or linear model's as
    per-pair factors (None for plain RoPE)."""
    params = _rope_parameters(config)
    rope_type = params.get("rope_type", params.get("type"))
    if rope_type in STATIC_TYPES:
        spec = rope_spec(config)
        fast, slow = params.get("beta_fast") or 32.0, params.get("beta_slow") or 1.0
        scale = float(params["factor"])
        factors = yarn_factors(spec, scale, fast, slow) if rope_type == "yarn" else baseline("pi")(spec, scale)
        return [float(x) for x in factors]
    if rope_type != "longrope":
        return None
    return [float(x) for x in params["long_factor"]]


def carried_mscale(config: Any, spec: RopeSpec) -> float:
    """The attention factor an extended model runs its carried factors with (transformers' default when unset)."""
    params = _rope_parameters(config)
    rope_type = params.get("rope_type", params.get("type"))
    scale = float(params.get("factor") or config.max_position_embeddings / spec.original_length)
    if params.get("attention_factor"):
        return float(params["attention_factor"])
    if rope_type == "yarn":
        return yarn_mscale(scale)
    return 1.0 if rope_type == "linear" else longrope_mscale(scale, spec.original_length)


# --- our rotary embedding -----------------------------------------------------------------------------


class LongRopeRotaryEmbedding(nn.Module):
    """Drop-in for HF `*RotaryEmbedding`: forward(x, position_ids) -> (cos, sin) under one candidate.

    `set_candidate` rewrites the tables in place, so scoring many candidates never rebuilds the model and
    never keeps stale frequencies (transformers caches `long_inv_freq` on its own module).
    """

    def __init__(self, spec: RopeSpec, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.spec = spec
        original = base_inv_freq(spec).to(device)
        self.register_buffer("original_inv_freq", original, persistent=False)  # (d/2,)
        self.register_buffer("inv_freq", original.clone(), persistent=False)  # (d/2,)
        self.n_hat = 0
        self.mscale = 1.0

    def set_candidate(self, factors: Sequence[float] | torch.Tensor, n_hat: int = 0, mscale: float = 1.0) -> None:
        factors = torch.as_tensor(factors, dtype=torch.float32)
        if factors.shape != (self.spec.num_factors,):
            raise ModelError(
                f"got {factors.numel()} factors but the model has {self.spec.num_factors} rotary pairs "
                f"(rotary_dim {self.spec.rotary_dim}); pass one factor per pair."
            )
        if not torch.isfinite(factors).all() or (factors <= 0).any():
            raise ModelError("factors must be finite and positive; check the factors file.")
        self.inv_freq.copy_(scaled_inv_freq(self.spec, factors))
        self.n_hat = int(n_hat)
        self.mscale = float(mscale)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, *args: Any, **kwargs: Any):
        # x only carries device and dtype; position_ids: (b, L)
        return cos_sin(position_ids, self.inv_freq, self.original_inv_freq, self.n_hat, self.mscale, x.dtype)

    def extra_repr(self) -> str:
        return f"rotary_dim={self.spec.rotary_dim}, base={self.spec.base}, n_hat={self.n_hat}, mscale={self.mscale:.4f}"


def rotary_owner(model: nn.Module) -> nn.Module:
    """The module that holds `rotary_emb` (the decoder body of a *ForCausalLM)."""
    for owner in (getattr(model, "model", None), model):
        if owner is not None and isinstance(getattr(owner, "rotary_emb", None), nn.Module):
            return owner
    found = [name for name, _ in model.named_modules() if name.endswith("rotary_emb")]
    raise ModelError(
        f"cannot find the rotary embedding of {type(model).__name__} (modules named rotary_emb: {found or 'none'}); "
        "longrope supports transformers models that compute RoPE once in model.model.rotary_emb."
    )


def install_rope(
    model: nn.Module, factors: Sequence[float] | torch.Tensor, n_hat: int = 0, mscale: float = 1.0
) -> LongRopeRotaryEmbedding:
    """Make the next forward of `model` use this candidate: theta_i / factors[i] for positions >= n_hat."""
    owner = rotary_owner(model)
    module = owner.rotary_emb
    if not isinstance(module, LongRopeRotaryEmbedding):
        device = next((b.device for b in module.buffers()), None)
        module = LongRopeRotaryEmbedding(rope_spec(model.config), device=device)
        owner.rotary_emb = module
    module.set_candidate(factors, n_hat, mscale)
    return module


def greedy_continuation(model: nn.Module, tokenizer: Any, ids: torch.Tensor, new_tokens: int) -> str:
    """The text of the model's greedy continuation of `ids` (n,), at most `new_tokens` tokens.

    Whatever RoPE is installed runs: our rotary module computes cos/sin from position_ids on every forward, the
    cached decoding steps included.
    """
    ids = ids.reshape(1, -1).to(model.get_input_embeddings().weight.device)  # (1, n)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    greedy = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, num_beams=1, pad_token_id=pad,
                              eos_token_id=tokenizer.eos_token_id)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=greedy)  # (1, n + new)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


# --- loading ------------------------------------------------------------------------------------------


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def attention_backend(device: str, requested: str = "auto") -> str:
    """`requested` unless auto; auto: flash_attention_2 where flash-attn is importable on CUDA, else PyTorch SDPA."""
    if requested != "auto":
        return requested
    if device.startswith("cuda") and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


@dataclass(frozen=True)
class LoadOptions:
    """How `from_pretrained` is called, as Hugging Face users set it (the config's model section): a hub revision,
    remote code (off unless asked), the attention kernel, and a device map that shards a model over several GPUs."""

    revision: str | None = None  # a hub branch, tag or commit (config, tokenizer and weights alike)
    trust_remote_code: bool = False
    attn_implementation: str = "auto"  # auto: flash_attention_2 on CUDA when installed, else sdpa
    device_map: str | None = None  # e.g. auto: layers spread over every visible GPU (needs accelerate)

    @classmethod
    def of(cls, section: Any) -> "LoadOptions":
        """From a config's model section (anything with these attribute names; missing ones keep the defaults)."""
        return cls(**{name: getattr(section, name) for name in ("revision", "trust_remote_code",
                                                                  "attn_implementation", "device_map")
                      if getattr(section, name, None) is not None})

    def hub_kwargs(self) -> dict[str, Any]:
        """What every from_pretrained call (config, tokenizer, model) receives."""
        kwargs: dict[str, Any] = {"trust_remote_code": self.trust_remote_code}
        if self.revision is not None:
            kwargs["revision"] = self.revision
        return kwargs


DEFAULT_LOAD = LoadOptions()


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | None, device: str) -> torch.dtype:
    """bf16 on GPU, fp32 on CPU unless asked otherwise."""
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in _DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; use one of: auto, {', '.join(sorted(_DTYPES))}.")
    return _DTYPES[dtype]


def resolve_model_path(name_or_path: str) -> str:
    """builtin:NAME -> the shipped directory; a local path must exist; anything else is a hub id."""
    if name_or_path.startswith("builtin:"):
        return str(builtin.resolve_model(name_or_path))
    path = Path(name_or_path).expanduser()
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_local and not path.exists():
        raise ModelError(f"model directory {name_or_path} does not exist; pass an existing directory or a hub id.")
    if path.is_dir() and (problem := unreadable([path, *sorted(path.iterdir())] if os.access(path, os.R_OK) else [path])):
        raise ModelError(f"{problem}; make the model readable by this user (chmod -R a+rX {path}), or export again "
                         "where a link's target is gone.")
    return str(path) if path.exists() else name_or_path


def load_model_config(name_or_path: str, options: LoadOptions = DEFAULT_LOAD) -> Any:
    source = resolve_model_path(name_or_path)
    try:
        return AutoConfig.from_pretrained(source, **options.hub_kwargs())
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"cannot load model config {name_or_path!r} ({first_line(exc)}); pass a local model directory, "
            "builtin:tiny, or a hub id reachable from this machine"
            + (" (model code from the hub runs only with model.trust_remote_code: true)."
               if "trust_remote_code" in str(exc) else ".")
        ) from exc


def load_tokenizer(name_or_path: str, options: LoadOptions = DEFAULT_LOAD) -> Any:
    """The model's tokenizer; a tokenizer this transformers cannot build is named as such (not as a missing model)."""
    source = resolve_model_path(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(source, **options.hub_kwargs())
    except (OSError, ValueError, AttributeError, TypeError) as exc:
        reason = first_line(exc)
        if isinstance(exc, OSError) and not (Path(source) / "tokenizer_config.json").is_file() \
                and not (Path(source) / "tokenizer.json").is_file() and Path(source).is_dir():
            hint = "the directory has no tokenizer files; copy the base model's tokenizer into it."
        else:
            import transformers

            hint = (f"transformers {transformers.__version__} cannot build its tokenizer (check tokenizer_class in "
                    "tokenizer_config.json: PreTrainedTokenizerFast loads in 4.x and 5.x; TokenizersBackend needs "
                    "transformers 5).")
        raise ModelError(f"cannot load the tokenizer of {name_or_path!r} ({reason}); {hint}") from exc


def check_device(device: str) -> None:
    """A device this torch build can place tensors on, refused in one line before any weight loads."""
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:
        raise ModelError(f"cannot use device {device!r} ({first_line(exc)}); use cpu, or cuda / cuda:N on a machine "
                         "with a CUDA build of torch and a GPU.") from None


def check_device_map(device_map: str | None) -> None:
    """A device map needs accelerate: say so before any weight loads."""
    if device_map is not None and importlib.util.find_spec("accelerate") is None:
        raise DependencyError(f"device_map {device_map!r} needs the accelerate package; pip install accelerate "
                         f"(or {install_hint('gpu')}), or load onto one device with --device.")


def load_model(name_or_path: str, device: str | None = None, dtype: str | None = None, mlp_chunk: int = 0,
               options: LoadOptions = DEFAULT_LOAD):
    """(model, tokenizer) in eval mode without gradients; the RoPE check runs before weights load.

    mlp_chunk > 0 runs each MLP over that many positions at a time: the same numbers, far less memory
    at long lengths (the L x intermediate activation dominates after the chunked loss).
    options.device_map (e.g. auto) lets accelerate place the layers over the visible GPUs instead of moving the
    model to `device`: a model larger than one GPU loads sharded.
    """
    config = load_model_config(name_or_path, options)
    rope_spec(config)  # refuse non-RoPE models before loading gigabytes
    source = resolve_model_path(name_or_path)
    check_device_map(options.device_map)
    device = device or default_device()
    placement = device if options.device_map is None else ("cuda" if torch.cuda.is_available() else "cpu")
    kwargs: dict[str, Any] = {"dtype": resolve_dtype(dtype, placement), **options.hub_kwargs()}
    if options.device_map is not None:
        kwargs["device_map"] = options.device_map
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                source, attn_implementation=attention_backend(placement, options.attn_implementation), **kwargs
            )
        except ValueError as exc:
            if options.attn_implementation != "auto" or (
                    "attn_implementation" not in str(exc) and "does not support" not in str(exc)):
                raise
            # a few architectures (Gemma 2's soft-capped attention) refuse sdpa/flash: fall back to eager
            model = AutoModelForCausalLM.from_pretrained(source, attn_implementation="eager", **kwargs)
    except (OSError, ValueError, ImportError) as exc:
        raise ModelError(f"cannot load the weights of {name_or_path!r} ({first_line(exc)}); check the path or hub "
                         "id, model.revision, and model.attn_implementation.") from exc
    tokenizer = load_tokenizer(name_or_path, options)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        raise ModelError(
            f"the tokenizer of {name_or_path!r} has {len(tokenizer)} tokens but the model embeds only "
            f"{model.get_input_embeddings().num_embeddings}; use the tokenizer that belongs to the model."
        )
    try:
        if options.device_map is None:
            model.to(device)
        model.eval().requires_grad_(False)
    except (RuntimeError, AssertionError) as exc:  # no CUDA, unknown device string, device out of memory
        raise ModelError(
            f"cannot move the model to device {device!r} ({first_line(exc)}); set model.device to cpu, cuda or cuda:N."
        ) from exc
    if mlp_chunk:
        chunk_mlp(model, mlp_chunk)
    return model, tokenizer
