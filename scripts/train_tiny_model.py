"""Train the embedded `builtin:tiny` model and cut the held-out `builtin:cpython` corpus.

Data: the CPython standard library of the running interpreter (PSF licence), split by file into
train and held-out sets. A share of each batch is synthetic retrieval windows (the task of
`longrope_search.needle`: `NAME = 12345` lines in train-stream code, then `assert NAME ==` and the
number), so the model retrieves inside its window and needle tests of context extension measure something.
Run: `nice -n 5 python scripts/train_tiny_model.py` (about 50 min of training on 1 thread, then ~5 min of
evaluation); the weights depend on --threads, so keep the default to reproduce the shipped model.
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, PreTrainedModel, PreTrainedTokenizerFast, Qwen2Config

from longrope_search.builtin import is_heldout  # the one home of the train/held-out split
from longrope_search.export import PORTABLE_TOKENIZER_CLASS  # the class name export writes too
from longrope_search.model import load_tokenizer  # what longrope (and AutoTokenizer) builds from a directory
from longrope_search.needle import NeedleSample, build_sample, draw_needles, greedy_answer, is_retrieved

BUILTIN = Path(__file__).resolve().parent.parent / "longrope_search" / "builtin"
SPECIAL_TOKENS = ["<s>", "</s>", "<unk>", "<pad>"]
TEST_DIRS = {"test", "tests", "idle_test"}
NEEDLE_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=BUILTIN / "tiny-llama-cpython", help="model directory to write")
    p.add_argument("--corpus-out", type=Path, default=BUILTIN / "corpus" / "cpython_heldout.jsonl.gz")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--context", type=int, default=128, help="training context = max_position_embeddings")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads (grouped-query attention); default --heads")
    p.add_argument("--arch", choices=sorted(ARCHS), default="llama",
                   help="llama (builtin:tiny) or qwen2 (builtin:tiny-qwen2: biased q/k/v projections)")
    p.add_argument("--intermediate", type=int, default=768)
    p.add_argument("--rope-theta", type=float, default=10000.0)
    p.add_argument("--heldout-percent", type=int, default=15, help="share of files kept out of training")
    p.add_argument("--no-tests", action="store_true", help="leave the stdlib's test packages out of the data")
    p.add_argument("--min-doc-factor", type=int, default=16, help="held-out docs need this many x context tokens")
    p.add_argument("--doc-margin", type=int, default=64, help="extra tokens beyond min-doc-factor x context")
    p.add_argument("--max-docs", type=int, default=96, help="cap on documents in the held-out corpus")
    p.add_argument("--table-docs", type=int, default=32, help="documents scored for the 8x/16x baseline table")
    p.add_argument("--retrieval-share", type=float, default=0.3,
                   help="share of each batch's windows that are synthetic retrieval windows")
    p.add_argument("--multi-key-share", type=float, default=0.5,
                   help="share of the retrieval windows with 2 to --max-keys needles (one asked); the rest hold one")
    p.add_argument("--max-keys", type=int, default=4, help="most needles in one training retrieval window")
    p.add_argument("--max-tail", type=int, default=32,
                   help="retrieval windows end 1 to this many tokens after the answer (a line end, then code)")
    p.add_argument("--answer-weight", type=float, default=5.0,
                   help="loss weight of the predictions of a retrieval answer and its line end (1 = plain LM loss)")
    p.add_argument("--needle-trials", type=int, default=40, help="retrieval eval: samples per depth and setting")
    p.add_argument("--needle-keys", type=int, default=4, help="retrieval eval: needles in a multi-key sample")
    p.add_argument("--needle-seed", type=int, default=1234, help="retrieval eval: seed of the needle draws")
    p.add_argument("--scales", type=int, nargs="*", default=[8, 16],
                   help="extension factors of the baseline PPL table (none: only the 1x row)")
    p.add_argument("--threads", type=int, default=1, help="torch threads; the weights may depend on it")
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


def train_tokenizer(texts: list[str], vocab_size: int, arch: str = "llama") -> PreTrainedTokenizerFast:
    """Byte-level BPE. For qwen2, Qwen2's own normaliser and pre-tokeniser (one digit per token, its split regex):
    transformers 5 loads every qwen2 model's tokenizer as Qwen2Tokenizer, which rebuilds those two from its code
    whatever tokenizer.json says, so a tokenizer trained any other way would be run differently than it trained."""
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    if arch == "qwen2":
        from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

        tk.normalizer = normalizers.NFC()
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:
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


def retrieval_windows(
    rng: np.random.Generator, tok: PreTrainedTokenizerFast, stream: torch.Tensor, count: int, ctx: int,
    multi_share: float, max_keys: int, max_tail: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` synthetic retrieval windows of ctx tokens and a (count, ctx-1) mask of the positions whose
    next-token prediction is an answer token or the line end after it.

    Each window: BOS + train-stream code from a random offset with 1 needle (or, for a `multi_share` of the
    windows, 2 to `max_keys`, one asked) at depths uniform in [0, 1], then the question, the answer, a line
    end and more code: a `build_sample` of ctx - t tokens, then "\n" and t-1 further stream tokens, t uniform
    in 1..max_tail. Without the line end the model never sees what follows the number and at evaluation goes
    on with more digits; with the answer always ending at the window's last position it learns to stop by
    position and cuts the number short. Exact match counts both as wrong. Everything drawn from `rng`, in a
    fixed order, so a seed gives the same windows.
    """
    line_end = tok("\n", add_special_tokens=False)["input_ids"]
    rows, masks = [], []
    for _ in range(count):
        keys = int(rng.integers(2, max_keys + 1)) if max_keys > 1 and rng.random() < multi_share else 1
        needles = draw_needles(rng, keys)
        depths = rng.random(keys).tolist()
        asked = int(rng.integers(keys))
        start = int(rng.integers(0, stream.numel() - 2 * ctx))
        tail = int(rng.integers(len(line_end), max(len(line_end), max_tail) + 1))
        length = ctx - tail
        sample = build_sample(tok, stream[start : start + ctx].tolist(), length, needles, depths, asked)
        more = stream[start + ctx : start + ctx + tail - len(line_end)]  # code after the assert line
        mask = torch.zeros(ctx - 1, dtype=torch.bool)
        mask[sample.predicting] = True
        mask[length - 1 : length - 1 + len(line_end)] = True  # the line end after the answer
        rows.append(torch.cat([sample.ids, torch.tensor(line_end, dtype=torch.long), more]))
        masks.append(mask)
    if not rows:
        return torch.empty(0, ctx, dtype=torch.long), torch.empty(0, ctx - 1, dtype=torch.bool)
    return torch.stack(rows), torch.stack(masks)


