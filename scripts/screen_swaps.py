"""Screen the 1-swap neighbourhood of an attention skip mask on calibration data only (issue 15).

Stage `kl`: every mask that replaces one layer of `--base` by one layer outside it (final layer kept) is
scored by mean KL to the full model on `--windows` WikiText-2 windows x `--length` tokens drawn with `--seed`
from the second half of the test split (exporter.quality.importance.calibration_windows, exporter.quality.calibration.Calibrator:
the search's own code; the full model's distributions are computed once, each mask reuses the base's
residual stream below its first changed layer). `--keep` restricts which base layers may be swapped out.
Stage `add`: the same for every mask that adds one layer to `--base` (a size k + 1 mask).
Stage `lambada`: the masks named with `--mask` (and the base, and the full model) are scored on `--passages`
LAMBADA passages drawn with `--seed` after the first 1,000 (exporter.quality.calibration.LambadaCalibrator, one
branched pass for all masks). No stage touches the held-out data of scripts/heldout_check.py (the
first half of WikiText-2, the first 1,000 LAMBADA passages).

    OMP_NUM_THREADS=1 PYTHONPATH=. python scripts/screen_swaps.py kl --base 6,7,25,26 --windows 4 --length 512 \
        --out artifacts/screen/kl.json
    OMP_NUM_THREADS=1 PYTHONPATH=. python scripts/screen_swaps.py add --base 6,7,25,26 --windows 4 --length 512 \
        --out artifacts/screen/add.json
    OMP_NUM_THREADS=1 PYTHONPATH=. python scripts/screen_swaps.py lambada --base 6,7,25,26 --passages 300 \
        --mask 5,7,25,26 --mask 6,7,24,26 --out artifacts/screen/lambada.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from exporter.quality import data
from exporter.quality.calibration import Calibrator, LambadaCalibrator, calibration_passages
from exporter.quality.importance import calibration_windows
from exporter.mask import SkipMask
from exporter.model.source import load_model
from exporter.model.prompts import pad_token_id
from exporter.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]


def layers(text: str) -> tuple[int, ...]:
    return tuple(sorted(int(i) for i in text.split(",") if i.strip()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("stage", choices=("kl", "add", "lambada"))
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "smollm2-135m.yaml"), help="where the model comes from")
    ap.add_argument("--base", type=layers, required=True)
    ap.add_argument("--keep", type=layers, default=(), help="base layers never swapped out")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--passages", type=int, default=300)
    ap.add_argument("--mask", type=layers, action="append", default=[])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    started = time.time()
    recipe = load_recipe(args.recipe)
    model, tok = load_model(recipe.model)
    n = model.config.num_hidden_layers
    folder = data.data_dir()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"stage": args.stage, "base": args.base, "seed": args.seed, "rows": []}
    if args.stage in ("kl", "add"):
        cal = Calibrator(model, calibration_windows(tok, folder, args.windows, args.length, args.seed))
        base = SkipMask(attention=args.base)
        result.update(windows=args.windows, length=args.length)
        row = {"mask": list(args.base), **cal.measure(base, keep_trace=True)}
        result["rows"].append(row)
        print(f"base {args.base}: KL {row['kl']:.4f} ({time.time() - started:.0f} s)", flush=True)
        if args.stage == "kl":
            masks = [tuple(sorted(set(args.base) - {out} | {inn})) for out in args.base if out not in args.keep
                     for inn in range(n - 1) if inn not in args.base]
        else:  # one more layer: the base plus each layer outside it
            masks = [tuple(sorted(set(args.base) | {inn})) for inn in range(n - 1) if inn not in args.base]
        masks.sort(key=lambda m: -min(set(m) ^ set(args.base)))  # the cheap ones (high first change) first
        for m in masks:
            row = {"mask": list(m), **cal.measure(SkipMask(attention=m), base)}
            result["rows"].append(row)
            better = "  <" if row["kl"] < result["rows"][0]["kl"] else ""
            print(f"{m}: KL {row['kl']:.4f} top-1 {row['top1_agreement']:.3f} "
                  f"ppl {row['ppl']:.2f}{better} ({time.time() - started:.0f} s)", flush=True)
            args.out.write_text(json.dumps(result, indent=1) + "\n")
    else:
        examples, start = calibration_passages(tok, folder, args.passages, args.seed)
        cal = LambadaCalibrator(model, examples, pad_token_id(tok))
        masks = [args.base, *[m for m in args.mask if m != args.base]]
        out = cal._run(SkipMask(), {m: SkipMask(attention=m) for m in masks})
        result.update(passages=args.passages, after=start, full=out[None]["lambada_accuracy"])
        print(f"full: LAMBADA {out[None]['lambada_accuracy']:.2%} ({args.passages} passages after {start})")
        for m in masks:
            result["rows"].append({"mask": list(m), **out[m]})
            print(f"{m}: LAMBADA {out[m]['lambada_accuracy']:.2%} (drop {out[m]['lambada_drop']:+.1f} points) "
                  f"NLL {out[m]['lambada_nll']:.3f}", flush=True)
    result["seconds"] = round(time.time() - started, 1)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
