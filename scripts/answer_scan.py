"""How far each single attention removal (or each mask given) keeps SmolLM2's greedy chat answers to the default
recipe's validation prompts: the number of leading tokens equal to the full model's, the lower of the prompts
(what `search --match-tokens N` constrains), and the answers themselves.

    OMP_NUM_THREADS=1 /work/main/.venv/bin/python scripts/answer_scan.py [--tokens 17] [--mask 6,7,9,25 ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    import torch

    from exporter.quality.answers import AnswerCheck, greedy_answers
    from exporter.mask import SkipMask
    from exporter.model.source import load_model
    from exporter.model.prompts import decode, encode, pad_token_id
    from exporter.recipe import load_recipe

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=17, help="answer tokens compared (report.md shows 17)")
    ap.add_argument("--mask", action="append", help="attention layers, comma-separated (default: each single layer)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    recipe = load_recipe(ROOT / "recipes" / "smollm2-135m.yaml")
    model, tok = load_model(recipe.model)
    prompts = [encode(tok, p, chat=recipe.validation.chat) for p in recipe.validation.prompts]
    pad, eos = pad_token_id(tok), tok.eos_token_id
    check = AnswerCheck(model, prompts, args.tokens, pad, eos)
    print("full:", [decode(tok, a) for a in check.full])
    n = model.config.num_hidden_layers
    masks = [tuple(int(i) for i in m.split(",")) for m in args.mask] if args.mask else [(i,) for i in range(n - 1)]
    for layers in masks:
        mask = SkipMask(attention=tuple(sorted(layers)))
        answers = greedy_answers(model, mask, prompts, args.tokens, pad, eos)
        print(f"attention {list(layers)}: {check.measure(mask)['answers_matched']} of {args.tokens} tokens kept;",
              [decode(tok, a) for a in answers], flush=True)


if __name__ == "__main__":
    main()