def needle_samples(
    tok: PreTrainedTokenizerFast, docs: list[list[int]], length: int, keys: int, depth: float, trials: int,
    rng: np.random.Generator,
) -> list[NeedleSample]:
    """`trials` samples of `length` tokens on held-out documents: the asked needle at `depth`, any other
    needles at uniform depths, the filler from a random document at a random offset."""
    samples = []
    for _ in range(trials):
        needles = draw_needles(rng, keys)
        asked = int(rng.integers(keys))
        depths = rng.random(keys).tolist()
        depths[asked] = depth
        doc = docs[int(rng.integers(len(docs)))]
        room = length - 1  # at most this much filler is used; the overhead only shortens it
        offset = int(rng.integers(0, max(1, len(doc) - room + 1)))
        samples.append(build_sample(tok, doc[offset:], length, needles, depths, asked))
    return samples


@torch.no_grad()
def retrieval_accuracy(
    model: PreTrainedModel, tok: PreTrainedTokenizerFast, docs: list[list[int]], length: int, keys: int,
    trials: int, seed: int, depths: tuple[float, ...] = NEEDLE_DEPTHS,
) -> dict[str, float]:
    """Exact-match greedy retrieval accuracy per depth (and "all"), `trials` samples per depth."""
    model.eval()
    rng = np.random.default_rng([seed, keys, length])
    acc = {}
    for depth in depths:
        samples = needle_samples(tok, docs, length, keys, depth, trials, rng)
        acc[f"{depth:g}"] = sum(is_retrieved(s, greedy_answer(model, tok, s)) for s in samples) / trials
    acc["all"] = sum(acc.values()) / len(depths)
    return acc


