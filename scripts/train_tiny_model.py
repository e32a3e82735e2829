"""Train the embedded `builtin:tiny` model and cut the held-out `builtin:cpython` corpus.

Data: the CPython standard library of the running interpreter (PSF licence), split by file into
train and held-out sets. Run: `nice -n 5 python scripts/train_tiny_model.py` (about 25 min on 2 cores).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import platform
import shutil
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

BUILTIN = Path(__file__).resolve().parent.parent / "longrope_search" / "builtin"
SPECIAL_TOKENS = ["<s>", "</s>", "<unk>", "<pad>"]
TEST_DIRS = {"test", "tests", "idle_test"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=BUILTIN / "tiny-llama-cpython", help="model directory to write")
    p.add_argument("--corpus-out", type=Path, default=BUILTIN / "corpus" / "cpython_heldout.jsonl.gz")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--context", type=int, default=128, help="training context = max_position_embeddings")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=768)
    p.add_argument("--rope-theta", type=float, default=10000.0)
    p.add_argument("--heldout-percent", type=int, default=15, help="share of files kept out of training")
    p.add_argument("--no-tests", action="store_true", help="leave the stdlib's test packages out of the data")
    p.add_argument("--min-doc-factor", type=int, default=16, help="held-out docs need this many x context tokens")
    p.add_argument("--doc-margin", type=int, default=64, help="extra tokens beyond min-doc-factor x context")
    p.add_argument("--max-docs", type=int, default=96, help="cap on documents in the held-out corpus")
    p.add_argument("--table-docs", type=int, default=32, help="documents scored for the 8x/16x baseline table")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--eval-only", action="store_true", help="skip training; evaluate --out on --corpus-out")
    return p.parse_args(argv)


# ---------------------------------------------------------------- data


def list_sources(stdlib: Path, include_tests: bool) -> list[str]:
    """Sorted relative posix paths of the stdlib's .py files (no site-packages)."""
    rels = []
    for path in stdlib.rglob("*.py"):
        parts = path.relative_to(stdlib).parts
        if parts[0] == "site-packages" or parts[0].startswith("_sysconfigdata"):
            continue
        if not include_tests and TEST_DIRS & set(parts[:-1]):
            continue
        rels.append("/".join(parts))
    return sorted(rels)


def is_heldout(rel: str, percent: int) -> bool:
    # Hash of the path, not of the content, so the split is the same on every Python version.
    return int.from_bytes(hashlib.sha256(rel.encode()).digest()[:8], "big") % 100 < percent


def read_sources(stdlib: Path, rels: list[str]) -> list[tuple[str, str]]:
    """(rel, text) for every file that is valid UTF-8 and not empty; a few test files are not."""
    docs = []
    for rel in rels:
        try:
            text = (stdlib / rel).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        if text.strip():
            docs.append((rel, text))
    return docs


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(texts, trainer=trainer, length=len(texts))
    # BOS only when the caller asks for special tokens, like Llama's tokenizer.
    bos = tk.token_to_id("<s>")
    tk.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def encode(tok: PreTrainedTokenizerFast, texts: list[str]) -> list[list[int]]:
    return tok(texts, add_special_tokens=False)["input_ids"]


def sample_batch(
    stream: torch.Tensor, doc_starts: torch.Tensor, gen: torch.Generator, batch: int, ctx: int, bos: int
) -> torch.Tensor:
    """(batch, ctx) windows, each BOS + ctx-1 stream tokens.

    Every window starts with BOS, as evaluation windows do; a quarter start at a document's first
    token so "BOS + file header" is in distribution, the rest at random offsets.
    """
    n = ctx - 1
    random_start = torch.randint(0, stream.numel() - n, (batch,), generator=gen)
    doc_start = doc_starts[torch.randint(0, doc_starts.numel(), (batch,), generator=gen)]
    use_doc = torch.rand(batch, generator=gen) < 0.25
    starts = torch.where(use_doc, doc_start.clamp(max=stream.numel() - n), random_start)
    idx = starts[:, None] + torch.arange(n)[None, :]  # (batch, ctx-1)
    return torch.cat([torch.full((batch, 1), bos), stream[idx]], dim=1)


