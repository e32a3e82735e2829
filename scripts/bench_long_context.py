"""Longest sequence the fitness can score, and its tokens/s, with whole and with chunked MLPs.

Builds a random Llama (7B shape by default, bf16 on CUDA, no download) and runs `fitness.sequence_nll` at
doubling lengths until CUDA runs out of memory, both modes side by side at each length. Peaks are
torch.cuda.max_memory_allocated on CUDA and `memory.measure_peak` elsewhere, next to plan.py's prediction.
GPU: `python scripts/bench_long_context.py` (8k, 16k, ... until both modes hit OOM).
CPU: `python scripts/bench_long_context.py --hidden 256 --layers 2 --intermediate 688 --heads 4 --lengths 2k,4k,8k`.
"""

from __future__ import annotations

import argparse
import gc
import os
import time

import torch


def parse_length(text: str) -> int:
    from longrope_search.config import parse_length as parse

    return parse(text.strip())


def build(args: argparse.Namespace, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    from longrope_search.model import attention_backend, install_rope

    config = LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads or args.heads, vocab_size=args.vocab,
        max_position_embeddings=4096, tie_word_embeddings=False,
    )
    config._attn_implementation = attention_backend(device)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in the target dtype on the device: no fp32 copy of 7B weights
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config).eval().requires_grad_(False)
    finally:
        torch.set_default_dtype(default)
    # PI factors for the longest length: the cos/sin path the search runs; the scale does not change the cost
    install_rope(model, [max(1.0, args.max_length / 4096)] * (args.hidden // args.heads // 2))
    return model


def free_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info()[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def run_once(model, ids: torch.Tensor, chunk: int | None, loss_chunk: int, device: str) -> tuple[float, float, int]:
    """(nll, seconds, peak activation bytes) of one sequence_nll call with the MLP whole or in chunks."""
    from longrope_search.fitness import sequence_nll
    from longrope_search.memory import chunk_mlp, measure_peak, unchunk_mlp

    if chunk:
        chunk_mlp(model, chunk)
    else:
        unchunk_mlp(model)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        began = time.perf_counter()
        nll = sequence_nll(model, ids, loss_chunk)  # .item() inside waits for the GPU
        seconds = time.perf_counter() - began
        return nll, seconds, torch.cuda.max_memory_allocated() - before
    began = time.perf_counter()
    nll = sequence_nll(model, ids, loss_chunk)
    seconds = time.perf_counter() - began
    _, peak = measure_peak(lambda: sequence_nll(model, ids, loss_chunk))  # untimed: tracking costs time
    return nll, seconds, peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=None, help="default: --heads (Llama-2: no GQA)")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--lengths", default=None, help="comma list; default: doubling from --start to --max-length")
    p.add_argument("--start", default="8k")
    p.add_argument("--max-length", default="4m")
    p.add_argument("--mlp-chunk", type=int, default=16384)
    p.add_argument("--loss-chunk", type=int, default=1024, help="search.chunk_size")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per mode and length; the fastest counts")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    args = p.parse_args()

    from longrope_search.plan import activation_bytes, format_bytes
    from longrope_search.shapes import shape_from_config

    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    if args.lengths:
        lengths = [parse_length(x) for x in args.lengths.split(",")]
    else:
        lengths, n = [], parse_length(args.start)
        while n <= parse_length(args.max_length):
            lengths, n = lengths + [n], 2 * n
    args.max_length = max(lengths)
    model = build(args, args.device, dtype)
    shape = shape_from_config(model.config, "bench")
    weights = sum(t.numel() * t.element_size() for t in model.parameters())
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"random Llama on {name}, {dtype}, {model.config._attn_implementation}: hidden {args.hidden}, "
          f"{args.layers} layers, intermediate {args.intermediate}, {args.heads}/{shape.num_kv_heads} heads, "
          f"vocab {args.vocab}; weights {format_bytes(weights)}; MLP chunk {args.mlp_chunk}, loss chunk {args.loss_chunk}")
    modes = {"whole": None, "chunked": args.mlp_chunk}
    gen = torch.Generator().manual_seed(0)
    warm = torch.randint(0, args.vocab, (1, min(1024, lengths[0])), generator=gen)
    for chunk in modes.values():  # kernels, thread pools and the allocator's first blocks are not what we measure
        run_once(model, warm, chunk, args.loss_chunk, args.device)

    header = ("length", "mode", "nll", "seconds", "tokens/s", "peak", "predicted", "meas/pred")
    print(" | ".join(f"{h:>10}" for h in header))
    last_ok: dict[str, int] = {}
    alive = dict(modes)
    for length in lengths:
        ids = torch.randint(0, args.vocab, (1, length), generator=gen)  # (1, L)
        for mode, chunk in list(alive.items()):
            predicted = max(activation_bytes(shape, length, dtype.itemsize, True, chunk, args.loss_chunk).values())
            if not args.device.startswith("cuda") and predicted > 0.8 * free_bytes(args.device):
                # a CPU out-of-memory kills the process instead of raising: stop before it
                print(f"{length:>10} | {mode:>10} | skipped: predicted {format_bytes(predicted)}, "
                      f"{format_bytes(free_bytes(args.device))} free")
                del alive[mode]
                continue
            try:
                runs = [run_once(model, ids, chunk, args.loss_chunk, args.device) for _ in range(args.repeats)]
            except torch.OutOfMemoryError:
                print(f"{length:>10} | {mode:>10} | out of memory (predicted {format_bytes(predicted)}, "
                      f"{format_bytes(free_bytes(args.device))} free after the failure)")
                del alive[mode]
                gc.collect()
                torch.cuda.empty_cache()
                continue
            nll, seconds, peak = min(runs, key=lambda r: r[1])
            last_ok[mode] = length
            row = (length, mode, f"{nll:.5f}", f"{seconds:.2f}", f"{length / seconds:,.0f}", format_bytes(peak),
                   format_bytes(predicted), f"{peak / predicted:.3f}")
            print(" | ".join(f"{c:>10}" for c in row), flush=True)
        if not alive:
            break
    for mode in modes:
        reached = last_ok.get(mode)
        print(f"{mode}: longest length scored {reached if reached else 'none'}"
              + ("" if mode in alive or reached is None else " (the next one ran out of memory or was skipped)"))


if __name__ == "__main__":
    main()