# ---------------------------------------------------------------- model


ARCHS = {"llama": LlamaConfig, "qwen2": Qwen2Config}
ARCH_CLASS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
BUILTIN_NAME = {"llama": "tiny", "qwen2": "tiny-qwen2"}  # the name longrope_search.builtin.MODELS gives each


def build_model(args: argparse.Namespace, tok: PreTrainedTokenizerFast) -> PreTrainedModel:
    cfg = ARCHS[args.arch](
        vocab_size=len(tok),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads or args.heads,
        max_position_embeddings=args.context,
        rope_parameters={"rope_type": "default", "rope_theta": args.rope_theta},
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        attn_implementation="sdpa",
    )
    return AutoModelForCausalLM.from_config(cfg)


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def doc_ppl(model: PreTrainedModel, docs: list[list[int]], length: int, bos: int) -> float:
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
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ctx = base.config.max_position_embeddings
    theta = base.config.rope_parameters["rope_theta"]
    rotary_dim = base.config.hidden_size // base.config.num_attention_heads
    table = {"1x": doc_ppl(base, eval_docs, ctx, bos)}
    for s in scales:
        for name, rope in rope_variants(theta, ctx, float(s), rotary_dim).items():
            cfg = AutoConfig.from_pretrained(model_dir)
            cfg.rope_parameters = rope
            cfg.max_position_embeddings = ctx * s
            model = AutoModelForCausalLM.from_pretrained(model_dir, config=cfg, dtype=torch.float32)
            table[f"{s}x {name}"] = doc_ppl(model, eval_docs, ctx * s, bos)
    return table


# ---------------------------------------------------------------- outputs


def save_tokenizer(tok: PreTrainedTokenizerFast, out: Path) -> None:
    """save_pretrained, then name the class transformers 4.x knows too: 5.x writes "TokenizersBackend", which
    4.x cannot load, and loads "PreTrainedTokenizerFast" (an alias there) to the same tokenizer."""
    tok.save_pretrained(out)
    path = out / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def keep_rope_theta_for_4x(out: Path) -> None:
    """transformers 5 saves the base only in rope_parameters; 4.x reads the top-level rope_theta and would fall
    back to its class default (10000) without it, silently wrong for any other base. Write both."""
    path = out / "config.json"
    cfg = json.loads(path.read_text())
    cfg["rope_theta"] = cfg["rope_parameters"]["rope_theta"]
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def check_auto_tokenizer(out: Path, tok: PreTrainedTokenizerFast, texts: list[str]) -> None:
    """The tokenizer AutoTokenizer builds from `out` (what longrope and every user load) must give the ids the model
    trained on; transformers picks the class by model type for some (Qwen2, Phi-3) and rebuilds parts of it."""
    auto = load_tokenizer(str(out))
    for text in texts:
        if auto(text, add_special_tokens=False)["input_ids"] != tok(text, add_special_tokens=False)["input_ids"]:
            raise SystemExit(f"AutoTokenizer loads {out} as {type(auto).__name__}, which tokenises differently from "
                             "the tokenizer the model trained with; fix train_tokenizer for this architecture.")


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


def _card_training(args: argparse.Namespace, facts: dict) -> str:
    """The model card's training section: data, tokenizer, optimiser and the retrieval windows mixed in."""
    n_ret = facts["retrieval_windows_per_batch"]
    return f"""## Training
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
- Every training window starts with BOS. {args.batch_size - n_ret} of the {args.batch_size} windows of a batch are BOS followed by
  {args.context - 1} tokens of the train stream (files joined by `</s>`); {n_ret} (`--retrieval-share {args.retrieval_share:g}`) are
  synthetic retrieval windows built by `longrope_search.needle.build_sample` on train-stream code from a random
  offset: lines `NAME = 12345` (5-7 digits) at depths uniform in [0, 1], then `assert NAME ==`, the number, a line
  end and more code (a sample of {args.context} - t tokens, then `\\n` and t-1 stream tokens, t uniform in 1..{args.max_tail}, so
  the model learns where the number ends from the number, not from the position).
  {100 * (1 - args.multi_key_share):.0f}% of them hold one needle, {100 * args.multi_key_share:.0f}% 2 to {args.max_keys} (one asked). Loss: next-token
  cross-entropy over every position{'' if args.answer_weight == 1 else f', the answer tokens and the line end after them weighted {args.answer_weight:g}'}.

"""


