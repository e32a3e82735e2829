"""The quick path's last step: load an exported model with nothing but transformers, hide a number at the start of
a long Python prompt and ask for it back at the end (greedy decoding).

Run: python scripts/needle_demo.py models/tiny-8x [--chars 2600]
"""

import argparse
import sys
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("model", help="an exported model directory (longrope export ... --out DIR)")
p.add_argument("--chars", type=int, default=2600, help="characters of code between the number and the question")
args = p.parse_args()

try:
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model)
except (OSError, ValueError) as exc:
    print(f"error: cannot load {args.model!r} ({str(exc).splitlines()[0]}); pass the folder "
          "`longrope export RUN --out DIR` wrote.", file=sys.stderr)
    sys.exit(2)
code = (Path(__file__).resolve().parent.parent / "longrope_search" / "evolution.py").read_text()
prompt = "\nSECRET_CODE = 48213\n" + code[: args.chars] + "\nassert SECRET_CODE =="
ids = tokenizer(prompt, return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=8, do_sample=False)
window = model.config.rope_parameters.get("original_max_position_embeddings") or model.config.max_position_embeddings
print(f"{ids.shape[1]} prompt tokens (the model was trained on {window}); it answered "
      f"{tokenizer.decode(out[0, ids.shape[1]:])!r} (hidden: 48213)")
