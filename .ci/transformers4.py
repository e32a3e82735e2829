"""CI: an export of the built-in model's search (or of a baseline, `export --factors yarn`) loads in transformers
4.57 with the logits transformers 5 gives.

    python .ci/transformers4.py reference EXPORT   # with transformers 5 (the project's environment)
    python .ci/transformers4.py check EXPORT       # with transformers 4.57 (a second venv: torch + transformers only)

`reference` writes EXPORT/../<name of EXPORT>.reference.pt: token ids of a text longer than the original window (long factors) and
one inside it (short factors), and 5.x's logits for both. `check` loads EXPORT with 4.57's AutoTokenizer and
AutoModelForCausalLM, and requires the same ids, the same logits (max abs difference <= 1e-4), the export's rope
type in the loaded config (longrope; yarn or linear for a baseline), logits that differ from plain RoPE's (a config 4.x read as plain RoPE would pass otherwise), and that
`model.generate(**tokenizer(text, return_tensors="pt"))` runs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

TOLERANCE = 1e-4


def texts(window: int) -> dict[str, str]:
    line = "def value(self, x):\n    return x + 1\n"
    return {"long": line * (2 * window // 8), "short": line * 2}


def logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits.float()  # (1, L, vocab)


def main(mode: str, export: Path) -> None:
    window = json.loads((export / "config.json").read_text())["original_max_position_embeddings"]
    tokenizer = AutoTokenizer.from_pretrained(export)
    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    ids = {name: tokenizer(text)["input_ids"] for name, text in texts(window).items()}
    reference_file = export.parent / f"{export.name}.reference.pt"
    if mode == "reference":
        assert len(ids["long"]) > window >= len(ids["short"]), (len(ids["long"]), window)
        torch.save({"ids": ids, "logits": {k: logits(model, v) for k, v in ids.items()}}, reference_file)
        print(f"transformers {transformers.__version__}: reference logits of {export} written to {reference_file}")
        return
    reference = torch.load(reference_file)
    assert ids == reference["ids"], "transformers 4.x tokenises the export differently"
    config = AutoConfig.from_pretrained(export)
    rope_type = (config.rope_scaling or {}).get("rope_type") or (config.rope_scaling or {}).get("type")
    method = json.loads((export / "longrope.json").read_text()).get("method", "longrope")
    expected = {"longrope": "longrope", "yarn": "yarn", "pi": "linear"}[method]
    assert rope_type == expected, f"transformers {transformers.__version__} loads rope_scaling {config.rope_scaling}"
    for name, token_ids in ids.items():
        diff = (logits(model, token_ids) - reference["logits"][name]).abs().max().item()
        print(f"transformers {transformers.__version__}: {name} ({len(token_ids)} tokens, window {window}): "
              f"max abs logit difference to 5.x {diff:.2e}")
        assert diff <= TOLERANCE, f"{name}: {diff} > {TOLERANCE}"
    plain = AutoConfig.from_pretrained(export)
    plain.rope_scaling = None
    plain.max_position_embeddings = window
    unscaled = AutoModelForCausalLM.from_pretrained(export, config=plain, dtype=torch.float32).eval()
    gap = (logits(unscaled, ids["long"]) - reference["logits"]["long"]).abs().max().item()
    assert gap > 1e-2, "plain RoPE gives the same logits: the check would not notice longrope being ignored"
    print(f"transformers {transformers.__version__}: the export runs {expected} (plain RoPE differs by {gap:.2f})")
    inputs = tokenizer("x = 1", return_tensors="pt")  # what a user types first: no token_type_ids may come back
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    print(f"transformers {transformers.__version__}: generate(**tokenizer(...)) gave {out.shape[1]} tokens")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
