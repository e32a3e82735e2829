"""Time and peak memory of `sequence_nll` (chunked head) against a plain `model(ids, labels=ids)` forward, and of
the needle fitness (the same forward, the head and loss only at the answer's 6 positions) against `sequence_nll`.

Random Llama built in code (vocab 32000 so the logits matter), random tokens, CPU. Every measurement runs
in a fresh subprocess; peak = VmHWM after the call minus RSS before it (the peak is reset with
/proc/self/clear_refs after model load and a short warm-up). Time: both methods in one process, in
alternating order over --repeats rounds; the ratio is the median of per-round ratios, so background load
that drifts between rounds cancels. CPU time (user + sys) is shown too: waiting for a busy CPU does not inflate it.
Achieved FLOP/s (the forward's FLOPs, as `longrope plan` counts them, over the best time) are printed against the
machine's matmul peak, measured in the same process (best of a few 2048^3 fp32 matrix products).
Run: `python scripts/bench_fitness.py` (the grid: vocab 4096 and 32000, 1k to 16k tokens; about 15 minutes on 2
cores), or e.g. `--vocabs 32000 --lengths 2k,8k,16k,32k`.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time

from longrope_search.config import parse_length  # pydantic and yaml only: the workers' torch memory is unchanged

METHODS = ("ours", "plain", "needle")
ANSWER_TOKENS = 6  # a 5-7 digit answer and the token after it, as the needle fitness scores them


def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1])


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def build(args: argparse.Namespace):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64,
        max_position_embeddings=2048, tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval().requires_grad_(False)
    ids = torch.randint(0, args.vocab, (1, args.length), generator=torch.Generator().manual_seed(1))  # (1, L)
    return model, ids


def methods(model, chunk_size: int):
    import torch

    from longrope_search.fitness import IGNORE, sequence_nll

    def plain(x):
        with torch.inference_mode():
            return model(x, labels=x).loss.item()

    def needle(x):
        targets = torch.full((x.shape[1] - 1,), IGNORE)  # (L-1,): only the last positions are scored
        targets[-ANSWER_TOKENS:] = x[0, -ANSWER_TOKENS:]
        return sequence_nll(model, x, chunk_size, targets)

    return {"ours": lambda x: sequence_nll(model, x, chunk_size), "plain": plain, "needle": needle}


def worker(args: argparse.Namespace) -> None:
    """--worker ours|plain: one run, peak memory. --worker time: both methods, paired, in this process."""
    from longrope_search.fitness import CHUNK_SIZE

    model, ids = build(args)
    run = methods(model, args.chunk_size or CHUNK_SIZE)
    for f in run.values():
        f(ids[:, :32])  # first-call setup (thread pools, kernels) is not what we measure
    if args.worker == "time":
        rounds: list = [{"peak_flops": matmul_peak()}]
        for i in range(args.repeats):
            order = METHODS if i % 2 == 0 else METHODS[::-1]  # neither method always runs first
            took = {}
            for name in order:
                cpu_began, began = cpu_seconds(), time.perf_counter()
                run[name](ids)
                took[name] = (time.perf_counter() - began, cpu_seconds() - cpu_began)
            rounds.append(took)
        print(json.dumps(rounds))
        return
    exact = reset_peak()
    before_kb = status_kb("VmRSS") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    nll = run[args.worker](ids)
    after_kb = status_kb("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"nll": nll, "peak_mb": (after_kb - before_kb) / 1024, "exact": exact}))


def matmul_peak() -> float:
    """FLOP/s of the best of five 2048^3 fp32 matrix products: what this process's threads can do at best."""
    import torch

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    best = math.inf
    for _ in range(5):
        began = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - began)
    return 2 * 2048**3 / best


def forward_flops(args: argparse.Namespace, length: int) -> float:
    """FLOPs of one forward of `length` tokens through the benchmark model, as `longrope plan` counts them."""
    from longrope_search.plan import sample_flops
    from longrope_search.shapes import shape_from_config

    model, _ = build(argparse.Namespace(**{**vars(args), "length": 2}))
    return sample_flops(shape_from_config(model.config, "bench"), length)