def write_card(out: Path, args: argparse.Namespace, facts: dict) -> None:
    rows = "\n".join(f"| {k} | {v:.2f} |" for k, v in facts["ppl"].items())
    ret = facts["retrieval_1x"]
    depths = [f"{d:g}" for d in NEEDLE_DEPTHS]
    ret_rows = "\n".join(
        f"| {name} | " + " | ".join(f"{100 * ret[name][d]:.0f}%" for d in depths) + f" | {100 * ret[name]['all']:.1f}% |"
        for name in ("1-key", f"{args.needle_keys}-key")
    )
    card = f"""---
license: other
library_name: transformers
pipeline_tag: text-generation
---
# {args.out.name} (`builtin:{BUILTIN_NAME[args.arch]}`)

A {facts['params'] / 1e6:.1f}M-parameter `{ARCH_CLASS[args.arch]}` trained from scratch on Python source code, so that
LongRoPE factor searches can run in minutes on a CPU. Context window: {args.context} tokens
(`max_position_embeddings`), RoPE base {args.rope_theta:g}, head_dim {args.hidden // args.heads}
({args.hidden // args.heads // 2} rotary pairs), {args.heads} attention heads sharing {args.kv_heads or args.heads} key/value heads. Weights stored in float16; load with `dtype=torch.float32` on CPU.

{_card_training(args, facts)}## Retrieval at 1x
Greedy exact match of the whole number (`longrope_search.needle.greedy_answer` / `is_retrieved`) on
{args.context}-token samples whose filler is held-out code (a random document of the corpus at a random offset),
{ret['trials_per_depth']} samples per depth (seed {ret['seed']}); the asked needle at the depth, other needles at random depths.

| needles | {' | '.join(depths)} | all |
|---|{'---|' * len(depths)}---|
{ret_rows}

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


@dataclass
class Data:
    """The stdlib split by file, the tokenizer and the held-out corpus's long documents."""

    train_docs: list[tuple[str, str]]  # (relative path, text)
    heldout_docs: list[tuple[str, str]]
    tok: PreTrainedTokenizerFast
    train_ids: list[list[int]]
    long_docs: list[tuple[tuple[str, str], list[int]]]  # the corpus: held-out documents of >= min_tokens tokens
    min_tokens: int

    @property
    def eval_ids(self) -> list[list[int]]:
        return [ids for _, ids in self.long_docs]


@dataclass
class Trained:
    model: PreTrainedModel
    params: int
    train_tokens: int
    minutes: float
    retrieval_windows: int  # per batch
    ppl_1x: float  # held-out PPL at the training context, fp32 weights


@dataclass
class Checks:
    """What the saved (fp16) weights do, run in fp32: retrieval at 1x, the extension table, the unigram floor."""

    retrieval: dict[str, dict[float, float]]
    table: dict[str, float]
    unigram_ppl: float


