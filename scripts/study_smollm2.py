"""The SmolLM2-135M study (issue 4): attention vs MLP vs whole blocks, k deepest removed, and recipe masks.

Evaluates every mask in ONE pass over the same batches (the full model computed once; each masked
model shares the layers below its first removed sub-layer), writes JSON, and renders the plot:

  .venv/bin/python scripts/study_smollm2.py run --windows 3 --passages 300 --out artifacts/study/sweep.json
  .venv/bin/python scripts/study_smollm2.py run --sweep none --recipe searched=recipes/smollm2-135m-searched.yaml \
      --windows 3 --passages 300 --out artifacts/study/searched.json
  .venv/bin/python scripts/study_smollm2.py plot artifacts/study/*.json --png docs/results/smollm2-135m.png

--windows / --passages cut the data to the first N WikiText-2 windows (1024 tokens) and the first N
LAMBADA passages; the JSON records whether a number is on a subset.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KS = (1, 2, 4, 6, 9)
KINDS = ("attention", "mlp", "block")


def sweep_masks(num_layers: int, kinds=KINDS, ks=KS) -> dict:
    """k deepest sub-layers of each kind, final layer kept: k=1 -> [28], k=9 -> [20..28] on 30 layers."""
    from exporter.mask import SkipMask

    masks = {}
    for kind in kinds:
        for k in ks:
            layers = tuple(range(num_layers - 1 - k, num_layers - 1))
            masks[f"{kind}-{k}"] = SkipMask(attention=layers if kind in ("attention", "block") else (),
                                            mlp=layers if kind in ("mlp", "block") else ())
    return masks


def run(args) -> None:
    from rich.console import Console

    from exporter.cost import predicted_decode_speedup
    from exporter.quality.data import data_dir
    from exporter.model.source import load_model
    from exporter.quality.metrics import Settings, TorchScorer, evaluate, write_json
    from exporter.mask import resolve_mask
    from exporter.recipe import load_recipe

    base = load_recipe(ROOT / "recipes" / "smollm2-135m.yaml")
    model, tokenizer = load_model(base.model)
    n = model.config.num_hidden_layers
    masks = {} if args.sweep == "none" else sweep_masks(n)
    for item in args.recipe or []:
        name, _, path = item.partition("=")
        masks[name] = resolve_mask(load_recipe(path), n)
    settings = Settings(data=data_dir(args.data), window=args.window, windows=args.windows, passages=args.passages,
                        tasks=tuple(t for t in args.tasks.split(",") if t))
    result = evaluate(TorchScorer(model, masks), tokenizer, settings, Console(stderr=True))
    result["masks"] = {name: {"attention": list(m.attention), "mlp": list(m.mlp)} for name, m in masks.items()}
    result["predicted_decode_speedup"] = {
        name: {str(ctx): predicted_decode_speedup(model.config, m, ctx) for ctx in (512, 2048)}
        for name, m in masks.items()}
    result["command"] = " ".join([".venv/bin/python", "scripts/study_smollm2.py", *sys.argv[1:]])
    write_json(result, Path(args.out))
    print(json.dumps(result["models"], indent=1))


def plot(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models, masks, pred, _ = load_results(args.files)
    full = models["full"]
    others = [n for n in models if n != "full" and n.split("-")[0] not in KINDS]  # recipe masks
    styles = dict(zip(KINDS, ("o-", "s--", "^:")))
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    panels = (("perplexity", "WikiText-2 perplexity (log scale)", True),
              ("lambada_accuracy", "LAMBADA last-word accuracy", False),
              ("kl", "mean KL(full || skipped) per token (log scale)", True))
    for ax, (key, title, log) in zip(axes.flat, panels):
        for kind in KINDS:
            ks = [k for k in KS if f"{kind}-{k}" in models]
            ax.plot(ks, [models[f"{kind}-{k}"][key] for k in ks], styles[kind], label=f"{kind}, k deepest")
        for name in others:
            ax.plot([_count(masks[name])], [models[name][key]], "*", markersize=12, label=name)
        if key in full:
            ax.axhline(full[key], color="grey", lw=1, label="full model")
        ax.set_xlabel("sub-layers (or whole blocks) removed, k")
        ax.set_title(title, fontsize=10)
        ax.set_xticks(KS)
        if log:
            ax.set_yscale("log")
    ax = axes.flat[3]  # the trade-off: quality against the cost model's decode speedup
    for kind in KINDS:
        ks = [k for k in KS if f"{kind}-{k}" in models and f"{kind}-{k}" in pred]
        ax.plot([pred[f"{kind}-{k}"]["512"] for k in ks], [models[f"{kind}-{k}"]["lambada_accuracy"] for k in ks],
                styles[kind], label=f"{kind}, k deepest")
    for name in others:
        if name in pred:
            ax.plot([pred[name]["512"]], [models[name]["lambada_accuracy"]], "*", markersize=12, label=name)
    ax.plot([1.0], [full["lambada_accuracy"]], "kD", label="full model")
    ax.set_xlabel("predicted decode speedup, batch 1, context 512 (cost model)")
    ax.set_title("LAMBADA accuracy vs predicted decode speedup", fontsize=10)
    axes.flat[1].legend(fontsize=7)
    fig.suptitle("SmolLM2-135M-Instruct: removing the k deepest attention / MLP sub-layers or whole blocks "
                 "(final layer kept)", fontsize=11)
    fig.tight_layout()
    Path(args.png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.png, dpi=args.dpi)
    print(f"wrote {args.png} ({Path(args.png).stat().st_size // 1024} KiB)")


def _count(mask: dict) -> int:
    """Sub-layers or blocks removed: a layer in both lists counts once (a whole block)."""
    return len(set(mask["attention"]) | set(mask["mlp"]))


def measured_speedup(folder: Path) -> dict | None:
    """Decode speedup in ONNX Runtime from an artifact folder: `export-skip bench` (bench.json, decode at
    batch 1 and the context closest to 512) if it ran, else the pipeline's short speed stage (report.json)."""
    bench, report = folder / "bench.json", folder / "report.json"
    if bench.is_file():
        b = json.loads(bench.read_text())
        cases = [c for c in b.get("decode", []) if c["batch"] == 1]
        if cases:
            case = min(cases, key=lambda c: abs(c["size"] - 512))
            return {"source": f"{bench} (export-skip bench, decode batch 1, context {case['size']})",
                    **{v: case[v]["measured_speedup"] for v in ("plain", "optimized") if v in case}}
    if report.is_file():
        m = json.loads(report.read_text()).get("speed", {}).get("measured")
        if m:
            return {"source": f"{report} (pipeline speed stage, decode batch 1, context {m['context']})",
                    **{v: m[v]["measured_speedup"] for v in ("plain", "optimized") if v in m}}
    return None