def spawn(args: argparse.Namespace, mode: str, length: int):
    cmd = [
        sys.executable, __file__, "--worker", mode, "--length", str(length), "--hidden", str(args.hidden),
        "--layers", str(args.layers), "--vocab", str(args.vocab), "--repeats", str(args.repeats),
    ] + (["--chunk-size", str(args.chunk_size)] if args.chunk_size else [])
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{mode} at {length} tokens failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="1k,2k,8k,16k")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocabs", default="4096,32000", help="vocabulary sizes of the grid (logits grow with them)")
    p.add_argument("--vocab", type=int, default=32000, help=argparse.SUPPRESS)
    p.add_argument("--chunk-size", type=int, default=None, help="default: fitness.CHUNK_SIZE")
    p.add_argument("--repeats", type=int, default=4, help="timed rounds of both methods per length")
    p.add_argument("--worker", choices=(*METHODS, "time"), help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return

    print(f"random Llama: hidden {args.hidden}, {args.layers} layers, chunk {args.chunk_size or 'default'}, fp32 CPU, "
          f"sdpa. Memory: one fresh process per method. Time: {args.repeats} paired rounds in one process; ratios are "
          "medians of per-round ratios, seconds are minima. GFLOP/s: ours, against the matmul peak measured alongside")
    header = ("vocab", "length", "ppl ours", "ppl plain", "s ours", "s plain", "time ratio", "cpu ratio", "MB ours",
              "MB plain", "mem ratio", "s needle", "needle/ours", "MB needle", "needle mem", "GFLOP/s", "of peak")
    print(" | ".join(f"{h:>10}" for h in header))
    exact = True
    for vocab in [int(v) for v in args.vocabs.split(",")]:
        args.vocab = vocab
        for length in [parse_length(x) for x in args.lengths.split(",")]:
            exact &= bench_one(args, length)
    if not exact:
        print("note: /proc/self/clear_refs refused; peaks are ru_maxrss deltas (load transients may hide some)")


def bench_one(args: argparse.Namespace, length: int) -> bool:
    """One row of the grid; True when the memory peaks were measured exactly."""
    mem = {m: spawn(args, m, length) for m in METHODS}
    ours, plain = mem["ours"]["nll"], mem["plain"]["nll"]
    if not math.isclose(ours, plain, rel_tol=1e-5):
        sys.exit(f"NLL differs at {length}: ours {ours} vs plain {plain}")
    peak, *rounds = spawn(args, "time", length)
    wall = {m: min(r[m][0] for r in rounds) for m in METHODS}
    wall_ratio = median([r["ours"][0] / r["plain"][0] for r in rounds])
    cpu_ratio = median([r["ours"][1] / r["plain"][1] for r in rounds])
    needle_ratio = median([r["needle"][0] / r["ours"][0] for r in rounds])
    achieved = forward_flops(args, length) / wall["ours"]
    row = (
        args.vocab, length, f"{math.exp(ours):.3f}", f"{math.exp(plain):.3f}", f"{wall['ours']:.2f}",
        f"{wall['plain']:.2f}", f"{wall_ratio:.2f}", f"{cpu_ratio:.2f}", f"{mem['ours']['peak_mb']:.0f}",
        f"{mem['plain']['peak_mb']:.0f}", f"{mem['ours']['peak_mb'] / mem['plain']['peak_mb']:.3f}",
        f"{wall['needle']:.2f}", f"{needle_ratio:.2f}", f"{mem['needle']['peak_mb']:.0f}",
        f"{mem['needle']['peak_mb'] / mem['ours']['peak_mb']:.3f}", f"{achieved / 1e9:.1f}",
        f"{achieved / peak['peak_flops']:.0%}",
    )
    print(" | ".join(f"{c:>10}" for c in row), flush=True)
    return all(r["exact"] for r in mem.values())


if __name__ == "__main__":
    main()