def prepare_data(args: argparse.Namespace) -> Data:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    rels = list_sources(stdlib, include_tests=not args.no_tests)
    train_docs = read_sources(stdlib, [r for r in rels if not is_heldout(r, args.heldout_percent)])
    heldout_docs = read_sources(stdlib, [r for r in rels if is_heldout(r, args.heldout_percent)])
    print(f"CPython {platform.python_version()} stdlib: {len(train_docs)} train files, {len(heldout_docs)} held-out")
    if args.eval_only:
        tok = PreTrainedTokenizerFast.from_pretrained(args.out)
    else:
        t0 = time.time()
        tok = train_tokenizer([t for _, t in train_docs], args.vocab_size, args.arch)
        print(f"tokenizer: vocab {len(tok)} in {time.time() - t0:.0f}s")
    train_ids = encode(tok, [t for _, t in train_docs])
    min_tokens = args.min_doc_factor * args.context + args.doc_margin
    heldout_ids = encode(tok, [t for _, t in heldout_docs])
    long_docs = [(d, ids) for d, ids in zip(heldout_docs, heldout_ids) if len(ids) >= min_tokens]
    # Pick by path hash, not alphabetically, so one package does not fill the corpus; store sorted.
    long_docs = sorted(long_docs, key=lambda x: hashlib.sha256(x[0][0].encode()).hexdigest())[: args.max_docs]
    long_docs.sort(key=lambda x: x[0][0])
    print(f"held-out corpus: {len(long_docs)} documents of >= {min_tokens} tokens")
    return Data(train_docs, heldout_docs, tok, train_ids, long_docs, min_tokens)


def train_stream(data: Data) -> tuple[torch.Tensor, torch.Tensor]:
    """The training documents as one stream, each followed by EOS (train_tokens,), and where each starts."""
    stream_parts, starts, pos = [], [], 0
    for ids in data.train_ids:
        starts.append(pos)
        stream_parts.append(torch.tensor(ids + [data.tok.eos_token_id], dtype=torch.long))
        pos += len(ids) + 1
    return torch.cat(stream_parts), torch.tensor(starts)


def train(args: argparse.Namespace, data: Data) -> Trained:
    """AdamW on code windows and synthetic retrieval windows (the answers weighted --answer-weight)."""
    tok = data.tok
    stream, doc_starts = train_stream(data)
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
    needle_rng = np.random.default_rng(args.seed)  # the retrieval windows' draws, apart from `gen`
    n_retrieval = round(args.retrieval_share * args.batch_size)
    print(f"batch: {args.batch_size - n_retrieval} code windows + {n_retrieval} retrieval windows")
    t0 = time.time()
    running = ret_hit = None
    for step in range(args.steps):
        model.train()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        code = sample_batch(stream, doc_starts, gen, args.batch_size - n_retrieval, args.context, tok.bos_token_id)
        needles, answer_mask = retrieval_windows(
            needle_rng, tok, stream, n_retrieval, args.context, args.multi_key_share, args.max_keys, args.max_tail
        )
        x = torch.cat([code, needles])  # (batch, ctx)
        weight = torch.ones(x.shape[0], args.context - 1)  # (batch, ctx-1): one per predicted token
        weight[code.shape[0] :][answer_mask] = args.answer_weight
        logits = model(input_ids=x).logits[:, :-1].float()  # (batch, ctx-1, vocab)
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none")
        loss = (nll * weight.reshape(-1)).sum() / weight.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
        if n_retrieval:
            # Teacher-forced retrieval of this batch's needle windows: every answer token the argmax.
            with torch.no_grad():
                right = logits[code.shape[0] :].argmax(-1) == x[code.shape[0] :, 1:]  # (n_retrieval, ctx-1)
                hit = (right | ~answer_mask).all(1).float().mean().item()
                answer_nll = nll.reshape(x.shape[0], -1)[code.shape[0] :][answer_mask].mean().item()
            ret_hit = hit if ret_hit is None else 0.9 * ret_hit + 0.1 * hit
        if (step + 1) % args.log_every == 0 or step == 0:
            el = time.time() - t0
            ret = f"answer nll {answer_nll:.2f} hit ema {ret_hit:.2f}  " if n_retrieval else ""
            print(f"step {step + 1:5d}  loss {loss.item():.3f}  ema {running:.3f}  {ret}lr {lr_at(step, args):.2e}  "
                  f"{el:.0f}s (eta {el / (step + 1) * (args.steps - step - 1):.0f}s)", flush=True)
    minutes = (time.time() - t0) / 60
    ppl32 = doc_ppl(model, data.eval_ids, args.context, tok.bos_token_id)
    print(f"held-out PPL at 1x ({args.context} tokens), fp32 weights: {ppl32:.3f}")
    return Trained(model, n_params, stream.numel(), minutes, n_retrieval, ppl32)


