"""`export-skip RECIPE [options]`: the main job (no command word): export, validate and report one recipe."""

from __future__ import annotations

import argparse
from pathlib import Path

from exporter.commands.options import add_recipe
from exporter.recipe import load_recipe


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_recipe(parser)
    parser.add_argument("--out", type=Path, metavar="DIR", help="artifact folder (default: artifacts/<recipe file stem>)")
    parser.add_argument("--force", action="store_true", help="redo every stage (ignore the stage cache)")
    parser.add_argument("--no-wait", action="store_true",
                        help="fail at once if another run is writing the same artifact folder")
    parser.add_argument("--no-tune", action="store_true",
                        help="build the default optimized graph instead of timing the variants here (export.tune: false)")


def run(args: argparse.Namespace, console) -> int:
    from exporter.pipeline.run import run as run_pipeline  # torch, onnx: imported when the job runs

    recipe = load_recipe(args.recipe)
    if args.no_tune:  # as the recipe key: the resolved recipe in the report says so
        recipe = recipe.model_copy(update={"export": recipe.export.model_copy(update={"tune": False})})
    out = args.out or Path("artifacts") / (recipe.name or args.recipe.stem)
    console.print(f"[bold]export-skip[/] {args.recipe} -> {out}")
    report = run_pipeline(recipe, out, console, force=args.force, wait=not args.no_wait)
    if report["passed"]:
        console.print(f"[green bold]PASSED[/] {report['published_to']}/ (report.md, report.json) "
                      f"in {report['wall_seconds']:.1f} s")
        if report["not_run"]:  # a pass says only what ran: name what did not
            console.print(f"[yellow]not run ({len(report['not_run'])}):[/] "
                          + "; ".join(n["reason"] for n in report["not_run"]))
        return 0
    failed = [f"{p['artifact']} {p['phase']} batch {p['batch']}: max|Δ| {p['max_abs_diff']:.2e} vs atol {p['atol']:.0e}, "
              f"greedy {'match' if p['greedy_match'] else 'MISMATCH'}" for p in report["parity"] if not p["passed"]]
    failed += [f"{c['name']}: {c['value']} (limit {c['limit']})" for c in report["checks"] if not c["passed"]]
    console.print("[red bold]FAILED[/] " + "; ".join(failed))
    console.print(f"the failed run is kept in {report['published_to']}/ (not published)")
    return 1
