"""`export-skip eval RECIPE`: perplexity, LAMBADA, KL / top-1 vs the full model of a recipe's mask, and with
--artifact of its exported graph in ONNX Runtime; writes eval.json (and the artifact's report gains the numbers).

The scoring itself is exporter/quality/metrics.py (imported when the command runs: it needs torch).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from exporter.checks.manifest import record_files
from exporter.commands.options import add_data, add_recipe
from exporter.errors import UserError
from exporter.mask import SkipMask, resolve_mask
from exporter.model.source import describe_source, load_config
from exporter.onnx.contract import ONNX_FILE
from exporter.quality import data
from exporter.recipe import load_recipe
from exporter.report import REPORT_JSON, Report

ONNX_REL_TOLERANCE = 0.005  # the exported graph's perplexity must be within 0.5% of PyTorch's
# an int4 graph is not the same numbers: its KL to the full model may exceed the fp32 skipped model's by this
# much (issue 14's bar: quantization costs no more than this on top of the skipping)
INT4_KL_MARGIN = 0.05


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_recipe(parser)
    parser.add_argument("--artifact", type=Path, metavar="DIR",
                        help="also evaluate this exported folder's model.onnx in ONNX Runtime")
    parser.add_argument("--onnx", metavar="FILE", help="with --artifact: the graph in it to evaluate (e.g. int4/model.onnx)")
    add_data(parser)
    parser.add_argument("--limit", type=int, metavar="N",
                        help="quick run: first N WikiText windows and first N LAMBADA passages")
    parser.add_argument("--windows", type=int, metavar="N", help="first N WikiText windows (overrides --limit)")
    parser.add_argument("--passages", type=int, metavar="N", help="first N LAMBADA passages (overrides --limit)")
    parser.add_argument("--window", type=int, default=1024, metavar="N", help="perplexity window in tokens (default 1024)")
    parser.add_argument("--tasks", default="wikitext,lambada", metavar="T", help="comma-separated: wikitext, lambada")
    parser.add_argument("--out", type=Path, metavar="FILE", help="eval.json path (default: DIR/eval.json with --artifact)")


def run(args: argparse.Namespace, console) -> int:
    from exporter.quality.metrics import Settings

    tasks = tuple(t for t in args.tasks.split(",") if t)
    if not tasks or set(tasks) - {"wikitext", "lambada"}:
        raise UserError(f"--tasks {args.tasks!r}: choose from wikitext, lambada")
    for name in ("limit", "windows", "passages", "window"):
        if getattr(args, name) is not None and getattr(args, name) < (2 if name == "window" else 1):
            raise UserError(f"--{name} must be a positive number{' of at least 2 tokens' if name == 'window' else ''}")
    recipe = load_recipe(args.recipe)
    settings = Settings(data=data.data_dir(args.data), window=args.window, tasks=tasks,
                        windows=args.windows if args.windows is not None else args.limit,
                        passages=args.passages if args.passages is not None else args.limit)
    if args.onnx and args.artifact is None:
        raise UserError("--onnx names a graph inside --artifact DIR: give --artifact too")
    result, path = run_eval(recipe, settings, args.artifact, args.out, console, onnx_file=args.onnx)
    console.print(f"wrote {path}")
    check = result.get("onnx_vs_pytorch") or result.get("int4_vs_fp32")
    return 1 if check and not check["passed"] else 0


def run_eval(recipe, settings, artifact: Path | None = None, out: Path | None = None,
             console=None, onnx_file: str | None = None) -> tuple[dict, Path]:
    """Evaluate a recipe's mask (and, with `artifact`, its exported ONNX in ONNX Runtime); write eval.json.
    `settings`: a quality.metrics.Settings."""
    from exporter.backends.ort import OrtRunner
    from exporter.model.source import load_model
    from exporter.quality.metrics import TorchScorer, WithRunners, evaluate, write_json

    config = load_config(recipe.model)
    mask = resolve_mask(recipe, config.num_hidden_layers)
    onnx_path = None
    if artifact is not None:
        onnx_path = _artifact_onnx(artifact, mask, onnx_file)
    for name in settings.tasks:  # fail on missing data before loading anything heavy
        data.data_file(settings.data, data.WIKITEXT if name == "wikitext" else data.LAMBADA)
    model, tokenizer = load_model(recipe.model)
    scorer = TorchScorer(model, {"skipped": mask})
    if onnx_path is not None:
        scorer = WithRunners(scorer, {"onnx": OrtRunner(onnx_path)})
    result = evaluate(scorer, tokenizer, settings, console)
    result = {"recipe": str(recipe.source_path), "model": describe_source(recipe.model),
              "mask": mask.describe(),
              "backends": {"full": "pytorch", "skipped": "pytorch (physically skipped model)",
                           **({"onnx": f"onnxruntime ({onnx_path})"} if onnx_path else {})},
              **result}
    quantized = onnx_path is not None and onnx_path.parent.name == "int4"
    if onnx_path is not None and "wikitext" in result and not quantized:
        ort_ppl, pt_ppl = result["models"]["onnx"]["perplexity"], result["models"]["skipped"]["perplexity"]
        rel = abs(ort_ppl - pt_ppl) / pt_ppl
        result["onnx_vs_pytorch"] = {"perplexity_rel_diff": rel, "limit": ONNX_REL_TOLERANCE,
                                     "passed": rel <= ONNX_REL_TOLERANCE}
    elif quantized and "wikitext" in result:  # what int4 adds to the skipping's KL, on the same windows
        added = result["models"]["onnx"]["kl"] - result["models"]["skipped"]["kl"]
        result["int4_vs_fp32"] = {"kl_added": added, "limit": INT4_KL_MARGIN, "passed": added <= INT4_KL_MARGIN}
    path = out or (artifact / "eval.json" if artifact else Path("artifacts") / f"eval-{recipe.source_path.stem}" / "eval.json")
    write_json(result, path)
    touched = []
    report = Report.load(artifact) if artifact is not None else None
    if report is not None:  # the pipeline's report gains the numbers
        report.add_section(artifact, "quality", result)
        touched.append(REPORT_JSON)
    if artifact is not None and (artifact / "manifest.json").is_file():  # a published folder: record what changed
        if path.resolve().parent == artifact.resolve():
            touched.append(path.name)
        if touched:
            record_files(artifact, touched)
    if console is not None:
        print_table(result, console)
    return result, path


def _artifact_onnx(artifact: Path, mask: SkipMask, onnx_file: str | None = None) -> Path:
    path = artifact / (onnx_file or ONNX_FILE)
    if not path.is_file():
        raise UserError(f"--artifact {artifact}: no {ONNX_FILE} there (run export-skip RECIPE --out {artifact} first)")
    report = Report.load(artifact)
    if report is not None:
        got = report.mask
        if (tuple(got.get("attention", ())), tuple(got.get("mlp", ()))) != (mask.attention, mask.mlp):
            raise UserError(f"--artifact {artifact}: it was exported with mask {got}, not the recipe's "
                            f"attention {list(mask.attention)}, mlp {list(mask.mlp)}")
    return path


def print_table(result: dict, console) -> None:
    from rich.table import Table

    from exporter.quality.metrics import FULL, compare

    table = Table(title=f"quality ({'subset' if _is_subset(result) else 'full data'})")
    for col in ("model", "perplexity", "KL vs full", "top-1 agree", "LAMBADA acc"):
        table.add_column(col, justify="right")
    for name, m in result["models"].items():
        table.add_row(name, _fmt(m, "perplexity", "{:.3f}"), _fmt(m, "kl", "{:.4f}"),
                      _fmt(m, "top1_agreement", "{:.2%}"), _fmt(m, "lambada_accuracy", "{:.2%}"))
    console.print(table)
    console.print("± one bootstrap standard error over windows / passages")
    if "skipped" in result["models"] and FULL in result["models"]:
        for metric, d in compare(result, "skipped", FULL).items():
            verdict = "distinguishable" if d["distinguishable"] else "not distinguishable from the full model"
            console.print(f"skipped - full, {metric}: {d['difference']:+.4g} ± {d['se']:.2g} (paired): {verdict}")
    added = result.get("int4_vs_fp32")
    if added:
        word = "[green]ok[/]" if added["passed"] else "[red]over the limit[/]"
        console.print(f"int4 graph: KL vs full {added['kl_added']:+.4f} over the fp32 skipped model's "
                      f"(limit {added['limit']}) {word}")
    check = result.get("onnx_vs_pytorch")
    if check:
        word = "[green]ok[/]" if check["passed"] else "[red]FAILED[/]"
        console.print(f"ONNX vs PyTorch perplexity: {check['perplexity_rel_diff']:.4%} (limit {check['limit']:.1%}) {word}")


def _is_subset(result: dict) -> bool:
    return any(result.get(t, {}).get("subset") for t in ("wikitext", "lambada"))


def _fmt(m: dict, key: str, spec: str) -> str:
    value, se = m.get(key), m.get(f"{key}_se")
    if value is None:
        return "-"
    return spec.format(value) + ("" if se is None or se != se else " ± " + spec.format(se))