def load_results(files) -> tuple[dict, dict, dict, list]:
    """Merge study JSON files: a model's metrics may come from several files (e.g. one per task)."""
    models, masks, pred, notes = {}, {}, {}, []
    for path in files:
        r = json.loads(Path(path).read_text())
        for name, m in r["models"].items():
            models.setdefault(name, {}).update(m)
        masks.update(r.get("masks", {}))
        pred.update(r.get("predicted_decode_speedup", {}))
        parts = []
        if "wikitext" in r:
            w = r["wikitext"]
            parts.append(f"{w['windows']} of {w['of_windows']} WikiText-2 windows of {r['window']} tokens "
                         f"({w['tokens_scored']:,} tokens scored)")
        if "lambada" in r:
            parts.append(f"{r['lambada']['passages']:,} LAMBADA passages")
        notes.append(f"{path}: models {', '.join(r['models'])}; {', '.join(parts)}; {r['seconds']:.0f} s; "
                     f"`{r.get('command', '')}`")
    return models, masks, pred, notes


def table(args) -> None:
    """The markdown table of the study from the JSON files (one row a model, full first)."""
    models, masks, pred, notes = load_results(args.files)
    measured = {}
    for item in args.measured or []:
        name, _, folder = item.partition("=")
        got = measured_speedup(Path(folder))
        if got:
            measured[name] = got
    print("| model | attention removed | MLP removed | perplexity | LAMBADA acc | KL vs full | top-1 agree "
          "| predicted decode speedup @512 / @2048 | measured ORT decode speedup, plain / optimized graph |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for name, m in models.items():
        mk = masks.get(name, {"attention": [], "mlp": []})
        sp = pred.get(name)
        ms = measured.get(name)
        ms_text = "-" if ms is None else " / ".join(f"{ms[v]:.3f}x" for v in ("plain", "optimized") if v in ms)
        print(f"| {name} | {_layers(mk['attention'])} | {_layers(mk['mlp'])} | {_fmt(m.get('perplexity'), '{:.2f}')} | "
              f"{_fmt(m.get('lambada_accuracy'), '{:.1%}')} | {_fmt(m.get('kl', 0.0 if name == 'full' else None), '{:.3f}')} | "
              f"{_fmt(m.get('top1_agreement', 1.0 if name == 'full' else None), '{:.1%}')} | "
              f"{_speed(sp)} | {ms_text} |")
    print()
    for note in notes:
        print(f"- {note}")
    for name, ms in measured.items():
        print(f"- measured {name}: {ms['source']}")


def _fmt(value, spec: str) -> str:
    return "-" if value is None else spec.format(value)


def _speed(sp: dict | None) -> str:
    return "1.000x / 1.000x" if sp is None else f"{sp['512']:.3f}x / {sp['2048']:.3f}x"


def _layers(layers: list[int]) -> str:
    if not layers:
        return "-"
    if layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 2:
        return f"{layers[0]}-{layers[-1]}"
    return ", ".join(map(str, layers))


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--sweep", choices=("all", "none"), default="all")
    r.add_argument("--recipe", action="append", help="NAME=RECIPE: also evaluate this recipe's mask")
    r.add_argument("--windows", type=int)
    r.add_argument("--passages", type=int)
    r.add_argument("--window", type=int, default=1024)
    r.add_argument("--data", type=Path)
    r.add_argument("--tasks", default="wikitext,lambada", help="comma-separated: wikitext, lambada")
    r.add_argument("--out", required=True)
    p = sub.add_parser("plot")
    p.add_argument("files", nargs="+")
    p.add_argument("--png", required=True)
    p.add_argument("--dpi", type=int, default=80)
    t = sub.add_parser("table")
    t.add_argument("files", nargs="+")
    t.add_argument("--measured", action="append", metavar="NAME=ARTIFACT_DIR",
                   help="measured ORT decode speedup of model NAME from this artifact folder (bench.json or report.json)")
    args = parser.parse_args()
    {"run": run, "plot": plot, "table": table}[args.cmd](args)


if __name__ == "__main__":
    main()
