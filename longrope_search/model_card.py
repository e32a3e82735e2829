"""The model card (README.md) of an exported model: where it comes from, the factors, what was measured, and how to
load and serve it. Written by `longrope export` from factors.json and, when the run has one, eval.json.
"""

from __future__ import annotations

import math
from pathlib import Path

from longrope_search.config import format_length
from longrope_search.eval_result import NEEDLE_VARIANTS, EvalResult
from longrope_search.factors import LONGROPE, FactorsFile, measured_columns

CARD_FILE = "README.md"


def hub_id(name: str) -> str | None:
    """`org/name` when the searched model was a hub id (the card's base_model), else None (a local folder, builtin)."""
    if name.startswith(("builtin:", "/", ".", "~")) or name.count("/") != 1 or Path(name).exists():
        return None
    return name


def _number(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.2f}"


def _search_table(ff: FactorsFile) -> list[str]:
    """factors.json's comparison: the winner and each reference method on the search and held-out samples."""
    rows = {"longrope (searched)": ff.scores, **ff.baselines}
    columns = [c for c in measured_columns(rows) if c.key in ("search", "heldout")]
    if not columns:
        return []
    lines = [f"Perplexity at {ff.scored_length:,} tokens from the search (lower is better):", "",
             "| method | " + " | ".join(c.label for c in columns) + " |", "|---|" + "---|" * len(columns)]
    lines += [f"| {name} | " + " | ".join(_number(row.get(c.key)) for c in columns) + " |" for name, row in rows.items()]
    return lines + [""]


def _eval_table(result: EvalResult, original: int) -> list[str]:
    """eval.json's perplexity by length (`longrope eval`)."""
    lengths = [n for n in result.lengths if any(n in row for row in result.ppl.values())]
    if not lengths:
        return []
    which = (f"{result.samples} held-out documents" if result.heldout
             else f"{result.samples} documents not held out from the search")
    lines = [f"Perplexity by context length from `longrope eval` ({which}; lower is better):", "",
             "| method | " + " | ".join(f"{format_length(n)} ({n / original:g}x)" for n in lengths) + " |",
             "|---|" + "---|" * len(lengths)]
    lines += [f"| {method} | " + " | ".join(_number(row.get(n)) for n in lengths) + " |"
              for method, row in result.ppl.items()]
    return lines + [""]


def _needle_tables(result: EvalResult, original: int) -> list[str]:
    """eval.json's needle retrieval by length (`longrope eval --needle`), averaged over the depths: one table per
    variant."""
    lines: list[str] = []
    for variant, methods in result.needle.items():
        lengths = sorted({n for rows in methods.values() for n in rows})
        lines += [f"Needle retrieval ({NEEDLE_VARIANTS.get(variant, variant)}) by context length from `longrope eval "
                  f"--needle`: exact answers over {result.needle_trials} prompts per depth, averaged over the depths "
                  "(higher is better):", "",
                  "| method | " + " | ".join(f"{format_length(n)} ({n / original:g}x)" for n in lengths) + " |",
                  "|---|" + "---|" * len(lengths)]
        lines += [f"| {method} | " + " | ".join(f"{sum(rows[n].values()) / len(rows[n]):.0%}" if rows.get(n) else "-"
                                                for n in lengths) + " |" for method, rows in methods.items()]
        lines.append("")
    return lines


def _front_matter(ff: FactorsFile, tags: list[str]) -> list[str]:
    """The card's YAML header: library, tags and, for a hub model, its base model."""
    base = hub_id(ff.model)
    return ["---", "library_name: transformers", "tags:", *(f"- {tag}" for tag in tags),
            *([f"base_model: {base}"] if base is not None else []), "---", ""]


def model_card(ff: FactorsFile, repo: str | None = None, result: EvalResult | None = None) -> str:
    """The card's markdown. `repo` is the name users load it by (a hub repo when pushed), else a local path."""
    if ff.method != LONGROPE:
        return _method_card(ff, repo or "PATH/TO/THIS/FOLDER")
    original, target = ff.rope.original_length, ff.target_length
    where = repo or "PATH/TO/THIS/FOLDER"
    front = _front_matter(ff, ["longrope", "long-context"])
    short = ("a searched short set" if ff.short_factors is not None else "1.0 (no short set was searched)")
    factors = ff.factors
    body = [
        f"# {Path(where).name or where}: {ff.model} extended to {target:,} tokens with LongRoPE",
        "",
        f"This is `{ff.model}` with [LongRoPE](https://arxiv.org/abs/2402.13753) rescale factors found by "
        f"[longrope](https://pypi.org/project/longrope/)'s evolutionary search: the same weights, a new `rope_scaling` "
        f"in `config.json` (`rope_type: longrope`). No fine-tuning was done unless stated below.",
        "",
        "## Factors",
        "",
        f"- original window: {original:,} tokens; target: {target:,} tokens ({ff.scale:g}x)",
        f"- rope_theta {ff.rope.base:g}, {ff.rope.num_factors} rotary pairs (rotary_dim {ff.rope.rotary_dim})",
        f"- long factors (inputs longer than the window): {min(factors):.3f} to {max(factors):.3f}, one per pair",
        f"- short factors (inputs within the window): {short}",
        f"- attention factor (mscale) {ff.mscale:.4f}, applied to every position, inside the window too",
        f"- n_hat {ff.n_hat}" + (" (searched; no runtime applies it, so this export runs the factors with n_hat 0)"
                                 if ff.n_hat else ""),
        "- `longrope.json` keeps the search's factors file (factors, scores, settings, versions)",
        "",
        "## Measured",
        "",
        *_search_table(ff),
        *(_eval_table(result, original) if result is not None else []),
        *(_needle_tables(result, original) if result is not None else []),
        "## Load with transformers",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{where}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{where}")',
        "```",
        "",
        f"transformers 4.57+ and 5.x read this config. Inputs up to {original:,} tokens use the short factors, longer "
        "ones the long factors. Saving the model again with transformers 5 keeps only `rope_parameters`, which 4.x "
        "ignores (it then runs plain RoPE without a warning): keep this `config.json` if you need 4.x.",
        "",
        "## Serve with vLLM",
        "",
        "```bash",
        f"vllm serve {where} --max-model-len {target}",
        "```",
        "",
        f"`--max-model-len` is needed: vLLM otherwise limits a longrope model to the original window "
        f"({original:,} tokens). From vLLM 0.12, once `--max-model-len` exceeds the original window, vLLM uses the "
        "long factors for every token, short prompts included (transformers switches per input length).",
        "",
    ]
    return "\n".join(front + body)


METHOD_NAMES = {"yarn": "YaRN (rope_type yarn)", "pi": "position interpolation (rope_type linear)",
                "ntk": "NTK-aware scaling (a larger rope_theta)"}


def _method_card(ff: FactorsFile, where: str) -> str:
    """The card of a baseline's export (`finetune --factors`, `export --factors`): what runs, and how to load it."""
    front = _front_matter(ff, ["long-context"])
    body = [
        f"# {Path(where).name or where}: {ff.model} extended to {ff.target_length:,} tokens with {ff.method}", "",
        f"`{ff.model}` with {METHOD_NAMES[ff.method]} at {ff.scale:g}x its {ff.rope.original_length:,}-token window, "
        f"as transformers runs it at every input length (attention factor {ff.mscale:.4f}). No fine-tuning was done "
        "unless stated below; `longrope.json` holds the same RoPE as per-pair factors.", "",
        "## Load with transformers", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
        f'model = AutoModelForCausalLM.from_pretrained("{where}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{where}")', "```", "",
    ]
    return "\n".join(front + body)
