"""Several chat turns through onnxruntime-genai, against the masked PyTorch model run on each turn's history.

    .venv/bin/python scripts/genai_turns.py FOLDER RECIPE [append|rewind] [share|noshare] [full]

FOLDER: a folder onnxruntime-genai opens (an artifact, or artifacts/peers/genai-fp32 with `full`, whose
reference is then the unskipped model). `append`: each turn's tokens appended after the generated ones
(genai's continuous decoding); `rewind`: rewind_to(0), then the whole history appended. `share` /
`noshare` overrides past_present_share_buffer through a temporary copy of the config. Exit 1 when a turn's
tokens differ from the reference (the first difference and the reference's two top logits are printed).
docs/serving.md ("A chat's next turn") reports what it gave.
"""

import sys
import tempfile
from pathlib import Path

import onnxruntime_genai as og
import torch

from exporter.model.source import load_model
from exporter.mask import resolve_mask
from exporter.recipe import load_recipe
from exporter.mask import SkipMask
from exporter.model.surgery import masked
from genai_graphs import linked_folder  # scripts/ is on the path when this script runs

TURNS = ["The capital of France is", " And the capital of Italy is", " What about Spain?"]
NEW_TOKENS = 12


def reference(model, mask, history: list[int]) -> list[int]:
    out, ids = [], list(history)
    with masked(model, mask), torch.no_grad():
        for _ in range(NEW_TOKENS):  # no cache: the plainest possible reference
            token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            out.append(token)
            ids.append(token)
    return out


def main(folder: Path, recipe_path: str, how: str, share: str | None, full: bool) -> int:
    recipe = load_recipe(recipe_path)
    model, tok = load_model(recipe.model)
    mask = SkipMask() if full else resolve_mask(recipe, model.config.num_hidden_layers)
    with tempfile.TemporaryDirectory() as tmp:
        if share is not None:
            folder = linked_folder(folder, Path(tmp) / "shared", lambda config: config["search"].update(
                past_present_share_buffer=share == "share"))
        m = og.Model(str(folder))
        params = og.GeneratorParams(m)
        params.set_search_options(do_sample=False, max_length=300)
        generator = og.Generator(m, params)
        history: list[int] = []
        for n, turn in enumerate(TURNS, 1):
            history += tok.encode(turn)
            if how == "rewind":
                generator.rewind_to(0)
                generator.append_tokens(history)
            else:
                generator.append_tokens(tok.encode(turn))
            got = []
            for _ in range(NEW_TOKENS):
                generator.generate_next_token()
                got.append(int(generator.get_next_tokens()[0]))
            expected = reference(model, mask, history)
            print(f"turn {n}: {'same' if got == expected else 'DIFFERENT'}: {tok.decode(got)!r}"
                  + ("" if got == expected else f" | reference {tok.decode(expected)!r}"))
            if got != expected:
                k = next(i for i, (a, b) in enumerate(zip(got, expected)) if a != b)
                with masked(model, mask), torch.no_grad():
                    logits = model(torch.tensor([history + expected[:k]])).logits[0, -1]
                print(f"  first difference at token {k}: reference {tok.decode([expected[k]])!r} "
                      f"{float(logits[expected[k]]):.3f}, genai {tok.decode([got[k]])!r} {float(logits[got[k]]):.3f}")
                return 1
            history += got
    return 0


if __name__ == "__main__":
    args = sys.argv[1:]
    share = next((a for a in args[2:] if a in ("share", "noshare")), None)
    how = next((a for a in args[2:] if a in ("append", "rewind")), "append")
    sys.exit(main(Path(args[0]), args[1], how, share, "full" in args[2:]))
