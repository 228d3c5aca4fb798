"""k = 1..8 attention sub-layers removed from SmolLM2-135M: the searched mask against each one-shot ranking
(LLM-Drop cosine, Block Influence, the paper's deepest-k), on held-out data, with bootstrap SEs; and the plot.

    OMP_NUM_THREADS=1 /work/main/.venv/bin/python scripts/search_curve.py run --out artifacts/curve/curve.json
    /work/main/.venv/bin/python scripts/search_curve.py plot artifacts/curve/curve.json --png docs/results/smollm2-135m-search.png
    /work/main/.venv/bin/python scripts/search_curve.py table artifacts/curve/curve.json

`run`: one process, one model. The search is exporter.quality.strategies.local with --count k for each k (KL
objective, no other constraint), calibrated on WikiText-2 windows from the second half of the test split,
sharing one memory of measured masks across k (greedy's path to k reuses the path to k-1), each k capped at
`--swap-evals` evaluations beyond greedy. Every mask is then scored in one pass (exporter/quality/heldout.py) on the
first `--held-out-windows` windows of 512 tokens and the first `--held-out-passages` LAMBADA passages.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = ("searched", "LLM-Drop cosine", "Block Influence", "deepest")


def run(args) -> None:
    import torch
    from rich.console import Console

    from exporter.quality.calibration import Calibrator, candidates, mask_of
    from exporter.quality.constraints import Budget
    from exporter.quality.data import data_dir
    from exporter.quality.heldout import evaluate_held_out
    from exporter.quality.importance import calibration_windows, measure_importance
    from exporter.mask import SkipMask
    from exporter.model.source import load_model
    from exporter.recipe import load_recipe
    from exporter.quality.strategies import Scorer, local, rankings
    from exporter.model.surgery import apply_skip

    torch.set_num_threads(1)
    started = time.time()
    console = Console(stderr=True)
    model, tok = load_model(load_recipe(ROOT / "recipes" / "smollm2-135m.yaml").model)
    folder = data_dir(args.data)
    chunks = calibration_windows(tok, folder, args.windows, args.length, args.seed)
    cal = Calibrator(model, chunks)
    scores = measure_importance(apply_skip(model, SkipMask()), chunks)
    pool = candidates("attention", model.config.num_hidden_layers, keep_final_layer=True)
    order = rankings(pool, scores)
    memory: dict = {}
    masks, found = {}, {}
    logged = _logged_masks(args.searched_log) if args.searched_log else {}
    for k in range(1, args.max_k + 1):
        if k in logged:  # found by an earlier `run` (its log line): only the held-out scoring is redone
            chosen = [("attention", i) for i in logged[k]]
            found[k] = {"chosen": chosen, "from_log": str(args.searched_log)}
            masks[f"searched-{k}"] = mask_of(chosen)
            for name in METHODS[1:]:
                masks[f"{name}-{k}"] = mask_of(order[name][:k])
            continue
        budget = Budget(count=k)
        scorer = Scorer(cal, budget, "kl", max_evals=None)
        scorer.metrics = memory  # greedy's path to k-1 and earlier swaps are measured once
        before = cal.evaluations
        # the cap: greedy's new step, plus --swap-evals for the swaps
        scorer.max_evals = before + len(pool) - (k - 1) + args.swap_evals
        chosen, record = local(cal, pool, budget, "kl", scores, scorer=scorer)
        found[k] = {"chosen": chosen, "calibration": memory[mask_of(chosen)], "evaluations": cal.evaluations - before,
                    "capped": scorer.stopped, "seeds": [s["seed"] for s in record["seeds"]]}
        masks[f"searched-{k}"] = mask_of(chosen)
        for name in METHODS[1:]:
            masks[f"{name}-{k}"] = mask_of(order[name][:k])
        console.print(f"k={k}: {[i for _, i in chosen]} calibration KL {found[k]['calibration']['kl']:.4f} "
                      f"({found[k]['evaluations']} evaluations{', capped' if scorer.stopped else ''}; "
                      f"{time.time() - started:.0f} s)")
    unique: dict = {}
    for name, m in masks.items():
        unique.setdefault(m, name)
    evaluated = evaluate_held_out(model, tok, {name: m for m, name in unique.items()}, folder, args.held_out_windows,
                                  512, args.held_out_passages, console)
    alias = {name: unique[m] for name, m in masks.items()}
    out = {"settings": vars(args) | {"out": str(args.out)}, "alias": alias,
           "masks": {name: m.describe() for name, m in masks.items()},
           "found": {k: {**v, "chosen": [list(c) for c in v["chosen"]]} for k, v in found.items()},
           "importance": scores.as_dict(), "held_out": evaluated, "seconds": round(time.time() - started, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1, default=str) + "\n")
    console.print(f"wrote {args.out} ({out['seconds']:.0f} s)")


def _logged_masks(path: Path) -> dict[int, list[int]]:
    """{k: layers} from the `k=K: [a, b, ...] calibration KL ...` lines an earlier `run` printed."""
    import re

    out = {}
    for m in re.finditer(r"^k=(\d+): \[([\d, ]*)\]", path.read_text(), re.M):
        out[int(m.group(1))] = [int(i) for i in m.group(2).split(",") if i.strip()]
    return out


def _rows(result: dict):
    """(method, k, model entry, paired comparison with the searched mask of that k or None)."""
    from exporter.quality.metrics import compare

    held = result["held_out"]
    for k in range(1, result["settings"]["max_k"] + 1):
        for method in METHODS:
            name = result["alias"][f"{method}-{k}"]
            ref = result["alias"][f"searched-{k}"]
            vs = compare(held, name, ref) if name != ref else None
            yield method, k, name, held["models"][name], vs


def table(args) -> None:
    result = json.loads(args.json.read_text())
    held = result["held_out"]
    full = held["models"]["full"]
    print(f"full: perplexity {full['perplexity']:.2f} ± {full['perplexity_se']:.2f}, LAMBADA "
          f"{full.get('lambada_accuracy', float('nan')):.1%} ± {full.get('lambada_accuracy_se', float('nan')):.1%}\n")
    print("| k | method | attention removed | held-out KL | LAMBADA | vs searched (KL; LAMBADA), paired |")
    print("|---:|---|---|---:|---:|---|")
    best_k = 0
    for method, k, name, m, vs in _rows(result):
        layers = ", ".join(str(i) for i in result["masks"][f"{method}-{k}"]["attention"])
        diff = "same mask" if vs is None else "; ".join(
            f"{d['difference']:+.3f} ± {d['se']:.3f}{'' if d['distinguishable'] else ' (n.d.)'}"
            for key, d in vs.items() if key in ("kl", "lambada_accuracy"))
        lam = f"{m['lambada_accuracy']:.1%} ± {m['lambada_accuracy_se']:.1%}" if "lambada_accuracy" in m else "-"
        print(f"| {k} | {method} | {layers} | {m['kl']:.4f} ± {m['kl_se']:.4f} | {lam} | {diff} |")
        if method == "searched" and m["kl"] <= 0.25:
            best_k = max(best_k, k)
    print(f"\nlargest k whose searched mask keeps held-out KL <= 0.25: {best_k}")


def plot(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result = json.loads(args.json.read_text())
    full = result["held_out"]["models"]["full"]
    fig, (ax_kl, ax_lam) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=90)
    marks = dict(zip(METHODS, ("o-", "s--", "^--", "v--")))
    lam = "lambada_accuracy" in full  # without LAMBADA, the right panel is perplexity
    key, scale = ("lambada_accuracy", 100) if lam else ("perplexity", 1)
    for method in METHODS:
        rows = [(k, m) for meth, k, _, m, _ in _rows(result) if meth == method]
        ks = [k for k, _ in rows]
        ax_kl.errorbar(ks, [m["kl"] for _, m in rows], yerr=[m["kl_se"] for _, m in rows], fmt=marks[method],
                       label=method, capsize=2, ms=4)
        ax_lam.errorbar(ks, [scale * m[key] for _, m in rows], yerr=[scale * m[f"{key}_se"] for _, m in rows],
                        fmt=marks[method], capsize=2, ms=4)
    ax_kl.axhline(0.25, color="grey", lw=0.8, ls=":")
    ax_kl.set(xlabel="attention sub-layers removed (k)", ylabel="held-out KL to the full model", yscale="log")
    ax_kl.legend(fontsize=7)
    ax_lam.axhline(scale * full[key], color="black", lw=0.8, label="full model")
    ax_lam.legend(fontsize=7)
    ax_lam.set(xlabel="attention sub-layers removed (k)",
               ylabel="held-out LAMBADA accuracy (%)" if lam else "held-out WikiText-2 perplexity")
    fig.suptitle("SmolLM2-135M-Instruct: searched vs one-shot masks (held out, ± 1 SE)", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.png)
    print(f"wrote {args.png}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--data", type=Path)
    r.add_argument("--windows", type=int, default=4, help="calibration windows (default 4)")
    r.add_argument("--length", type=int, default=256)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--max-k", type=int, default=8)
    r.add_argument("--swap-evals", type=int, default=30, help="evaluations for swaps at each k (default 30)")
    r.add_argument("--held-out-windows", type=int, default=8)
    r.add_argument("--held-out-passages", type=int, default=200)
    r.add_argument("--searched-log", type=Path, help="take the searched masks from an earlier run's log (k=K lines)")
    for name in ("table", "plot"):
        p = sub.add_parser(name)
        p.add_argument("json", type=Path)
        if name == "plot":
            p.add_argument("--png", type=Path, required=True)
    args = ap.parse_args()
    {"run": run, "table": table, "plot": plot}[args.cmd](args)


if __name__ == "__main__":
    main()