# ---------------------------------------------------------------- model


def build_model(args: argparse.Namespace, tok: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=args.context,
        rope_parameters={"rope_type": "default", "rope_theta": args.rope_theta},
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(cfg)


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def doc_ppl(model: LlamaForCausalLM, docs: list[list[int]], length: int, bos: int) -> float:
    """exp(mean per-document NLL) over one window per doc: BOS + its first length-1 tokens."""
    model.eval()
    nlls = []
    for ids in docs:
        x = torch.tensor([[bos] + ids[: length - 1]])  # (1, length)
        logits = model(input_ids=x).logits[0, :-1].float()  # (length-1, vocab)
        nlls.append(F.cross_entropy(logits, x[0, 1:]).item())
    return math.exp(sum(nlls) / len(nlls))


def unigram_ppl(train_ids: list[list[int]], eval_docs: list[list[int]], vocab: int, length: int) -> float:
    """PPL of an add-one-smoothed unigram model on the same tokens doc_ppl scores."""
    counts = torch.ones(vocab)
    for ids in train_ids:
        counts += torch.bincount(torch.tensor(ids, dtype=torch.long), minlength=vocab)[:vocab]
    logp = (counts / counts.sum()).log()
    nlls = [-logp[torch.tensor(ids[: length - 1])].mean().item() for ids in eval_docs]
    return math.exp(sum(nlls) / len(nlls))


def rope_variants(theta: float, ctx: int, scale: float, rotary_dim: int) -> dict[str, dict]:
    """Baseline rope_parameters for extension by `scale` (transformers 5.x names)."""
    return {
        "none": {"rope_type": "default", "rope_theta": theta},
        "pi": {"rope_type": "linear", "factor": scale, "rope_theta": theta},
        # static NTK-aware: base' = base * s^(d/(d-2))
        "ntk": {"rope_type": "default", "rope_theta": theta * scale ** (rotary_dim / (rotary_dim - 2))},
        "yarn": {"rope_type": "yarn", "factor": scale, "rope_theta": theta, "original_max_position_embeddings": ctx},
    }


def extension_table(model_dir: Path, eval_docs: list[list[int]], bos: int, scales: list[int]) -> dict[str, float]:
    """Held-out PPL at scale x context for each baseline RoPE, model loaded fresh each time."""
    base = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ctx = base.config.max_position_embeddings
    theta = base.config.rope_parameters["rope_theta"]
    rotary_dim = base.config.hidden_size // base.config.num_attention_heads
    table = {"1x": doc_ppl(base, eval_docs, ctx, bos)}
    for s in scales:
        for name, rope in rope_variants(theta, ctx, float(s), rotary_dim).items():
            cfg = LlamaConfig.from_pretrained(model_dir)
            cfg.rope_parameters = rope
            cfg.max_position_embeddings = ctx * s
            model = LlamaForCausalLM.from_pretrained(model_dir, config=cfg, dtype=torch.float32)
            table[f"{s}x {name}"] = doc_ppl(model, eval_docs, ctx * s, bos)
    return table


# ---------------------------------------------------------------- outputs


def write_corpus(path: Path, docs: list[tuple[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps({"text": text, "source": rel}, ensure_ascii=False) + "\n" for rel, text in docs)
    # mtime=0 and no file name in the header: the same corpus gives the same bytes.
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
        gz.write(lines.encode("utf-8"))


def write_license(path: Path, stdlib: Path, n_docs: int) -> None:
    """Origin and change summary of the corpus, plus the PSF License Agreement it requires us to retain."""
    full = (stdlib / "LICENSE.txt").read_text(encoding="utf-8")
    start = full.index("PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2")
    end = full.index("BEOPEN.COM LICENSE AGREEMENT")
    path.write_text(
        f"""Origin and licence of cpython_heldout.jsonl.gz (and of the data behind tiny-llama-cpython)

Origin: {n_docs} `*.py` files of the standard library of CPython {platform.python_version()}
(`sysconfig.get_paths()["stdlib"]`), chosen by scripts/train_tiny_model.py among the files held
out of training (a SHA-256 hash of the relative path decides) that have at least 16x the model's
context in tokens. Copyright (c) Python Software Foundation; All Rights Reserved (years as
in the agreement below).
A few files carry their own additional copyright notices, kept unchanged in their text.

Summary of changes (PSF License, clause 3): the file texts are unmodified; each is stored as one
JSON line {{"text": <file content>, "source": <path relative to the stdlib>}}, gzip-compressed.
Nothing else of Python is included.

The files are used under the PSF License Agreement, reproduced here as it requires:

{full[start:end].rstrip()}
"""
    )


def write_card(out: Path, args: argparse.Namespace, facts: dict) -> None:
    rows = "\n".join(f"| {k} | {v:.2f} |" for k, v in facts["ppl"].items())
    card = f"""---
license: other
library_name: transformers
pipeline_tag: text-generation
---
# tiny-llama-cpython (`builtin:tiny`)

A {facts['params'] / 1e6:.1f}M-parameter `LlamaForCausalLM` trained from scratch on Python source code, so that
LongRoPE factor searches can run in minutes on a CPU. Context window: {args.context} tokens
(`max_position_embeddings`), RoPE base {args.rope_theta:g}, head_dim {args.hidden // args.heads}
({args.hidden // args.heads // 2} rotary pairs). Weights stored in float16; load with `dtype=torch.float32` on CPU.

## Training
- Command: `{facts['command']}`
- Data: the `*.py` files of the CPython {facts['python']} standard library (no site-packages{', no test packages' if args.no_tests else ''}),
  split by a SHA-256 hash of each file's relative path: {facts['n_train_files']} train files
  ({facts['train_tokens']:,} tokens), {facts['n_heldout_files']} held-out files (never seen by the tokenizer or the model).
- Tokenizer: byte-level BPE, vocab {facts['vocab']}, special tokens `<s>` `</s>` `<unk>` `<pad>`; BOS is added only
  with `add_special_tokens=True`.
- Optimiser: AdamW (lr {args.lr:g}, weight decay {args.weight_decay:g}, betas 0.9/0.95), {args.warmup} warmup steps,
  cosine decay to 10%, {args.steps} steps of {args.batch_size} x {args.context} tokens
  ({args.steps * args.batch_size * args.context:,} tokens), fp32, seed {args.seed}, {facts['minutes']:.1f} min wall-clock on
  {args.threads} CPU threads (torch {facts['torch']}, transformers {facts['transformers']}).
- Every training window is BOS followed by {args.context - 1} tokens of the train stream (files joined by `</s>`).

## Held-out perplexity
One window per document of the first {facts['table_docs']} of the {facts['n_docs']} documents of
`../corpus/cpython_heldout.jsonl.gz` (each at least {facts['min_tokens']} tokens): BOS + the first L-1 tokens, exp(mean per-document NLL). Unigram baseline at 1x:
{facts['unigram_ppl']:.1f}. PPL at 1x over all {facts['n_docs']} documents: {facts['ppl_1x_all_docs']:.2f}. "none" is unscaled RoPE; "pi" linear interpolation; "ntk" static NTK-aware base;
"yarn" transformers' YaRN, all without fine-tuning.

| setting | PPL |
|---|---|
{rows}

## Licence
The training data is CPython's standard library, Copyright (c) Python Software Foundation; All Rights
Reserved, used under the PSF License Agreement. The weights and tokenizer are a derivative work of it: the
agreement and the summary of changes it asks for are kept in `../corpus/LICENSE`. The code that trained them
is under this package's MIT licence.
"""
    (out / "README.md").write_text(card)


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    rels = list_sources(stdlib, include_tests=not args.no_tests)
    train_docs = read_sources(stdlib, [r for r in rels if not is_heldout(r, args.heldout_percent)])
    heldout_docs = read_sources(stdlib, [r for r in rels if is_heldout(r, args.heldout_percent)])
    print(f"CPython {platform.python_version()} stdlib: {len(train_docs)} train files, {len(heldout_docs)} held-out")

    if args.eval_only:
        tok = PreTrainedTokenizerFast.from_pretrained(args.out)
    else:
        t0 = time.time()
        tok = train_tokenizer([t for _, t in train_docs], args.vocab_size)
        print(f"tokenizer: vocab {len(tok)} in {time.time() - t0:.0f}s")

    train_ids = encode(tok, [t for _, t in train_docs])
    min_tokens = args.min_doc_factor * args.context + args.doc_margin
    heldout_ids = encode(tok, [t for _, t in heldout_docs])
    long_docs = [(d, ids) for d, ids in zip(heldout_docs, heldout_ids) if len(ids) >= min_tokens]
    # Pick by path hash, not alphabetically, so one package does not fill the corpus; store sorted.
    long_docs = sorted(long_docs, key=lambda x: hashlib.sha256(x[0][0].encode()).hexdigest())[: args.max_docs]
    long_docs.sort(key=lambda x: x[0][0])
    eval_ids = [ids for _, ids in long_docs]
    print(f"held-out corpus: {len(long_docs)} documents of >= {min_tokens} tokens")

    if not args.eval_only:
        stream_parts, starts, pos = [], [], 0
        for ids in train_ids:
            starts.append(pos)
            stream_parts.append(torch.tensor(ids + [tok.eos_token_id], dtype=torch.long))
            pos += len(ids) + 1
        stream = torch.cat(stream_parts)  # (train_tokens,)
        doc_starts = torch.tensor(starts)
        print(f"train stream: {stream.numel():,} tokens")

        model = build_model(args, tok)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"model: {n_params:,} parameters")
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=args.lr,
            betas=(0.9, 0.95),
        )
        gen = torch.Generator().manual_seed(args.seed)
        t0 = time.time()
        running = None
        for step in range(args.steps):
            model.train()
            for group in opt.param_groups:
                group["lr"] = lr_at(step, args)
            x = sample_batch(stream, doc_starts, gen, args.batch_size, args.context, tok.bos_token_id)
            loss = model(input_ids=x, labels=x).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
            if (step + 1) % args.log_every == 0 or step == 0:
                el = time.time() - t0
                print(f"step {step + 1:5d}  loss {loss.item():.3f}  ema {running:.3f}  lr {lr_at(step, args):.2e}  "
                      f"{el:.0f}s (eta {el / (step + 1) * (args.steps - step - 1):.0f}s)", flush=True)
        minutes = (time.time() - t0) / 60
        ppl32 = doc_ppl(model, eval_ids, args.context, tok.bos_token_id)
        print(f"held-out PPL at 1x ({args.context} tokens), fp32 weights: {ppl32:.3f}")

        if args.out.exists():
            shutil.rmtree(args.out)
        # fp16 halves the shipped size; the values are small, so the round trip costs almost nothing.
        model.half().save_pretrained(args.out)
        tok.save_pretrained(args.out)
        write_corpus(args.corpus_out, [d for d, _ in long_docs])
        write_license(args.corpus_out.parent / "LICENSE", stdlib, len(long_docs))

    # A subset: the 16x rows cost ~1 s per document and variant on 2 cores.
    table = extension_table(args.out, eval_ids[: args.table_docs], tok.bos_token_id, [8, 16])
    uni = unigram_ppl(train_ids, eval_ids, len(tok), args.context)
    print(f"unigram baseline PPL at 1x: {uni:.2f}")
    for k, v in table.items():
        print(f"  {k:10s} {v:10.2f}")
    if not args.eval_only:
        import transformers

        facts = {
            "params": n_params,
            "command": " ".join(["python scripts/train_tiny_model.py", *(sys.argv[1:] if argv is None else argv)]),
            "python": platform.python_version(),
            "n_train_files": len(train_docs),
            "n_heldout_files": len(heldout_docs),
            "heldout_percent": args.heldout_percent,
            "train_tokens": stream.numel(),
            "vocab": len(tok),
            "minutes": minutes,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "n_docs": len(long_docs),
            "min_tokens": min_tokens,
            "table_docs": min(args.table_docs, len(eval_ids)),
            "unigram_ppl": uni,
            "ppl_1x_all_docs": ppl32,
            "ppl": table,
        }
        write_card(args.out, args, facts)
        (args.out / "training_facts.json").write_text(json.dumps(facts, indent=2) + "\n")


if __name__ == "__main__":
    main()