def save(args: argparse.Namespace, data: Data, trained: Trained) -> None:
    """The model in fp16 (it halves the shipped size; the values are small, so the round trip costs almost
    nothing), its tokenizer, the held-out corpus and its licence."""
    if args.out.exists():
        shutil.rmtree(args.out)
    trained.model.half().save_pretrained(args.out)
    keep_rope_theta_for_4x(args.out)
    save_tokenizer(data.tok, args.out)
    check_auto_tokenizer(args.out, data.tok, [text for (_, text), _ in data.long_docs[:8]])
    write_corpus(args.corpus_out, [d for d, _ in data.long_docs])
    write_license(args.corpus_out.parent / "LICENSE", Path(sysconfig.get_paths()["stdlib"]), len(data.long_docs))


def check(args: argparse.Namespace, data: Data) -> Checks:
    """Retrieval at 1x on held-out documents and the extension table, the saved (fp16) weights run in fp32."""
    t1 = time.time()
    saved = AutoModelForCausalLM.from_pretrained(args.out, dtype=torch.float32)
    retrieval = {
        f"{keys}-key": retrieval_accuracy(saved, data.tok, data.eval_ids, args.context, keys, args.needle_trials,
                                          args.needle_seed)
        for keys in (1, args.needle_keys)
    }
    for name, acc in retrieval.items():
        print(f"retrieval at 1x, {name}: " + "  ".join(f"{d} {a:.3f}" for d, a in acc.items()), flush=True)
    print(f"retrieval eval: {time.time() - t1:.0f}s")
    # A subset: the 16x rows cost ~1 s per document and variant on 2 cores.
    table = extension_table(args.out, data.eval_ids[: args.table_docs], data.tok.bos_token_id, args.scales)
    uni = unigram_ppl(data.train_ids, data.eval_ids, len(data.tok), args.context)
    print(f"unigram baseline PPL at 1x: {uni:.2f}")
    for k, v in table.items():
        print(f"  {k:10s} {v:10.4f}")
    return Checks(retrieval, table, uni)


def training_facts(args: argparse.Namespace, command: list[str], data: Data, trained: Trained,
                   checks: Checks) -> dict:
    """training_facts.json: how the shipped model was made and what it measured (the model card is written from it)."""
    return {
        "params": trained.params,
        "command": " ".join(["python scripts/train_tiny_model.py", *command]),
        "python": platform.python_version(),
        "n_train_files": len(data.train_docs),
        "n_heldout_files": len(data.heldout_docs),
        "heldout_percent": args.heldout_percent,
        "train_tokens": trained.train_tokens,
        "vocab": len(data.tok),
        "minutes": trained.minutes,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "n_docs": len(data.long_docs),
        "min_tokens": data.min_tokens,
        "table_docs": min(args.table_docs, len(data.eval_ids)),
        "unigram_ppl": checks.unigram_ppl,
        "ppl_1x_all_docs": trained.ppl_1x,
        "ppl": checks.table,
        "retrieval_share": args.retrieval_share,
        "multi_key_share": args.multi_key_share,
        "max_keys": args.max_keys,
        "max_tail": args.max_tail,
        "answer_weight": args.answer_weight,
        "retrieval_windows_per_batch": trained.retrieval_windows,
        "retrieval_1x": {
            "length": args.context,
            "trials_per_depth": args.needle_trials,
            "seed": args.needle_seed,
            "filler": "held-out documents (random document, random offset)",
            **checks.retrieval,
        },
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    data = prepare_data(args)
    trained = None if args.eval_only else train(args, data)
    if trained is not None:
        save(args, data, trained)
    checks = check(args, data)
    if trained is not None:
        facts = training_facts(args, sys.argv[1:] if argv is None else argv, data, trained, checks)
        write_card(args.out, args, facts)
        (args.out / "training_facts.json").write_text(json.dumps(facts, indent=2) + "\n")


if __name__ == "__main__":
    main()
